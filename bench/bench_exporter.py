"""The exporter against the limit and the peer: catch-up, latency, memory, steady state.

Run: ``.venv/bin/python -m bench.bench_exporter`` (``--help`` for sizes; the default takes about
seven minutes on 2 cores). Every figure is a ratio of two measurements taken in this one run on
this machine, so the table travels between machines better than absolute numbers do. The
catch-up and latency pairs alternate ``--repeat`` times (3) and their figures are medians: a
shared machine's speed drifts by 10-20% over minutes, which one pair of runs can straddle.

1. Catch-up: the exporter's first start (it walks from Connect's now - 30 d) against a simulator
   in a subprocess, vs a bare httpx loop over the same pages that only parses the JSON (the limit)
   and vs posit-sdk's ``client.metrics.usage.find()`` (the peer). Events are the records the API
   returns for the range, counted the same way for all three.
2. Latency-bound catch-up: 20 ms added to every API request; a restart after 30 days of downtime
   (so every event counts) vs a sequential cursor walk of the same range; the counters are then
   compared with the simulator's truth, exactly.
3. Memory: peak RSS of a fresh exporter process through load and the first walk, then the
   metadata and two scrapes, a restart on that state, the real ``run`` command scraped every
   5 s from its start, and the RSS growth per tracked (content, user) pair.
4. Steady state: the clock steps by the poll interval (default 60 s) at ~100 events/s; CPU
   seconds per poll and API requests per poll, busy and idle.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import (  # noqa: E402
    DAY,
    SimProcess,
    bare_walk,
    run_exporter,
    run_service,
    sdk_walk,
)

NOW = 1_750_000_000.0


@dataclass
class Row:
    """One line of the table."""

    figure: str
    value: str
    against: str
    ratio: str
    target: str
    met: bool | None


def sim_config(args: argparse.Namespace, events: int, content: int, users: int) -> dict[str, Any]:
    per_day = events / args.days
    return {
        "seed": args.seed,
        "content": content,
        "users": users,
        "history_days": args.days,
        "sessions_per_day": per_day * 0.3,
        "visits_per_day": per_day * 0.7,
    }


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _median(values: list[float]) -> float:
    return statistics.median(values)


def ours(args: argparse.Namespace, job: dict[str, Any], checkout: Path | None) -> dict[str, Any]:
    """This checkout's job with `--history-days`, `--top-viewers`, `--top-users`, `--hits` (a
    baseline takes the job as it is)."""
    if checkout is not None:
        return job
    settings = {
        **job.get("settings", {}),
        "history_days": args.history_days,
        # Hits repeat the sessions and visits: off unless asked, so a side-by-side run does
        # the work a baseline from before hits does.
        "hits_enabled": args.hits,
    }
    for name in ("top_viewers", "top_users"):
        if getattr(args, name) is not None:
            settings[name] = getattr(args, name)
    return {**job, "settings": settings}


def contenders(args: argparse.Namespace) -> list[tuple[str, Path | None]]:
    """This checkout, and the `--baseline` checkout when given (run side by side)."""
    return [("exporter", None)] + ([("baseline", args.baseline)] if args.baseline else [])


def catchup(args: argparse.Namespace) -> list[Row]:
    config = sim_config(args, args.events, args.content, args.users)
    bare_times: list[float] = []
    times: dict[str, list[float]] = {name: [] for name, _ in contenders(args)}
    with SimProcess(config, now=NOW) as sim:
        log(f"catch-up: simulator generated in {sim.generation_s:.1f} s")
        start = NOW - 30 * DAY
        # They alternate, `--repeat` times, and each figure is the median of its runs: this
        # machine's speed drifts by 10-20% over minutes, which a single pair straddles.
        for run in range(args.repeat):
            records, requests, bare_s = bare_walk(sim.url, sim.key, start)
            log(f"bare loop: {records} records, {requests} requests, {bare_s:.1f} s")
            bare_times.append(bare_s)
            for name, checkout in contenders(args):
                job = {"mode": "catchup", "url": sim.url, "key": sim.key, "profile": args.profile}
                exp = run_exporter(ours(args, job, checkout), checkout)
                log(
                    f"{name}: {exp['seconds']:.1f} s, {exp['requests']} requests, "
                    f"cpu {exp['cpu']:.1f} s (run {run + 1}: {bare_s / exp['seconds']:.2f}x)"
                )
                times[name].append(exp["seconds"])
        if args.skip_sdk:
            sdk_n, sdk_s = records, float("nan")
        else:
            sdk_n, sdk_s = sdk_walk(sim.url, sim.key, start)
            log(f"posit-sdk: {sdk_n} events, {sdk_s:.1f} s")
    if sdk_n != records:
        log(f"WARNING: posit-sdk saw {sdk_n} events, the bare loop {records}")
    bare_rate, sdk_rate = records / _median(bare_times), records / sdk_s
    runs = f" (median of {args.repeat})" if args.repeat > 1 else ""
    rows = []
    for name, _ in contenders(args):
        rate = records / _median(times[name])
        each = ", ".join(f"{b / t:.2f}" for b, t in zip(bare_times, times[name], strict=True))
        rows += [
            Row(
                f"catch-up, {records:,} events: {name} vs bare httpx+json loop{runs}",
                f"{rate:,.0f} ev/s",
                f"{bare_rate:,.0f} ev/s",
                f"{rate / bare_rate:.2f}x (runs {each})",
                ">= 0.8x",
                rate / bare_rate >= 0.8,
            ),
            Row(
                f"catch-up: {name} vs posit-sdk usage.find()",
                f"{rate:,.0f} ev/s",
                f"{sdk_rate:,.0f} ev/s",
                f"{rate / sdk_rate:.2f}x",
                ">= 3x",
                rate / sdk_rate >= 3,
            ),
        ]
    return rows


def latency(args: argparse.Namespace) -> list[Row]:
    config = sim_config(args, args.latency_events, args.content, args.users)
    config["history_days"] = 0.05  # the epoch is fixed near the start of the data
    down = args.days * DAY
    t0 = NOW - down
    times: dict[str, list[float]] = {name: [] for name, _ in contenders(args)}
    truths: dict[str, dict[str, Any]] = {}
    seq_times: list[float] = []
    exact = {name: True for name, _ in contenders(args)}  # each contender's, every run
    for run in range(args.repeat):
        for name, checkout in contenders(args):
            with SimProcess(config, now=t0) as sim:  # a new one each run: the job moves its clock
                sim.control("POST", "faults", {"latency": args.latency})
                job = {"mode": "catchup", "url": sim.url, "key": sim.key, "load_at": down}
                exp = run_exporter(ours(args, {**job, "truth": True}, checkout), checkout)
                log(f"latency: {name} {exp['seconds']:.1f} s, {exp['requests']} requests")
                if name == "exporter":
                    # The same range the exporter read: from its first walk start (epoch - 30 d).
                    records, requests, seq_s = bare_walk(sim.url, sim.key, t0 - 30 * DAY)
                    log(
                        f"latency: sequential walk {records} records, {requests} requests, "
                        f"{seq_s:.1f} s (run {run + 1}: {exp['seconds'] / seq_s:.2f}x)"
                    )
                    seq_times.append(seq_s)
            truths[name] = exp["truth"]
            exact[name] = exact[name] and bool(exp["truth"]["exact"])
            times[name].append(exp["seconds"])
    seq_s = _median(seq_times)
    runs = f" (median of {args.repeat})" if args.repeat > 1 else ""
    rows = []
    for name, _ in contenders(args):
        exp_s = _median(times[name])
        ratio = exp_s / seq_s
        truth = truths[name]
        rows += [
            Row(
                f"latency {args.latency * 1000:.0f} ms/request, {records:,} events: {name} "
                f"backfill time vs sequential cursor walk{runs}",
                f"{exp_s:.1f} s",
                f"{seq_s:.1f} s",
                f"{ratio:.2f}x",
                "<= 0.25x",
                ratio <= 0.25,
            ),
            Row(
                f"  {name}: exactly-once after every concurrent backfill (counters == truth)",
                f"{truth['sessions']:,} sessions, {truth['visits']:,} visits",
                f"{truth['truth_sessions']:,}, {truth['truth_visits']:,}",
                "exact" if truth["exact"] else f"DIFFERS {truth['checks']}",
                "exact",
                exact[name],
            ),
        ]
    return rows


def memory(args: argparse.Namespace) -> list[Row]:
    config = sim_config(args, args.mem_events, args.mem_content, args.mem_users)
    rows = []
    with SimProcess(config, now=NOW) as sim:
        log(f"memory: simulator generated in {sim.generation_s:.1f} s")
        for name, checkout in contenders(args):
            job = {"mode": "catchup", "url": sim.url, "key": sim.key, "serve": True}
            with tempfile.TemporaryDirectory(prefix="bench-memory-") as state_dir:
                if checkout is None:
                    job["state_dir"] = state_dir
                exp = run_exporter(ours(args, job, checkout), checkout)
                # A restart on the state file the catch-up wrote: load it, poll, serve.
                again = (
                    run_exporter(ours(args, job, checkout), checkout) if checkout is None else None
                )
            peak_mb = exp["peak_rss_kb"] / 1024
            base_mb = exp["base_rss_kb"] / 1024
            per_pair = (exp["rss_kb"] - exp["base_rss_kb"]) * 1024 / max(1, exp["pairs"])
            served = exp.get("served_peak_rss_kb", exp["peak_rss_kb"]) / 1024
            rows += [
                Row(
                    f"{name}: peak RSS, {args.mem_content:,} content / {args.mem_users:,} users "
                    f"/ {args.mem_events:,} events: the catch-up",
                    f"{peak_mb:.0f} MB",
                    f"{base_mb:.0f} MB at start",
                    f"{peak_mb / 200:.2f}x of 200 MB",
                    "report",
                    None,
                ),
                Row(
                    f"  {name}: then metadata and two scrapes (OpenMetrics, gzip; "
                    f"{exp.get('exposition_bytes', 0) / 1e6:.1f} MB plain, "
                    f"{exp.get('gzip_bytes', 0) / 1e6:.1f} MB gzip)",
                    f"{served:.0f} MB",
                    f"{exp.get('served_rss_kb', 0) / 1024:.0f} MB after",
                    f"{served / 200:.2f}x of 200 MB",
                    "<= 200 MB",
                    served <= 200,
                ),
            ]
            if again is not None:
                restarted = again["served_peak_rss_kb"] / 1024
                rows.append(
                    Row(
                        f"  {name}: a restart on that state: load, poll, metadata, two scrapes",
                        f"{restarted:.0f} MB",
                        f"{again['served_rss_kb'] / 1024:.0f} MB after",
                        f"{restarted / 200:.2f}x of 200 MB",
                        "<= 200 MB",
                        restarted <= 200,
                    )
                )
            if checkout is None:
                real = run_service(
                    sim.url,
                    sim.key,
                    {k: v for k, v in ours(args, {}, None)["settings"].items() if v is not None},
                )
                rows.append(
                    Row(
                        f"  {name}: the real `run` command on a fresh state file, scraped every"
                        f" 5 s from its start (counters shown at {real['counters_s']:.0f} s, "
                        f"metadata at {real['metadata_s']:.0f} s)",
                        f"{real['peak_rss_kb'] / 1024:.0f} MB",
                        f"{real['rss_kb'] / 1024:.0f} MB after",
                        f"{real['peak_rss_kb'] / 1024 / 200:.2f}x of 200 MB",
                        "<= 200 MB",
                        real["peak_rss_kb"] / 1024 <= 200,
                    ),
                )
                gzip_ms, plain_ms = real["scrape_ms"]["gzip"], real["scrape_ms"]["plain"]
                rows.append(
                    Row(
                        f"  {name}: a cached scrape of its exposition, gzip / plain "
                        f"({real['bytes']['gzip'] / 1e6:.1f} / {real['bytes']['plain'] / 1e6:.1f}"
                        " MB; median of 5)",
                        f"{gzip_ms:.1f} / {plain_ms:.0f} ms",
                        f"peak {real['scraped_peak_rss_kb'] / 1024:.0f} MB after",
                        f"{gzip_ms / 100:.2f}x of 100 ms",
                        "< 100 ms (gzip)",
                        gzip_ms < 100,
                    )
                )
                log("the real command's exposition, by family (samples, plain bytes):")
                families = sorted(real["families"].items(), key=lambda f: -f[1][1])
                for family, (samples, size) in families:
                    log(f"  {family}: {samples:,} samples, {size / 1e6:.2f} MB")
            rows += [
                Row(
                    f"  {name}: RSS growth per tracked (content, user) pair "
                    f"({exp['pairs']:,} pairs, {exp['users']:,} users)",
                    f"{per_pair:.0f} B",
                    "",
                    "",
                    "report",
                    None,
                ),
            ]
    return rows


def steady(args: argparse.Namespace) -> list[Row]:
    per_day = args.rate * DAY
    config = {
        "seed": args.seed,
        "content": args.content,
        "users": args.users,
        "history_days": 1 / 24,
        "sessions_per_day": per_day * 0.3,
        "visits_per_day": per_day * 0.7,
        "bucket_seconds": 60,
    }
    rows = []
    for name, checkout in contenders(args):
        with SimProcess(config, now=NOW) as sim:
            job = {
                "mode": "steady",
                "url": sim.url,
                "key": sim.key,
                "step": args.poll_interval,
                "polls": args.polls,
            }
            exp = run_exporter(ours(args, job, checkout), checkout)
        busy_cpu = statistics.median(c for c, _r, _n in exp["busy"])
        busy_req = statistics.median(r for _c, r, _n in exp["busy"])
        busy_new = statistics.median(n for _c, _r, n in exp["busy"])
        idle_cpu = statistics.median(c for c, _r in exp["idle"])
        idle_req = statistics.median(r for _c, r in exp["idle"])
        interval = args.poll_interval
        rows += [
            Row(
                f"{name}: steady state, {args.rate:g} ev/s, poll every {interval:g} s: "
                "CPU per poll",
                f"{busy_cpu * 1000:.0f} ms ({busy_new:.0f} new ev)",
                f"{interval:g} s interval",
                f"{busy_cpu / interval:.4f} of a core",
                "report",
                None,
            ),
            Row(
                f"  {name}: API requests per busy poll / per idle poll (no new events)",
                f"{busy_req:.0f} / {idle_req:.0f}",
                f"idle CPU {idle_cpu * 1000:.0f} ms",
                "",
                "report",
                bool(exp["truth"]["exact"]),
            ),
        ]
    return rows


def print_table(rows: list[Row]) -> None:
    headers = ("figure", "exporter", "against", "ratio", "target", "met")
    met = {True: "yes", False: "NO", None: "-"}
    cells = [(r.figure, r.value, r.against, r.ratio, r.target, met[r.met]) for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))
    print(line)
    print("-" * len(line))
    for cell in cells:
        print("  ".join(c.ljust(w) for c, w in zip(cell, widths, strict=True)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--events", type=int, default=1_000_000, help="catch-up events (30 days)")
    p.add_argument("--content", type=int, default=2_000)
    p.add_argument("--users", type=int, default=20_000)
    p.add_argument("--days", type=float, default=30)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--latency", type=float, default=0.02, help="seconds added per API request")
    p.add_argument("--latency-events", type=int, default=1_000_000)
    p.add_argument("--mem-events", type=int, default=1_000_000)
    p.add_argument("--mem-content", type=int, default=10_000)
    p.add_argument("--mem-users", type=int, default=100_000)
    p.add_argument("--rate", type=float, default=100.0, help="steady-state events per second")
    p.add_argument("--poll-interval", type=float, default=60.0)
    p.add_argument("--polls", type=int, default=5)
    p.add_argument(
        "--repeat",
        type=int,
        default=3,
        help="alternating runs of the catch-up and latency pairs; figures are medians",
    )
    p.add_argument(
        "--history-days",
        type=float,
        default=0,
        help="this checkout's CONNECT_EXPORTER_HISTORY_DAYS: 0 counts from the first start, as "
        "a baseline from before the history origin does; 30 (the service's default) also counts "
        "the month into the counters",
    )
    p.add_argument(
        "--top-viewers",
        type=int,
        help="this checkout's CONNECT_EXPORTER_TOP_VIEWERS (default: the service's); 0 with "
        "--top-users 0 does the work a baseline from before viewers does",
    )
    p.add_argument("--top-users", type=int, help="this checkout's CONNECT_EXPORTER_TOP_USERS")
    p.add_argument(
        "--hits",
        action="store_true",
        help="this checkout reads the hits stream too (Connect 2025.04)",
    )
    p.add_argument("--skip-sdk", action="store_true", help="no posit-sdk run (slow)")
    p.add_argument("--profile", help="write a pyinstrument profile of the catch-up here")
    p.add_argument(
        "--baseline",
        type=Path,
        help="another checkout (with its own .venv) whose exporter runs every job side by side",
    )
    p.add_argument(
        "--only",
        nargs="*",
        choices=("catchup", "latency", "memory", "steady"),
        default=("catchup", "latency", "memory", "steady"),
    )
    args = p.parse_args(argv)
    rows: list[Row] = []
    for name, figure in (
        ("catchup", catchup),
        ("latency", latency),
        ("memory", memory),
        ("steady", steady),
    ):
        if name in args.only:
            rows.extend(figure(args))
    print_table(rows)
    return 0 if all(r.met is not False for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
