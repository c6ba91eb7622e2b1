"""Soak: a simulated month in minutes, with faults, against the real exporter service.

Run: ``.venv/bin/python -m bench.soak`` (``--help`` for the knobs; docs/soak.md for figures).

The simulator runs in this process (a server thread) with a fast clock and live traffic; the
exporter runs as the real service (``python -m exporter run``) in a subprocess with its state in
a temporary directory. Faults are switched on and off on a schedule. Every few seconds the
exporter's RSS, the state file's size and its de-dup / last-seen table sizes are sampled, so
growth shows as a slope. At the end the clock stops, the exporter catches up, and every counter
and histogram on ``/metrics`` is compared with the simulator's ground truth, exactly.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from exporter.model import CLOSED, SPACES, ModelState
from exporter.simulator import SimConfig, SimServer, Simulator
from exporter.store import SqliteStore
from tests.support import log_lines, metrics_url_from_log, terminate

FAR_FUTURE = 1e11
DAY = 86400.0
MB = 1024.0 * 1024.0
STREAMS = ("shiny", "visits")
KEY_TABLES = ("shiny_keys", "visit_keys", "user_last", "pair_last")

# Each episode: a name, the simulator's fault spec, and how many ``fault_seconds`` it lasts.
# Rates stay below 1 except in the outage, so retries mostly get through; the outage drops
# every request for longer than the client's retries last (polls fail, the loop backs off),
# and at the default speed for ~36 simulated hours: far longer than the overlap.
FAULTS: tuple[tuple[str, dict[str, Any], float], ...] = (
    ("503 burst", {"error_rate": {"503": 0.5}}, 1),
    ("429 + Retry-After", {"error_rate": {"429": 0.4}, "retry_after": 1}, 1),
    ("timeouts", {"latency": 2.5, "count": 6}, 1),  # latency above --request-timeout
    ("malformed JSON", {"malformed_rate": 0.3}, 1),
    ("truncated bodies", {"truncate_rate": 0.3}, 1),
    ("connection resets", {"reset_rate": 0.3}, 1),
    ("HTML 200 pages", {"html_rate": 0.3}, 1),
    ("502/504 mix", {"error_rate": {"502": 0.2, "504": 0.2}}, 1),
    ("outage (all dropped)", {"reset_rate": 1.0}, 4),
)


@dataclass
class SoakConfig:
    """Everything that shapes a soak run; the defaults take a few minutes on 2 cores."""

    days: float = 30.0
    speed: float = 10800.0  # simulated seconds per real second: 30 days in 240 s
    seed: int = 1
    content: int = 100
    users: int = 600
    history_days: float = 30.0  # back-fills the 30-day windows, so they start full
    sessions_per_day: float = 1500.0
    visits_per_day: float = 4500.0
    poll_interval: float = 0.5  # real seconds
    metadata_interval: float = 10.0
    request_timeout: float = 2.0
    # Simulated seconds. The simulator stamps Date after building a page, and at Kx its
    # handling time counts K-fold: the overlap must cover that as well as the 5-minute late
    # writes, or the fast clock itself (not the exporter) would lose late events.
    overlap: float | None = None  # default: max(900, 0.5 s real)
    faults_every: float = 12.0  # real seconds between the starts of fault episodes (at least)
    fault_seconds: float = 3.0  # real seconds each episode lasts
    sample_every: float = 2.0  # real seconds between samples
    catchup_timeout: float = 180.0
    keep: Path | None = None  # keep the state file and logs here (a failing run's evidence)
    start: float = 1_764_079_200.0  # the simulated clock's first instant: a Tuesday, 14:00 UTC

    @property
    def overlap_seconds(self) -> float:
        return self.overlap if self.overlap is not None else max(900.0, 0.5 * self.speed)


@dataclass
class Sample:
    """One look at the exporter process and its state file."""

    real_s: float
    sim_days: float
    rss_mb: float
    state_bytes: int
    wal_bytes: int
    rows: dict[str, int]

    @property
    def dedup_keys(self) -> int:
        return self.rows.get("shiny_keys", 0) + self.rows.get("visit_keys", 0)


@dataclass
class Mismatch:
    """A counter or histogram series that differs from the ground truth."""

    metric: str
    content_guid: str
    exporter: float
    truth: float


@dataclass
class SoakResult:
    """What the run measured; ``summary()`` renders it as the table docs/soak.md shows."""

    config: SoakConfig
    sim_days: float = 0.0
    real_seconds: float = 0.0
    events: int = 0  # sessions started + visits (synthetic included) since the counting epoch
    truth_totals: dict[str, Any] = field(default_factory=dict)
    polls: dict[str, int] = field(default_factory=dict)  # successful walks per stream
    poll_errors: dict[str, int] = field(default_factory=dict)
    episodes: dict[str, int] = field(default_factory=dict)
    injected: dict[str, int] = field(default_factory=dict)  # requests the simulator spoiled
    samples: list[Sample] = field(default_factory=list)
    rss_peak_mb: float = 0.0  # VmHWM: the true peak, between samples too
    scrape_failures: int = 0
    caught_up: bool = False
    stale_keys_end: int = -1  # de-dup keys below hwm - overlap at the end: should be 0
    mismatches: list[Mismatch] = field(default_factory=list)
    exit_code: int | None = None
    log_errors: int = 0  # ERROR lines in the exporter's log (failed polls)
    sim_hangups: int = 0  # simulator answers the client had given up on (timeouts)

    @property
    def exact(self) -> bool:
        return self.caught_up and not self.mismatches

    def rss_slope(self, tail: float = 0.5) -> float:
        """MB per simulated day over the last `tail` of the run: ~0 when memory stays flat."""
        last = [s for s in self.samples if s.sim_days >= self.sim_days * (1 - tail)]
        return _slope([s.sim_days for s in last], [s.rss_mb for s in last])

    def summary(self) -> str:
        """A two-column table of the figures that matter."""
        s = self.samples
        keys = [x.dedup_keys for x in s] or [0]
        pairs = [x.rows.get("pair_last", 0) for x in s] or [0]
        users = [x.rows.get("user_last", 0) for x in s] or [0]
        lost = sum(max(0.0, m.truth - m.exporter) for m in self.mismatches)
        doubled = sum(max(0.0, m.exporter - m.truth) for m in self.mismatches)
        t = self.truth_totals
        rows = [
            ("simulated days", f"{self.sim_days:.1f}"),
            ("clock speed", f"{self.config.speed:g}x"),
            ("real seconds", f"{self.real_seconds:.0f}"),
            (
                "events (since counting)",
                f"{self.events} ({t.get('sessions_started', 0)} sessions, "
                f"{t.get('visits', 0)} visits, {t.get('synthetic_visits', 0)} synthetic)",
            ),
            (
                "polls ok (shiny / visits)",
                f"{self.polls.get('shiny', 0)} / {self.polls.get('visits', 0)}",
            ),
            (
                "polls failed (shiny / visits / metadata)",
                " / ".join(str(self.poll_errors.get(k, 0)) for k in (*STREAMS, "metadata")),
            ),
            (
                "fault episodes",
                f"{sum(self.episodes.values())} ({len(self.episodes)} kinds)",
            ),
            (
                "requests spoiled by faults",
                f"{sum(self.injected.values())} " + _fmt_counts(self.injected),
            ),
            ("/metrics scrape failures", str(self.scrape_failures)),
            ("exporter ERROR log lines", str(self.log_errors)),
            ("simulator answers to hung-up clients", str(self.sim_hangups)),
            (
                "RSS start / peak / end (MB)",
                f"{s[0].rss_mb:.1f} / {self.rss_peak_mb:.1f} / {s[-1].rss_mb:.1f}" if s else "-",
            ),
            ("RSS slope, 2nd half (MB per sim. day)", f"{self.rss_slope():+.3f}"),
            # SQLite's page cache (capped) fills as the state file grows, so a step early on
            # weighs on the half; the last third shows whether anything still grows.
            ("RSS slope, last third (MB per sim. day)", f"{self.rss_slope(1 / 3):+.3f}"),
            ("de-dup keys start / max / end", f"{keys[0]} / {max(keys)} / {keys[-1]}"),
            ("stale de-dup keys at end", str(self.stale_keys_end)),
            ("user_last entries max / end", f"{max(users)} / {users[-1]}"),
            ("pair_last entries max / end", f"{max(pairs)} / {pairs[-1]}"),
            (
                "state file start / max / end (MB)",
                (
                    f"{s[0].state_bytes / MB:.2f} / {max(x.state_bytes for x in s) / MB:.2f}"
                    f" / {s[-1].state_bytes / MB:.2f} (WAL max "
                    f"{max(x.wal_bytes for x in s) / MB:.2f})"
                )
                if s
                else "-",
            ),
            ("exporter exit code (SIGTERM)", str(self.exit_code)),
            (
                "exactness",
                (
                    "EXACT: 0 lost, 0 doubled"
                    if self.exact
                    else f"MISMATCH: {len(self.mismatches)} series, "
                    f"{lost:g} lost, {doubled:g} doubled"
                    + ("" if self.caught_up else " (never caught up)")
                ),
            ),
        ]
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def _fmt_counts(counts: dict[str, int]) -> str:
    return "(" + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) + ")" if counts else ""


def _slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope; 0 for fewer than two distinct x."""
    n = len(xs)
    if n < 2:
        return 0.0
    mx, my = sum(xs) / n, sum(ys) / n
    var = sum((x - mx) ** 2 for x in xs)
    if var == 0:
        return 0.0
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var


# -- probes -----------------------------------------------------------------------------------


def rss_mb(pid: int, field_name: str = "VmRSS") -> float:
    """Resident memory of ``pid`` from /proc (kB there); 0 once the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return 0.0


def load_state(path: Path) -> ModelState | None:
    """The state as the store holds it, read-only: never blocks the writer."""
    store = SqliteStore(path, read_only=True)
    try:
        return store.load()
    finally:
        store.close()


def state_rows(path: Path) -> dict[str, int]:
    """How many de-dup keys and last-seen entries the state holds."""
    state = load_state(path)
    if state is None:
        return dict.fromkeys(KEY_TABLES, 0)
    return {
        "shiny_keys": len(state.keys.get("shiny", {})),
        "visit_keys": sum(len(keys) for space, keys in state.keys.items() if space != "shiny"),
        "user_last": len({user for user, _ in state.user_last}),
        "pair_last": len({(content, user) for content, user, _ in state.pair_last}),
    }


def stale_keys(path: Path, overlap_us: int) -> int:
    """De-dup keys a walk can no longer return (below the walk start), open sessions apart:
    pruning leaves none."""
    state = load_state(path)
    if state is None:
        return 0
    stale = 0
    for space, keys in state.keys.items():
        bound = state.marks.get(SPACES[space], 0) - overlap_us
        pinned = space == "shiny"
        stale += sum(1 for v, t in keys.values() if t < bound and not (pinned and v != CLOSED))
    return stale


Series = dict[str, dict[tuple[tuple[str, str], ...], float]]


def parse_metrics(text: str) -> Series:
    """Exposition text -> {sample name: {sorted labels: value}}."""
    out: Series = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def _per_content(series: Series, name: str) -> dict[str, float]:
    return {
        dict(labels)["content_guid"]: value
        for labels, value in series.get(name, {}).items()
        if value and "content_guid" in dict(labels)
    }


def _per_stream(series: Series, name: str) -> dict[str, float]:
    return {dict(k).get("stream", ""): v for k, v in series.get(name, {}).items()}


def compare_with_truth(series: Series, truth: dict[str, Any]) -> list[Mismatch]:
    """Every counter and histogram series against the truth; an empty list means exact."""
    p = "connect_usage_"
    pairs: list[tuple[str, dict[str, float], dict[str, float]]] = [
        (
            "shiny_sessions_total",
            _per_content(series, p + "shiny_sessions_total"),
            {g: float(n) for g, n in truth["sessions_started"].items()},
        ),
        (
            "content_visits_total",
            _per_content(series, p + "content_visits_total"),
            {g: float(n) for g, n in truth["visits"].items()},
        ),
        (
            "shiny_session_duration_seconds_count",
            _per_content(series, p + "shiny_session_duration_seconds_count"),
            {g: float(n) for g, n in truth["sessions_ended"].items()},
        ),
        (
            "shiny_session_duration_seconds_sum",
            _per_content(series, p + "shiny_session_duration_seconds_sum"),
            {g: us / 1e6 for g, us in truth["session_microseconds"].items()},
        ),
    ]
    out: list[Mismatch] = []
    for metric, got, want in pairs:
        for guid in sorted(set(got) | set(want)):
            g, w = got.get(guid, 0.0), want.get(guid, 0.0)
            if g != w:
                out.append(Mismatch(metric, guid, g, w))
    excluded = series.get(p + "excluded_events_total", {})
    synthetic = excluded.get((("reason", "synthetic"), ("stream", "visits")), 0.0)
    want_synthetic = float(truth["totals"]["synthetic_visits"])
    if synthetic != want_synthetic:
        out.append(Mismatch("excluded_events_total{synthetic}", "-", synthetic, want_synthetic))
    return out


def polls_ok(series: Series) -> dict[str, int]:
    """Successful polls per stream: completed polls minus failed ones."""
    counts = _per_stream(series, "connect_usage_poll_duration_seconds_count")
    errors = _per_stream(series, "connect_usage_poll_errors_total")
    return {s: int(counts.get(s, 0) - errors.get(s, 0)) for s in (*STREAMS, "metadata")}


# -- the exporter subprocess ------------------------------------------------------------------


@contextlib.contextmanager
def exporter_service(
    url: str, key: str, workdir: Path, cfg: SoakConfig
) -> Iterator[tuple[subprocess.Popen[bytes], str, Path]]:
    """The real service; yields (process, /metrics URL, log file). SIGTERM on the way out."""
    log_path = workdir / "exporter.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONNECT_")}
    env.update(
        CONNECT_SERVER=url,
        CONNECT_API_KEY=key,
        CONNECT_EXPORTER_STATE_PATH=str(workdir / "state.sqlite"),
    )
    args = [
        sys.executable, "-m", "exporter", "run",
        "--listen-address", "127.0.0.1:0",
        "--poll-interval", str(cfg.poll_interval),
        "--metadata-interval", str(cfg.metadata_interval),
        "--overlap", str(cfg.overlap_seconds),
        "--request-timeout", str(cfg.request_timeout),
        "--log-level", "INFO",
    ]  # fmt: skip
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(args, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    try:
        metrics_url = metrics_url_from_log(proc, log_path)
        yield proc, metrics_url, log_path
    finally:
        terminate(proc)


def wait_ready(metrics_url: str, timeout: float) -> None:
    """Until /readyz answers 200: the first poll of every stream (the back-fill) is done."""
    ready = metrics_url.replace("/metrics", "/readyz")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(ready, timeout=5).status_code == 200:
                return
        time.sleep(0.2)
    raise RuntimeError("the exporter never became ready")


# -- the run ----------------------------------------------------------------------------------


@contextlib.contextmanager
def _workdir(keep: Path | None) -> Iterator[str]:
    """A temporary directory, or ``keep`` (created, left in place) when asked."""
    if keep is None:
        with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
            yield tmp
        return
    keep.mkdir(parents=True, exist_ok=True)
    yield str(keep)


def run_soak(cfg: SoakConfig, say: Callable[[str], None] = print) -> SoakResult:
    """Run one soak and return its figures (it never raises on a mismatch: it reports it)."""
    result = SoakResult(config=cfg)
    sim = Simulator(
        SimConfig(
            seed=cfg.seed,
            content=cfg.content,
            users=cfg.users,
            history_days=cfg.history_days,
            sessions_per_day=cfg.sessions_per_day,
            visits_per_day=cfg.visits_per_day,
            clock_speed=cfg.speed,
        ),
        now=cfg.start,
        paused=True,  # still while the exporter back-fills; the month starts once it is ready
    )
    with (
        contextlib.ExitStack() as stack,
        SimServer(sim) as server,
        _workdir(cfg.keep) as tmp,
        exporter_service(server.url, sim.keys["admin"], Path(tmp), cfg) as (proc, metrics, log),
    ):
        state = Path(tmp) / "state.sqlite"
        # The simulator's handler threads print a traceback for every client that hung up
        # (a timeout); count them instead of flooding the terminal.
        sim_errors = Path(tmp) / "simulator-stderr.log"
        stack.enter_context(contextlib.redirect_stderr(stack.enter_context(sim_errors.open("w"))))
        say(f"simulator {server.url}; exporter {metrics}; back-filling {cfg.history_days:g} days")
        wait_ready(metrics, timeout=300)
        t_real0 = time.monotonic()
        t_sim0 = sim.clock.now()

        def sample() -> None:
            wal = state.with_name(state.name + "-wal")
            try:
                rows = state_rows(state)
            except sqlite3.Error:
                return  # busy for 5 s: skip this one rather than stall the schedule
            result.samples.append(
                Sample(
                    real_s=time.monotonic() - t_real0,
                    sim_days=(sim.clock.now() - t_sim0) / DAY,
                    rss_mb=rss_mb(proc.pid),
                    state_bytes=state.stat().st_size,
                    wal_bytes=wal.stat().st_size if wal.exists() else 0,
                    rows=rows,
                )
            )
            try:
                httpx.get(metrics, timeout=10).raise_for_status()
            except httpx.HTTPError:
                result.scrape_failures += 1

        sample()
        sim.clock.resume()
        end_sim = t_sim0 + cfg.days * DAY
        next_fault = t_real0 + cfg.faults_every / 2
        clear_at: float | None = None
        next_sample = t_real0 + cfg.sample_every
        next_report = t_real0 + 30
        episode = 0
        while sim.clock.now() < end_sim:
            now = time.monotonic()
            if clear_at is not None and now >= clear_at:
                sim.faults.clear()
                clear_at = None
            if now >= next_fault:
                name, spec, lasts = FAULTS[episode % len(FAULTS)]
                episode += 1
                sim.faults.configure(spec)
                result.episodes[name] = result.episodes.get(name, 0) + 1
                clear_at = now + cfg.fault_seconds * lasts
                next_fault = max(now + cfg.faults_every, clear_at + 1)
            if now >= next_sample:
                sample()
                next_sample = now + cfg.sample_every
            if now >= next_report and result.samples:
                last = result.samples[-1]
                say(
                    f"  day {last.sim_days:5.1f}: RSS {last.rss_mb:.1f} MB, "
                    f"de-dup keys {last.dedup_keys}, pair_last {last.rows.get('pair_last', 0)}"
                )
                next_report = now + 30
            time.sleep(0.05)

        # Stop the month at a whole second P: any Date at or above P - 2 came after the stop.
        sim.faults.clear()
        sim.clock.pause()
        stop_at = math.ceil(sim.clock.now()) + 2
        sim.clock.advance(stop_at - sim.clock.now())
        result.sim_days = (stop_at - t_sim0) / DAY
        say(f"clock stopped after {result.sim_days:.1f} simulated days; catching up")
        result.caught_up, series = catch_up(metrics, stop_at, cfg.catchup_timeout)
        result.real_seconds = time.monotonic() - t_real0
        sample()
        result.rss_peak_mb = rss_mb(proc.pid, "VmHWM")
        result.polls = polls_ok(series)
        result.poll_errors = {
            k: int(v) for k, v in _per_stream(series, "connect_usage_poll_errors_total").items()
        }
        since = next(iter(series["connect_usage_counting_since_timestamp_seconds"].values()))
        truth = sim.truth(since, FAR_FUTURE)
        result.truth_totals = truth["totals"]
        t = truth["totals"]
        result.events = int(t["sessions_started"] + t["visits"] + t["synthetic_visits"])
        result.mismatches = compare_with_truth(series, truth)
        result.injected = dict(sim.faults.injected)
        proc.send_signal(signal.SIGTERM)
        result.exit_code = proc.wait(timeout=30)
        result.stale_keys_end = stale_keys(state, int(cfg.overlap_seconds * 1e6))
        result.log_errors = sum(" ERROR " in line for line in log_lines(log, complete=False))
        sys.stderr.flush()
        result.sim_hangups = sum(
            "Traceback" in line for line in log_lines(sim_errors, complete=False)
        )
    return result


def catch_up(metrics: str, stop_at: float, timeout: float) -> tuple[bool, Series]:
    """Wait for both high-water marks past ``stop_at - 2`` and then two more good walks each.

    The mark can pass mid-walk (it follows the last record read), so only a walk that began
    after the mark passed (the second one counted from then) is sure to have seen everything.
    """
    deadline = time.monotonic() + timeout
    base: dict[str, int] | None = None
    series: Series = {}
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            series = parse_metrics(httpx.get(metrics, timeout=10).text)
            hwm = _per_stream(series, "connect_usage_high_water_mark_timestamp_seconds")
            ok = polls_ok(series)
            if base is None and all(hwm.get(s, 0) >= stop_at - 2 for s in STREAMS):
                base = ok
            if base is not None and all(ok[s] >= base[s] + 2 for s in STREAMS):
                return True, series
        time.sleep(0.2)
    return False, series


def main(argv: list[str] | None = None) -> int:
    """Parse the knobs, run, print the table; exit 1 unless exact."""
    d = SoakConfig()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--days", type=float, default=d.days, help="simulated days to run")
    p.add_argument("--speed", type=float, default=d.speed, help="simulated s per real s")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--content", type=int, default=d.content)
    p.add_argument("--users", type=int, default=d.users)
    p.add_argument("--history-days", type=float, default=d.history_days)
    p.add_argument("--sessions-per-day", type=float, default=d.sessions_per_day)
    p.add_argument("--visits-per-day", type=float, default=d.visits_per_day)
    p.add_argument("--poll-interval", type=float, default=d.poll_interval, help="real s")
    p.add_argument("--overlap", type=float, default=None, help="simulated s")
    p.add_argument("--faults-every", type=float, default=d.faults_every, help="real s")
    p.add_argument("--fault-seconds", type=float, default=d.fault_seconds, help="real s")
    p.add_argument("--sample-every", type=float, default=d.sample_every, help="real s")
    p.add_argument("--keep", type=Path, default=None, help="keep state and logs in this dir")
    a = p.parse_args(argv)
    cfg = SoakConfig(
        days=a.days,
        speed=a.speed,
        seed=a.seed,
        content=a.content,
        users=a.users,
        history_days=a.history_days,
        sessions_per_day=a.sessions_per_day,
        visits_per_day=a.visits_per_day,
        poll_interval=a.poll_interval,
        overlap=a.overlap,
        faults_every=a.faults_every,
        fault_seconds=a.fault_seconds,
        sample_every=a.sample_every,
        keep=a.keep,
    )
    result = run_soak(cfg, say=lambda line: print(line, flush=True))
    print()
    print(result.summary())
    for m in result.mismatches[:50]:
        print(f"  {m.metric} {m.content_guid}: exporter {m.exporter:g}, truth {m.truth:g}")
    return 0 if result.exact else 1


if __name__ == "__main__":
    raise SystemExit(main())
