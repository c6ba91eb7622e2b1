"""The HTTP front under load and under attack (issue #17, finding 1).

Run: ``.venv/bin/python -m bench.bench_http`` (``--help`` for the knobs; about 2 minutes).

(1) Bursts: ``--concurrent`` scrapes of ``/metrics`` started at once, plain and then gzip, against
an exporter serving a populated snapshot of ``--content`` items (tests/snapshots.py) from a
process of its own. Each is timed from connect to its last byte; answered means a 200 with the
whole body within ``--scrape-timeout``.

(2) Idle attack: the real service (``python -m exporter run``, with ``--fd-limit`` descriptors as
its soft and hard limit: 1024 is the usual default) polls a simulator (a process of its own, its
clock running at ``--speed``) while ``--idle`` connections that never send a byte are held
against its port, each reopened as soon as the exporter closes it. For ``--attack-seconds``
``/healthz`` is asked on a fresh connection every 0.2 s; then the simulator's clock stops, the
exporter catches up, and every counter and histogram is compared with the simulator's truth, the
attack still on. The exporter's open descriptors are sampled throughout.

``--exporter-path DIR`` puts another checkout's ``exporter`` package first on the children's
path, to measure it with the same client.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import FAR_FUTURE, SimProcess  # noqa: E402
from tests.soak import catch_up, compare_with_truth, polls_ok  # noqa: E402
from tests.support import IdleClients, metrics_url_from_log, terminate  # noqa: E402

START = 1_764_079_200.0  # the simulated clock's first instant: a Tuesday, 14:00 UTC


def _child_env(exporter_path: Path | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONNECT_")}
    paths = [str(exporter_path)] if exporter_path else []
    env["PYTHONPATH"] = os.pathsep.join([*paths, str(ROOT)])
    return env


def _raise_own_limit() -> None:
    """This process holds thousands of client sockets: take the whole hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]


# --- (1) bursts of scrapes --------------------------------------------------------------------


# Child: an exporter serving a populated snapshot of argv[1] items until stdin closes. A program
# of its own (not `-m bench…`), so that `--exporter-path` decides which `exporter` it imports.
_SNAPSHOT_SERVER = """
import json, sys
import httpx
from exporter.collector import build_registry
from exporter.health import Health
from exporter.http import ExporterHTTPServer
from tests.snapshots import populated_snapshot

snapshot = populated_snapshot(int(sys.argv[1]))
registry = build_registry(lambda: snapshot, Health(("shiny", "visits")))
server = ExporterHTTPServer(registry, host="127.0.0.1", port=0, readiness=lambda: (True, ""))
server.start()
for encoding in ("identity", "gzip"):  # render and compress once, before the clock starts
    url = f"http://127.0.0.1:{server.port}/metrics"
    httpx.get(url, headers={"Accept-Encoding": encoding}, timeout=120)
print(json.dumps({"port": server.port}), flush=True)
sys.stdin.read()
server.stop()
"""


async def _scrape(port: int, encoding: str, limit_s: float) -> tuple[bool, float, int]:
    """One scrape on a fresh connection: (answered whole, seconds to the last byte, body bytes)."""
    t0 = time.perf_counter()
    writer = None
    try:
        async with asyncio.timeout(limit_s):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(
                b"GET /metrics HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n"
                b"Accept-Encoding: " + encoding.encode() + b"\r\n\r\n"
            )
            head = await reader.readuntil(b"\r\n\r\n")
            found = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
            length = int(found.group(1)) if found else -1
            left = length
            while left > 0:
                chunk = await reader.read(min(left, 1 << 20))
                if not chunk:
                    break
                left -= len(chunk)
            ok = re.match(rb"HTTP/1\.[01] 200 ", head) is not None and left == 0
            return ok, time.perf_counter() - t0, length
    except (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
        return False, time.perf_counter() - t0, 0
    finally:
        if writer is not None:
            writer.close()


async def _burst(port: int, encoding: str, count: int, limit_s: float) -> dict[str, Any]:
    t0 = time.perf_counter()
    results = await asyncio.gather(*(_scrape(port, encoding, limit_s) for _ in range(count)))
    wall = time.perf_counter() - t0
    answered = [seconds for ok, seconds, _ in results if ok]
    return {
        "encoding": encoding,
        "answered": len(answered),
        "count": count,
        "p50": statistics.median(answered) if answered else math.nan,
        "p99": percentile(answered, 0.99) if answered else math.nan,
        "max": max(answered) if answered else math.nan,
        "wall": wall,
        "bytes": max((n for _, _, n in results), default=0),
    }


def bursts(args: argparse.Namespace) -> list[dict[str, Any]]:
    cmd = [sys.executable, "-c", _SNAPSHOT_SERVER, str(args.content)]
    with tempfile.TemporaryDirectory(prefix="bench-http-") as tmp:
        child = subprocess.Popen(
            cmd,
            cwd=tmp,  # not ROOT: the first entry of the child's sys.path is its folder
            env=_child_env(args.exporter_path),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert child.stdout is not None
            port = json.loads(child.stdout.readline())["port"]
            return [
                asyncio.run(_burst(port, encoding, args.concurrent, args.scrape_timeout))
                for encoding in ("identity", "gzip")
            ]
        finally:
            assert child.stdin is not None
            child.stdin.close()
            try:
                child.wait(timeout=60)
            except subprocess.TimeoutExpired:
                child.kill()


# --- (2) an idle attack on the real service ---------------------------------------------------


def _open_files(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


@contextmanager
def _service(url: str, key: str, workdir: Path, args: argparse.Namespace) -> Iterator[Any]:
    """The real service with `--fd-limit` descriptors; yields (process, /metrics URL)."""
    launch = "import runpy; runpy.run_module('exporter', run_name='__main__', alter_sys=True)"
    if args.fd_limit:
        launch = (
            f"import resource; resource.setrlimit(resource.RLIMIT_NOFILE, "
            f"({args.fd_limit}, {args.fd_limit})); " + launch
        )
    env = _child_env(args.exporter_path)
    env.update(
        CONNECT_SERVER=url,
        CONNECT_API_KEY=key,
        CONNECT_EXPORTER_STATE_PATH=str(workdir / "state.sqlite"),
    )
    log = workdir / "exporter.log"
    cmd = [sys.executable, "-c", launch, "run", "--listen-address", "127.0.0.1:0"]
    cmd += ["--poll-interval", "1", "--metadata-interval", "5", "--overlap", "900"]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield proc, metrics_url_from_log(proc, log)
    finally:
        terminate(proc)


def _ready(metrics: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(metrics.replace("/metrics", "/readyz"), timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError("the exporter never became ready")


def attack(args: argparse.Namespace) -> dict[str, Any]:
    config = {
        "seed": 3,
        "content": 200,
        "users": 2000,
        "history_days": 2,
        "sessions_per_day": 4000,
        "visits_per_day": 12000,
        "clock_speed": args.speed,
    }
    out: dict[str, Any] = {"idle": args.idle, "fd_limit": args.fd_limit or "inherited"}
    with (
        SimProcess(config, now=START) as sim,
        tempfile.TemporaryDirectory(prefix="bench-http-") as tmp,
        _service(sim.url, sim.key, Path(tmp), args) as (proc, metrics),
    ):
        _ready(metrics)
        port = int(metrics.rsplit(":", 1)[1].split("/")[0])
        healthz = metrics.replace("/metrics", "/healthz")
        sim.control("POST", "clock", {"pause": False})
        probes: list[float] = []
        failures = 0
        fds = [_open_files(proc.pid)]
        with IdleClients("127.0.0.1", port, args.idle) as idle:
            end = time.monotonic() + args.attack_seconds
            while time.monotonic() < end:
                t0 = time.perf_counter()
                try:
                    ok = httpx.get(healthz, timeout=10).text == "ok\n"
                except httpx.HTTPError:
                    ok = False
                if ok:
                    probes.append(time.perf_counter() - t0)
                else:
                    failures += 1
                fds.append(_open_files(proc.pid))
                time.sleep(0.2)
            state = sim.control("POST", "clock", {"pause": True})
            stop_at = math.ceil(state["now"]) + 2
            sim.control("POST", "clock", {"advance": stop_at - state["now"]})
            caught_up, series = catch_up(metrics, stop_at, timeout=180)
            fds.append(_open_files(proc.pid))
            closed_by_exporter = idle.closed
        since_series = series.get("connect_usage_counting_since_timestamp_seconds", {})
        since = next(iter(since_series.values()), START)  # no scrape answered: nothing to check
        truth = sim.control("GET", "truth", **{"from": since, "to": FAR_FUTURE})
        mismatches = compare_with_truth(series, truth) if series else ["no scrape answered"]
        errors = series.get("connect_usage_poll_errors_total", {})
        out.update(
            healthz_answered=len(probes),
            healthz_asked=len(probes) + failures,
            healthz_p50=statistics.median(probes) if probes else math.nan,
            healthz_p99=percentile(probes, 0.99) if probes else math.nan,
            healthz_max=max(probes) if probes else math.nan,
            closed_by_exporter=closed_by_exporter,
            exporter_fds_max=max(fds),
            caught_up=caught_up,
            scraped=bool(series),
            exact=caught_up and not mismatches,
            mismatches=len(mismatches),
            poll_errors=int(sum(errors.values())),
            polls=polls_ok(series),
            events=int(
                truth["totals"]["sessions_started"]
                + truth["totals"]["visits"]
                + truth["totals"]["synthetic_visits"]
            ),
        )
    return out


# --- report -----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--content", type=int, default=1000, help="content items in the snapshot")
    parser.add_argument("--concurrent", type=int, default=1000, help="scrapes in each burst")
    parser.add_argument("--scrape-timeout", type=float, default=60.0)
    parser.add_argument("--idle", type=int, default=5000, help="idle connections held")
    parser.add_argument("--attack-seconds", type=float, default=30.0)
    parser.add_argument("--fd-limit", type=int, default=1024, help="0: the exporter inherits ours")
    parser.add_argument("--speed", type=float, default=60.0, help="simulated seconds per second")
    parser.add_argument("--only", choices=("bursts", "attack"), default=None)
    parser.add_argument("--exporter-path", type=Path, default=None)
    args = parser.parse_args(argv)
    _raise_own_limit()
    failed = False
    if args.only in (None, "bursts"):
        rows = bursts(args)
        print(f"(1) {args.concurrent} concurrent scrapes, {args.content} content items")
        print(f"{'encoding':10} {'answered':>11} {'p50 s':>7} {'p99 s':>7} {'max s':>7} "
              f"{'all in s':>8} {'body MB':>8}")  # fmt: skip
        for row in rows:
            print(
                f"{row['encoding']:10} {row['answered']:>5}/{row['count']:<5} {row['p50']:7.2f} "
                f"{row['p99']:7.2f} {row['max']:7.2f} {row['wall']:8.2f} {row['bytes'] / 1e6:8.2f}"
            )
            failed |= row["answered"] < row["count"]
    if args.only in (None, "attack"):
        r = attack(args)
        print(
            f"(2) {r['idle']} idle connections held for {args.attack_seconds:g} s against the "
            f"service (open-file limit {r['fd_limit']}), reopened as the exporter closed them"
        )
        print(
            f"  /healthz answered {r['healthz_answered']}/{r['healthz_asked']}: p50 "
            f"{r['healthz_p50'] * 1000:.1f} ms, p99 {r['healthz_p99'] * 1000:.1f} ms, "
            f"max {r['healthz_max'] * 1000:.1f} ms"
        )
        print(
            f"  exporter: at most {r['exporter_fds_max']} open descriptors; "
            f"closed {r['closed_by_exporter']} idle connections to make room"
        )
        if r["scraped"]:
            print(
                f"  polls: {r['polls']} successful, {r['poll_errors']} failed; {r['events']} "
                f"events; counters {'exact' if r['exact'] else 'NOT exact'} "
                f"({r['mismatches']} series differ)"
            )
        else:
            print("  /metrics never answered while the exporter caught up: nothing to compare")
        failed |= not r["exact"] or r["poll_errors"] > 0
        failed |= r["healthz_answered"] < r["healthz_asked"]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
