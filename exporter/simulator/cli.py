"""``connect-usage-exporter simulate``: run the fake Connect until interrupted."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from types import FrameType

from .config import SimConfig
from .core import Simulator
from .server import SimServer
from .timefmt import parse_instant


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="connect-usage-exporter simulate",
        description="Serve a simulated Posit Connect with realistic usage data.",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0 picks a free port")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--content", type=int, default=60, metavar="N")
    p.add_argument("--users", type=int, default=200, metavar="M")
    p.add_argument("--history-days", type=float, default=30, metavar="D")
    p.add_argument("--connect-version", default="2025.04.0", metavar="V")
    p.add_argument("--clock-speed", type=float, default=1.0, metavar="K")
    p.add_argument(
        "--start",
        type=instant,
        default=None,
        metavar="TIME",
        help="the simulated clock's starting instant, RFC 3339 or epoch seconds (default: now)",
    )
    p.add_argument("--paused", action="store_true", help="hold the clock still until resumed")
    return p


def instant(value: str) -> float:
    """argparse type for ``--start``."""
    try:
        return parse_instant(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not an RFC 3339 time or epoch seconds: {value!r}"
        ) from None


def main(argv: list[str] | None = None) -> int:
    """Serve; print the URL and the admin, publisher, viewer keys; exit 0 on SIGINT/SIGTERM."""
    args = build_parser().parse_args(argv)
    config = SimConfig(
        seed=args.seed,
        content=args.content,
        users=args.users,
        history_days=args.history_days,
        connect_version=args.connect_version,
        clock_speed=args.clock_speed,
    )
    sim = Simulator(config, now=args.start, paused=args.paused)
    server = SimServer(sim, host=args.host, port=args.port)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        url = server.start()
        print(url)
        for role in ("admin", "publisher", "viewer"):
            print(sim.keys[role])
        sys.stdout.flush()
        while not stop.wait(0.5):
            pass
    finally:
        server.stop()
        for s, handler in previous.items():
            signal.signal(s, handler)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
