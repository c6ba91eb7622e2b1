"""Crash safety: SIGKILL at random moments, a full disk, a read-only state directory.

The exporter runs as the real `run` subprocess. Killed at ≥ 20 random moments across catch-up
(a 30-day history, and outages of hours between some restarts) and steady state (Connect's
clock runs 60x), then finished with `run --once` on a paused clock: every counter and every
histogram bucket equals the simulator's truth, nothing lost, nothing doubled. A disk that fills
up while the service runs (a tiny tmpfs) costs no correctness: the commit is refused, the error
is logged and counted, /metrics keeps answering, and when space returns the totals are exact.
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import re
import shutil
import signal
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from exporter.model import DURATION_BUCKETS
from exporter.simulator import SimConfig, SimServer, Simulator
from exporter.simulator.store import NO_END
from exporter.store import SqliteStore
from tests.support import (
    FAR_FUTURE,
    TUESDAY_AFTERNOON,
    log_lines,
    metrics_url_from_log,
    scrape_until,
    terminate,
)
from tests.support import run_once as once
from tests.test_cli import (
    EXE,
    assert_exposition_matches_truth,
    by_content,
    env_for,
    parse,
    start_service,
    wait_ready,
)

# The real `run` in subprocesses, killed or starved of disk: deselected by default (`-m slow`).
pytestmark = pytest.mark.slow

US = 1_000_000
NO_ABANDON = ("--max-session-age", "1e9")  # no session is closed by age: the truth has none


# --- the truth of every histogram bucket ----------------------------------------------------


def truth_buckets(sim: Simulator, since: float) -> dict[str, list[int]]:
    """Cumulative duration bucket counts per content, from the simulator's own sessions."""
    now_us = int(sim.clock.now() * US)
    sim.truth(since, FAR_FUTURE)  # tops the generated traffic up to the clock
    s = sim.shiny
    names = sim.content_ids.values
    since_us = int(since * US)
    counts: dict[str, list[int]] = {}
    for p in range(len(s)):
        ended = s.ended[p]
        if ended == NO_END or s.written[p] > now_us or not since_us <= ended <= now_us:
            continue
        seconds = (ended - s.t[p]) / US
        index = next(
            (i for i, b in enumerate(DURATION_BUCKETS) if seconds <= b), len(DURATION_BUCKETS)
        )
        row = counts.setdefault(names[s.content[p]], [0] * (len(DURATION_BUCKETS) + 1))
        row[index] += 1
    return {g: [sum(row[: i + 1]) for i in range(len(row))] for g, row in counts.items()}


def exposed_buckets(text: str) -> dict[str, list[int]]:
    samples = parse(text).get("connect_usage_shiny_session_duration_seconds_bucket", {})
    rows: dict[str, dict[float, int]] = {}
    for labels, value in samples.items():
        d = dict(labels)
        rows.setdefault(d["content_guid"], {})[float(d["le"])] = int(value)
    return {g: [row[b] for b in sorted(row)] for g, row in rows.items() if row[float("inf")]}


def assert_every_counter_and_histogram_exact(text: str, sim: Simulator) -> None:
    assert_exposition_matches_truth(text, sim)  # sessions, visits, duration count/sum, synthetic
    m = parse(text)
    since = next(iter(m["connect_usage_counting_since_timestamp_seconds"].values()))
    assert exposed_buckets(text) == truth_buckets(sim, since)
    assert sum(m.get("connect_usage_shiny_sessions_abandoned_total", {}).values()) == 0
    malformed = [
        v
        for labels, v in m["connect_usage_excluded_events_total"].items()
        if dict(labels)["reason"] == "malformed"
    ]
    assert sum(malformed) == 0


# --- SIGKILL at random moments --------------------------------------------------------------


@pytest.fixture
def busy_connect() -> Iterator[tuple[Simulator, str]]:
    """30 days of history (a first walk of ~450k records, ~9 s) and a clock running 60x."""
    sim = Simulator(
        SimConfig(seed=41, content=40, users=150, history_days=30, sessions_per_day=3000,
                  visits_per_day=12000, clock_speed=60.0),
        now=TUESDAY_AFTERNOON,
    )  # fmt: skip
    server = SimServer(sim)
    url = server.start()
    try:
        yield sim, url
    finally:
        server.stop()


def is_ready(metrics: str) -> bool:
    try:
        return httpx.get(metrics.replace("/metrics", "/readyz"), timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


# Three streams (hits too) through 24 starts, a month's first walk and ten 3-day catch-ups at
# 30 ms a request: about 4 minutes on 2 loaded cores, beyond the suite's 300 s default.
@pytest.mark.timeout(900)
def test_sigkill_at_24_random_moments_of_catchup_and_steady_state_loses_nothing(
    busy_connect: tuple[Simulator, str], tmp_path: Path
) -> None:
    sim, url = busy_connect
    key = sim.keys["admin"]
    state = tmp_path / "s.sqlite"
    rng = random.Random(20261126)
    phases: list[str] = []
    for round_ in range(24):
        first_walk = round_ < 4  # the 30-day first walk, resumed from its last committed page
        steady = not first_walk and round_ % 2 == 1
        if not first_walk and not steady:
            sim.clock.advance(3 * 86400)  # an outage: the next start catches up in slices
        # Catch-ups with 30 ms per request: their length is set by round trips, not by this
        # machine's speed, so the random kills land inside them on fast and slow machines.
        if steady:
            sim.faults.clear()
        else:
            sim.faults.configure({"latency": 0.03})
        proc, metrics = start_service(url, key, state, *NO_ABANDON)
        try:
            if steady:  # after the first complete poll of every stream
                wait_ready(metrics)
                time.sleep(rng.uniform(0.0, 1.0))
            else:
                time.sleep(rng.uniform(0.5, 3.0) if first_walk else rng.uniform(0.1, 1.2))
            phases.append("steady" if is_ready(metrics) else "catch-up")
        finally:
            proc.kill()
            proc.wait(timeout=10)
    assert phases.count("catch-up") >= 8, phases
    assert phases.count("steady") >= 8, phases
    sim.faults.clear()
    sim.clock.pause()
    out = tmp_path / "final.prom"
    final = subprocess.run(
        [*EXE, "run", "--once", "--output", str(out), *NO_ABANDON],
        env=env_for(url, key, CONNECT_EXPORTER_STATE_PATH=str(state)),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert final.returncode == 0, final.stderr
    text = out.read_text()
    assert_every_counter_and_histogram_exact(text, sim)
    m = parse(text)
    assert sum(m["connect_usage_shiny_sessions_total"].values()) > 100
    assert sum(m["connect_usage_content_visits_total"].values()) > 100


# --- a full disk and a read-only state directory -------------------------------------------


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A small filesystem of its own (the tests run as root); skipped where mounting is refused."""
    path.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(directory: Path) -> Path:
    """Write until the filesystem has no byte left; returns the filler file."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (65536, 4096, 1):
            with contextlib.suppress(OSError):
                while os.write(fd, b"\0" * size):
                    pass
        with pytest.raises(OSError) as full:
            os.write(fd, b"\0")
        assert full.value.errno == errno.ENOSPC
    finally:
        os.close(fd)
    return filler


def db_counters(original: Path) -> dict[tuple[str, str], int]:
    """The counters a fresh start would restore, after checking the file is sound.

    Read from a copy (with its WAL, if any) off the test filesystem: SQLite cannot open a WAL
    database on a read-only filesystem at all, and a check must not change what it checks.
    """
    copies = original.parent.parent / "checked"
    copies.mkdir(exist_ok=True)
    path = copies / original.name
    for suffix in ("", "-wal"):
        source = Path(f"{original}{suffix}")
        target = Path(f"{path}{suffix}")
        target.unlink(missing_ok=True)
        if source.exists():
            shutil.copyfile(source, target)
    Path(f"{path}-shm").unlink(missing_ok=True)
    db = sqlite3.connect(path)
    try:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    finally:
        db.close()
    store = SqliteStore(path)
    try:
        state = store.load()
    finally:
        store.close()
    assert state is not None
    return dict(state.counters)


def exposed_totals(text: str) -> tuple[float, float]:
    m = parse(text)
    return (
        sum(m.get("connect_usage_shiny_sessions_total", {}).values()),
        sum(m.get("connect_usage_content_visits_total", {}).values()),
    )


@pytest.fixture
def paused_connect() -> Iterator[tuple[Simulator, str]]:
    sim = Simulator(
        SimConfig(seed=43, content=20, users=60, history_days=2), now=TUESDAY_AFTERNOON, paused=True
    )
    server = SimServer(sim)
    url = server.start()
    try:
        yield sim, url
    finally:
        server.stop()


def wait_metric(metrics: str, pattern: str, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    body = ""
    while time.monotonic() < deadline:
        body = httpx.get(metrics, timeout=5).text
        if re.search(pattern, body, re.MULTILINE):
            return body
        time.sleep(0.1)
    raise AssertionError(f"{pattern!r} never matched /metrics:\n{body}")


def test_a_full_disk_is_reported_served_through_and_recovered_exactly(
    paused_connect: tuple[Simulator, str], tmp_path: Path
) -> None:
    sim, url = paused_connect
    with tmpfs(tmp_path / "disk", "2m") as disk:
        state = disk / "s.sqlite"
        proc, metrics = start_service(url, sim.keys["admin"], state, *NO_ABANDON)
        assert proc.stdout is not None
        try:
            wait_ready(metrics)
            filler = fill(disk)
            sim.clock.advance(6 * 3600)  # new traffic that cannot all be committed
            body = wait_metric(metrics, r"^connect_usage_state_errors_total [1-9]")
            # Still serving. A batch may still fit in WAL space SQLite reuses, so some of the
            # new traffic can be in; what is served never exceeds the truth (nothing doubled).
            m = parse(body)
            since = next(iter(m["connect_usage_counting_since_timestamp_seconds"].values()))
            truth = sim.truth(since, FAR_FUTURE)
            served = by_content(m.get("connect_usage_content_visits_total", {}))
            assert all(n <= truth["visits"].get(g, 0) for g, n in served.items()), served
            os.remove(filler)  # space returns: the next polls commit everything
            sim.truth(0, FAR_FUTURE)
            body = scrape_until(metrics, lambda m: assert_every_counter_and_histogram_exact(m, sim))
        finally:
            proc.send_signal(signal.SIGTERM)
            output, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, output
        # One ERROR per refused commit, and nothing else: no "failed unexpectedly" traceback.
        errors = [line for line in output.splitlines() if " ERROR " in line]
        assert errors, output
        assert all(
            re.search(r"cannot commit to the state file .*s\.sqlite: database or disk is full", e)
            for e in errors
        ), output
        assert len(errors) == parse(body)["connect_usage_state_errors_total"][()]
        assert "unexpectedly" not in output and "Traceback" not in output, output
        counters = db_counters(state)
        assert (
            sum(v for (name, _), v in counters.items() if name == "content_visits")
            == (exposed_totals(body)[1])
        )


def test_a_state_file_deleted_under_the_service_is_said_once_and_its_counts_kept(
    paused_connect: tuple[Simulator, str], tmp_path: Path
) -> None:
    # `rm state.sqlite*` while `run` was up: no warning, commits went on into the deleted file,
    # and the next start silently counted from zero.
    sim, url = paused_connect
    state = tmp_path / "state" / "s.sqlite"
    log = tmp_path / "service.log"
    env = env_for(url, sim.keys["admin"], CONNECT_EXPORTER_STATE_PATH=str(state))
    args = ["run", "--listen-address", "127.0.0.1:0", "--poll-interval", "0.3", *NO_ABANDON]
    with log.open("wb") as out:
        proc = subprocess.Popen([*EXE, *args], env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        metrics = metrics_url_from_log(proc, log)
        wait_ready(metrics)
        sim.clock.advance(3600)
        scrape_until(metrics, lambda m: assert_every_counter_and_histogram_exact(m, sim))
        for file in state.parent.iterdir():
            file.unlink()
        sim.clock.advance(3600)  # traffic that can no longer be committed
        body = wait_metric(metrics, r"^connect_usage_state_file_missing 1\.0$")
        ready = httpx.get(metrics.replace("/metrics", "/readyz"), timeout=5)
        assert ready.status_code == 503
        assert "state file" in ready.text and str(state) not in ready.text
        said = [line for line in log_lines(log) if "was deleted or replaced" in line]
        assert len(said) == 1 and " WARNING " in said[0], said
        held = re.search(r"copy (/proc/\d+/fd/\d+) \(this process", said[0])
        assert held is not None, said[0]
        time.sleep(1)  # a few more polls: nothing comes back at the path
        assert not state.exists()
        shutil.copyfile(held.group(1), state)  # the way out the line gives
    finally:
        terminate(proc)
    assert proc.returncode == 0
    lines = log_lines(log)
    assert not [line for line in lines if " ERROR " in line or "Traceback" in line], lines
    assert len([line for line in lines if " WARNING " in line]) == 1, lines
    # Restarted on the copy: the counts go on from where they were, exactly.
    final = run_once(url, sim.keys["admin"], state)
    assert final.returncode == 0, final.stderr
    assert "new state file" not in final.stderr
    assert_every_counter_and_histogram_exact(final.stdout, sim)
    assert exposed_totals(final.stdout) > exposed_totals(body)


def run_once(url: str, key: str, state: Path) -> subprocess.CompletedProcess[str]:
    return once(env_for(url, key, CONNECT_EXPORTER_STATE_PATH=str(state)), *NO_ABANDON)


@pytest.fixture
def read_only_state(
    paused_connect: tuple[Simulator, str], tmp_path: Path
) -> Iterator[tuple[subprocess.CompletedProcess[str], Path, dict[tuple[str, str], int]]]:
    """A state file written once, its filesystem then remounted read-only, and a second run."""
    sim, url = paused_connect
    with tmpfs(tmp_path / "disk", "8m") as disk:
        state = disk / "s.sqlite"
        first = run_once(url, sim.keys["admin"], state)
        assert first.returncode == 0, first.stderr
        counters = db_counters(state)
        assert subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=False).returncode == 0
        sim.clock.advance(3600)
        yield run_once(url, sim.keys["admin"], state), state, counters


def test_a_read_only_state_directory_stops_cleanly_and_corrupts_nothing(
    read_only_state: tuple[subprocess.CompletedProcess[str], Path, dict[tuple[str, str], int]],
) -> None:
    proc, state, counters = read_only_state
    assert proc.returncode == 3  # the state exit status, with one line and no traceback
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert str(state) in proc.stderr
    assert "Traceback" not in proc.stderr
    assert db_counters(state) == counters


def test_a_read_only_state_directory_is_not_called_corrupt(
    read_only_state: tuple[subprocess.CompletedProcess[str], Path, dict[tuple[str, str], int]],
) -> None:
    proc, _state, _counters = read_only_state
    assert "corrupt" not in proc.stderr
    assert "delete" not in proc.stderr
