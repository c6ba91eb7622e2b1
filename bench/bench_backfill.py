"""The back-fill of a 2,000-item server: export, peak memory, promtool, blocks, and a year.

Run: ``.venv/bin/python -m bench.bench_backfill`` (``--help`` for sizes; the default, a week of a
busy and of a typical 2,000-item server, takes about four minutes on 2 cores; the
busy level is the catch-up bench's server: ``--days 30 --levels busy`` is its month, 1M events).

For each traffic level, against the simulator in its own process (its clock paused, so every
reader sees the same events):

1. The bare loop: a sequential cursor walk of both streams from 30 days before the origin that
   only parses the JSON (the limit any reader of the API meets).
2. ``connect-usage-exporter backfill`` as a user runs it before any first start, in its own
   process: wall time, peak RSS (``wait4``), samples and file size.
3. ``promtool tsdb create-blocks-from openmetrics`` with the block duration the command
   suggests: wall time and the blocks' size on disk.

The samples of a week scale with the days: the last rows project a year from the week's
samples per day and the measured export and promtool rates (a projection, said so).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.bench_exporter import Row, log, print_table, sim_config  # noqa: E402
from bench.common import DAY, SimProcess, bare_walk  # noqa: E402

NOW = 1_750_000_000.0
LEVELS = {"busy": 1_000_000 / 30, "typical": 25_000 / 7}  # events a day on 2,000 items


@dataclass
class Run:
    events: int
    samples: int
    export_s: float
    bare_s: float
    bare_records: int
    peak_mb: float
    file_bytes: int
    promtool_s: float
    blocks_bytes: int
    load: str


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def measure(args: argparse.Namespace, events: int) -> Run:
    config = sim_config(args, events, args.content, args.users)
    with SimProcess(config, now=NOW) as sim, tempfile.TemporaryDirectory() as tmp:
        sim.control("POST", "clock", {"pause": True})
        start = NOW - args.days * DAY - 30 * DAY  # the back-fill reads 30 days before the origin
        records, _requests, bare_s = bare_walk(sim.url, sim.key, start)
        out = Path(tmp) / "history.om"
        env = {k: v for k, v in os.environ.items() if not k.startswith("CONNECT_")}
        env.update(
            CONNECT_SERVER=sim.url,
            CONNECT_API_KEY=sim.key,
            CONNECT_EXPORTER_STATE_PATH=str(Path(tmp) / "none.sqlite"),
            CONNECT_EXPORTER_HISTORY_DAYS=str(args.days),
        )
        command = [sys.executable, "-m", "exporter", "backfill", "--output", str(out)]
        command += ["--instance", "exporter:9741", "--step", str(args.step)]
        t0 = time.perf_counter()
        proc = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
        _pid, status, usage = os.wait4(proc.pid, 0)
        export_s = time.perf_counter() - t0
        assert proc.stderr is not None
        report = proc.stderr.read()
        if status != 0:
            raise SystemExit(f"backfill failed:\n{report}")
        lines = report.splitlines()
        log(lines[0])
        words = lines[0].split()
        load = lines[-1].removeprefix("load it: ").removesuffix(" <prometheus data directory>")
        blocks = Path(tmp) / "data"
        promtool = shutil.which("promtool") or "/usr/bin/promtool"
        t1 = time.perf_counter()
        subprocess.run(
            [promtool, *load.split()[1:], str(blocks)], check=True, stdout=subprocess.DEVNULL
        )
        promtool_s = time.perf_counter() - t1
        log(f"export {export_s:.1f} s, promtool {promtool_s:.1f} s")
        return Run(
            events=int(words[4].replace(",", "")),
            samples=int(words[1].replace(",", "")),
            export_s=export_s,
            bare_s=bare_s,
            bare_records=records,
            peak_mb=usage.ru_maxrss / 1024,
            file_bytes=out.stat().st_size,
            promtool_s=promtool_s,
            blocks_bytes=_du(blocks),
            load=load.split()[4],
        )


def rows_of(name: str, run: Run, days: float) -> list[Row]:
    per_day = run.samples / days
    year = per_day * 365
    export_rate = run.samples / run.export_s
    promtool_rate = run.samples / run.promtool_s
    return [
        Row(
            f"{name}: export, {run.events:,} events, {days:g} days",
            f"{run.export_s:.1f} s",
            f"bare loop {run.bare_s:.1f} s ({run.bare_records:,} records)",
            f"{run.events / run.export_s:,.0f} ev/s",
            "",
            None,
        ),
        Row(
            f"{name}: export peak RSS",
            f"{run.peak_mb:.0f} MB",
            "",
            "",
            "<= 200 MB",
            run.peak_mb <= 200,
        ),
        Row(
            f"{name}: samples; OpenMetrics file",
            f"{run.samples:,}",
            f"{run.file_bytes / 1e6:,.0f} MB",
            f"{run.samples / max(run.events, 1):.0f} per event",
            "",
            None,
        ),
        Row(
            f"{name}: promtool ({run.load}); blocks",
            f"{run.promtool_s:.1f} s",
            f"{run.blocks_bytes / 1e6:.1f} MB on disk",
            f"{promtool_rate:,.0f} samples/s",
            "",
            None,
        ),
        Row(
            f"{name}: a year, projected from {days:g} days",
            f"{year / 1e6:,.0f} M samples",
            f"{run.file_bytes / days * 365 / 1e9:,.0f} GB file, "
            f"{run.blocks_bytes / days * 365 / 1e6:,.0f} MB blocks",
            f"{(year / export_rate + year / promtool_rate) / 60:,.0f} min end to end",
            "",
            None,
        ),
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--levels", nargs="+", choices=sorted(LEVELS), default=list(LEVELS))
    p.add_argument("--content", type=int, default=2_000)
    p.add_argument("--users", type=int, default=20_000)
    p.add_argument("--days", type=float, default=7)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--step", type=int, default=60)
    args = p.parse_args(argv)
    rows: list[Row] = []
    for name in args.levels:
        events = round(LEVELS[name] * args.days)
        log(f"{name}: {events:,} events over {args.days:g} days, {args.content:,} items")
        rows += rows_of(name, measure(args, events), args.days)
    print_table(rows)
    return 0 if all(r.met is not False for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
