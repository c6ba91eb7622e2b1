"""How fast the simulator generates and serves a big Connect (default: ~1M events, 10k items).

Run: ``.venv/bin/python -m bench.bench_simulator`` (or ``python bench/bench_simulator.py``).
The server runs in a subprocess so the client's JSON parsing does not share its GIL; the
client walks every page of both usage streams with plain httpx, as an exporter would.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from exporter.simulator import SimConfig, SimServer, Simulator  # noqa: E402

NOW = 1_750_000_000.0


def config_for(args: argparse.Namespace) -> SimConfig:
    per_day = args.events / args.days
    return SimConfig(
        seed=args.seed,
        content=args.content,
        users=args.users,
        history_days=args.days,
        sessions_per_day=per_day * 0.3,
        visits_per_day=per_day * 0.7,
    )


def serve(args: argparse.Namespace) -> None:
    """Child mode: build the simulator, report the URL, key and timing, serve until stdin ends."""
    t0 = time.perf_counter()
    sim = Simulator(config_for(args), now=NOW, paused=True)
    gen = time.perf_counter() - t0
    with SimServer(sim) as srv:
        info = {"url": srv.url, "key": sim.keys["admin"], "generation_s": gen,
                "shiny": len(sim.shiny), "visits": len(sim.visits)}  # fmt: skip
        print(json.dumps(info), flush=True)
        sys.stdin.read()


def walk(client: httpx.Client, path: str, limit: int) -> tuple[int, int]:
    records = pages = 0
    cursor: str | None = None
    while True:
        params: dict[str, Any] = {"limit": limit}
        if cursor:
            params["next"] = cursor
        r = client.get(path, params=params)
        r.raise_for_status()
        body = r.json()
        pages += 1
        records += len(body["results"])
        cursor = body["paging"]["cursors"].get("next")
        if not cursor:
            return records, pages


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--events", type=int, default=1_000_000)
    p.add_argument("--content", type=int, default=10_000)
    p.add_argument("--users", type=int, default=5_000)
    p.add_argument("--days", type=float, default=30)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--limit", type=int, default=500)
    p.add_argument("--in-process", action="store_true", help="serve from a thread instead")
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve:
        serve(args)
        return 0

    proc: subprocess.Popen[str] | None = None
    server: SimServer | None = None
    info: dict[str, Any]
    if args.in_process:
        t0 = time.perf_counter()
        sim = Simulator(config_for(args), now=NOW, paused=True)
        gen = time.perf_counter() - t0
        server = SimServer(sim)
        info = {"url": server.start(), "key": sim.keys["admin"], "generation_s": gen}
    else:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--serve",
               *(argv if argv is not None else sys.argv[1:])]  # fmt: skip
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        info = json.loads(proc.stdout.readline())
    try:
        rows = []
        headers = {"Authorization": f"Key {info['key']}"}
        with httpx.Client(base_url=info["url"], headers=headers, timeout=60) as client:
            for name, path in (
                ("shiny", "/__api__/v1/instrumentation/shiny/usage"),
                ("visits", "/__api__/v1/instrumentation/content/visits"),
            ):
                t0 = time.perf_counter()
                events, pages = walk(client, path, args.limit)
                rows.append((name, events, pages, time.perf_counter() - t0))
        total = ("total", sum(r[1] for r in rows), sum(r[2] for r in rows), sum(r[3] for r in rows))
        print(f"generation: {info['generation_s']:.1f} s for {args.content} content items, "
              f"{args.users} users, {args.days:g} days")  # fmt: skip
        print(
            f"{'stream':<8}{'events':>10}{'pages':>8}{'seconds':>9}{'pages/s':>9}{'events/s':>11}"
        )
        for name, events, pages, secs in [*rows, total]:
            print(f"{name:<8}{events:>10}{pages:>8}{secs:>9.1f}{pages / secs:>9.0f}"
                  f"{events / secs:>11.0f}")  # fmt: skip
    finally:
        if proc is not None:
            assert proc.stdin is not None
            proc.stdin.close()
            proc.wait(timeout=30)
        if server is not None:
            server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
