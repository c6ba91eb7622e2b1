"""Run the tests with the process clock moved to instants spread over a week (Debian `faketime`).

No test may depend on the wall clock or the hour of the week: every simulator starts at an
instant its test chooses. This proves it by running pytest under `faketime` at each instant below
(weekday and weekend, day and night, either side of midnight UTC, across a DST change in a local
time zone), every process the tests start included.

    .venv/bin/python -m tests.clock_sweep              # the whole suite (slow tests too) at each
    .venv/bin/python -m tests.clock_sweep --reduced    # poller, crash and fault tests, 2 instants
    .venv/bin/python -m tests.clock_sweep -- -k skew   # extra arguments go to pytest
    .venv/bin/python -m tests.clock_sweep --at "2026-12-05 03:00:00" --repeat 5
    .venv/bin/python -m tests.clock_sweep --now --repeat 5   # the real clock, five times

At each instant the fast set runs as `pytest -q` does (two workers), then the slow set one test
at a time, as `.ci/run` runs them.

Go programs the tests start (prometheus, promtool) read the real clock: faketime works by
preloading into dynamically linked programs, so they serve as an outside clock.
Exit status: 0 when every run passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Instant:
    when: str | None  # UTC, as `faketime` reads it; None: the real clock
    tz: str  # the local time zone of the run
    why: str


INSTANTS: tuple[Instant, ...] = (
    Instant("2026-12-01 14:00:00", "UTC", "Tuesday afternoon"),
    Instant("2026-12-05 03:00:00", "UTC", "Saturday night"),
    Instant("2026-12-06 23:59:30", "UTC", "Sunday, just before midnight"),
    Instant("2026-12-07 00:00:20", "UTC", "Monday, just after midnight"),
    Instant("2026-12-04 07:30:00", "UTC", "Friday morning"),
    Instant("2027-03-28 00:59:40", "Europe/Berlin", "Sunday, 20 s before Berlin's clocks spring"),
    Instant("2027-03-14 06:59:50", "America/New_York", "before New York's DST change, Sunday"),
)
# The reduced sweep in `.ci/run`: the two instants furthest apart in the hour of the week.
REDUCED = (INSTANTS[0], INSTANTS[2])
REDUCED_TESTS = ("tests/test_poller.py", "tests/test_crash.py", "tests/test_faults.py")


EXIT_NO_TESTS = 5  # pytest's status when the selection holds no test (no slow test named)


def run(instant: Instant, pytest_args: list[str]) -> tuple[int, float]:
    """The fast set, then the slow set, under faketime at `instant`: exit status, seconds."""
    status, seconds = pytest_at(instant, pytest_args)
    slow, more = pytest_at(instant, ["-m", "slow", "-n", "0", *pytest_args])
    return status or (0 if slow == EXIT_NO_TESTS else slow), seconds + more


def pytest_at(instant: Instant, pytest_args: list[str]) -> tuple[int, float]:
    """pytest under faketime at `instant`; its exit status and wall seconds."""
    env = {**os.environ, "TZ": instant.tz}
    fake = [] if instant.when is None else ["faketime", f"{instant.when} UTC"]
    # -rf names every failed test in the summary, so one failure in many runs is never lost.
    pytest = [str(Path(sys.executable)), "-m", "pytest", "-q", "-rf", "-p", "no:cacheprovider"]
    command = [*fake, *pytest, *pytest_args]
    started = time.monotonic()
    status = subprocess.run(command, cwd=ROOT, env=env, check=False).returncode
    return status, time.monotonic() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--reduced", action="store_true", help="poller, crash and fault tests at two instants"
    )
    parser.add_argument("--at", action="append", metavar="WHEN", help="this UTC instant instead")
    parser.add_argument("--now", action="store_true", help="the real clock instead (no faketime)")
    parser.add_argument("--repeat", type=int, default=1, metavar="N", help="each instant N times")
    parser.add_argument("pytest_args", nargs="*", help="after --: arguments for pytest")
    args = parser.parse_args(argv)
    if not args.now and shutil.which("faketime") is None:
        print("clock_sweep: faketime not found (Debian package faketime)", file=sys.stderr)
        return 1
    if args.now:
        instants: tuple[Instant, ...] = (Instant(None, "UTC", "the real clock"),)
    elif args.at:
        instants = tuple(Instant(when, "UTC", "chosen") for when in args.at)
    else:
        instants = REDUCED if args.reduced else INSTANTS
    instants = tuple(instant for instant in instants for _ in range(max(1, args.repeat)))
    pytest_args = [*(REDUCED_TESTS if args.reduced else ()), *args.pytest_args]
    results = []
    for instant in instants:
        print(f"== {instant.when or 'now'} UTC ({instant.tz}): {instant.why}", flush=True)
        status, seconds = run(instant, pytest_args)
        results.append((instant, status, seconds))
    print("\nclock sweep:")
    for instant, status, seconds in results:
        verdict = "passed" if status == 0 else f"FAILED (pytest exit {status})"
        when = instant.when or "now"
        print(f"  {when} UTC {instant.tz:<17} {verdict:<24} {seconds:5.0f} s {instant.why}")
    return 0 if all(status == 0 for _, status, _ in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
