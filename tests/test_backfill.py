"""The back-fill: every step of the written history equals the simulator's truth at that step,
the seam with the live exporter has no jump, and bad input loses nothing."""

from __future__ import annotations

import itertools
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from exporter.backfill import (
    HEARTBEAT,
    KEEP,
    BackfillError,
    Range,
    TrailingWindows,
    Written,
    output_file,
    run_backfill,
    target_labels,
)
from exporter.client import ConnectClient
from exporter.model import (
    CONTENT_WINDOWS,
    DURATION_BUCKETS,
    US,
    USER_WINDOWS,
    VIEWER_WINDOWS,
    WINDOW_SECONDS,
    Rules,
)
from exporter.settings import DEFAULT_EXCLUDE_USER_AGENTS
from exporter.simulator import SimConfig, SimServer, Simulator
from exporter.snapshot import SHINY_APP_MODES
from exporter.store import SqliteStore
from tests.prometheus import (
    StampedTarget,
    executable,
    free_port,
    instant,
    prometheus,
    wait_for,
)
from tests.support import (
    TUESDAY_AFTERNOON,
    Connect,
    expected_viewers,
    make_poller,
    scrape_until,
    served,
    terminate,
)
from tests.test_prometheus_e2e import load_generator

pytestmark = pytest.mark.anyio

P = "connect_usage_"
LE = [*(f"{b:g}" if b != int(b) else f"{b:.1f}" for b in DURATION_BUCKETS), "+Inf"]
SeriesKey = tuple[str, frozenset[tuple[str, str]]]

_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)\{(.*)\} (\S+) (\d+)$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


@pytest.fixture
def busy() -> Iterator[Connect]:
    """Four days of a busy small server, its clock paused at a Tuesday afternoon."""
    sim = Simulator(
        SimConfig(
            seed=11,
            content=12,
            users=40,
            history_days=4,
            sessions_per_day=300,
            visits_per_day=700,
            max_session_seconds=5 * 3600,
        ),
        now=TUESDAY_AFTERNOON,
        paused=True,
    )
    with served(sim) as connect:
        yield connect


def rules() -> Rules:
    return Rules(
        overlap_us=0,
        max_session_age_us=int(1e9 * US),
        exclude_user_agents=DEFAULT_EXCLUDE_USER_AGENTS,
    )


async def first_start(connect: Connect, state_path: Path, days: float) -> dict[str, float]:
    """The live exporter's first start (its state file); what it shows for each usage series."""
    client, poller, store = make_poller(connect, state_path, history_days=days)
    await poller.load()
    assert await poller.poll_all_once()
    snap = poller.snapshot
    assert snap.counters_shown
    usage = snap.usage
    shown: dict[str, float] = {}
    for guid, n in usage.shiny_sessions_total.items():
        shown[f"sessions/{guid}"] = n
    for guid, n in usage.content_visits_total.items():
        shown[f"visits/{guid}"] = n
    for guid, h in usage.shiny_session_duration.items():
        shown[f"count/{guid}"] = h.count
        shown[f"sum/{guid}"] = h.sum
    await client.aclose()
    store.close()
    return shown


async def backfill(
    connect: Connect,
    state_path: Path | None,
    out: Path,
    *,
    step: int = 60,
    days: float = 1,
    top_viewers: int = 0,
    top_users: int = 0,
) -> Written:
    state = None
    if state_path is not None:
        store = SqliteStore(state_path, read_only=True)
        state = store.load()
        store.close()
    client = ConnectClient(
        connect.url, connect.sim.keys["admin"], timeout=5, backoff_base=0.01, backoff_max=0.05
    )
    async with client:
        return await run_backfill(
            client,
            replace(rules(), top_viewers=top_viewers, top_users=top_users),
            state,
            output=out,
            step=step,
            target=target_labels("connect-usage-exporter", "exporter:9741", []),
            history_days=days,
            progress=False,
        )


def parse(path: Path) -> dict[SeriesKey, list[tuple[int, float]]]:
    """Each series (name, labels without the target's) and its (time, value) samples."""
    text = path.read_text(encoding="utf-8")
    assert text.endswith("# EOF\n")
    series: dict[SeriesKey, list[tuple[int, float]]] = {}
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        match = _LINE.match(line)
        assert match, line
        name, labels, value, when = match.groups()
        pairs = dict(_LABEL.findall(labels))
        assert pairs.pop("job") == "connect-usage-exporter" and pairs.pop("instance")
        series.setdefault((name, frozenset(pairs.items())), []).append((int(when), float(value)))
    return series


def key(name: str, **labels: str) -> SeriesKey:
    return (P + name, frozenset(labels.items()))


def value_at(samples: list[tuple[int, float]], when: int) -> float | None:
    """The series' value at `when`: its latest sample at or before it (at any age)."""
    found = None
    for t, v in samples:
        if t > when:
            break
        found = v
    return found


def expected_at(sim: Simulator, origin: float, step: float) -> dict[SeriesKey, float]:
    """What every usage series must show at a step: the truth of the events before it."""
    truth = sim.truth(origin, step, buckets=DURATION_BUCKETS)
    want: dict[SeriesKey, float] = {}
    for guid, n in truth["sessions_started"].items():
        want[key("shiny_sessions_total", content_guid=guid)] = n
    for guid, n in truth["visits"].items():
        want[key("content_visits_total", content_guid=guid)] = n
    for guid, n in truth["sessions_running_at_end"].items():
        want[key("shiny_sessions_active", content_guid=guid)] = n
    for guid, counts in truth["sessions_ended_le"].items():
        for le, n in zip(LE, counts, strict=True):
            want[key("shiny_session_duration_seconds_bucket", content_guid=guid, le=le)] = n
        want[key("shiny_session_duration_seconds_count", content_guid=guid)] = counts[-1]
    for guid, us in truth["session_microseconds"].items():
        want[key("shiny_session_duration_seconds_sum", content_guid=guid)] = us / US
    want[key("excluded_events_total", stream="visits", reason="synthetic")] = sum(
        truth["synthetic_visits"].values()
    )
    for window in USER_WINDOWS:
        windowed = sim.truth(step - WINDOW_SECONDS[window], step)
        want[key("active_users", window=window)] = windowed["distinct_users"]
        if window in CONTENT_WINDOWS:
            for guid, n in windowed["content_distinct_users"].items():
                want[key("content_active_users", content_guid=guid, window=window)] = n
    return want


async def test_every_step_shows_the_truth_and_the_last_one_what_the_service_took_over_with(
    busy: Connect, tmp_path: Path
) -> None:
    sim = busy.sim
    shown = await first_start(busy, tmp_path / "state.sqlite", days=1)
    written = await backfill(busy, tmp_path / "state.sqlite", tmp_path / "history.om")
    takeover = int(TUESDAY_AFTERNOON)
    origin = takeover - 86400
    assert (written.history.origin, written.history.takeover) == (origin * US, takeover * US)
    assert (written.first, written.last) == (origin * US, takeover * US)
    series = parse(tmp_path / "history.om")
    steps = range(origin, takeover + 1, 60)
    assert sim.truth(origin, takeover)["totals"]["sessions_started"] > 200
    # The usage series the truth has at some step: checked at every 17th step and the last.
    for step in [*steps[::17], steps[-1]]:
        want = expected_at(sim, origin, step)
        for name_labels, samples in series.items():
            if name_labels in want or name_labels[0].endswith(("_total", "_bucket", "_count")):
                got = value_at(samples, step) or 0  # a series not begun yet (a deleted item)
                assert got == want.get(name_labels, 0), (step - origin, name_labels)
        missing = [k for k, v in want.items() if v and k not in series]
        assert not missing, (step - origin, missing[:3])
    # No jump at the seam: the last step shows what the service's first scrape shows.
    for label, value in shown.items():
        family, guid = label.split("/")
        name = {
            "sessions": "shiny_sessions_total",
            "visits": "content_visits_total",
            "count": "shiny_session_duration_seconds_count",
            "sum": "shiny_session_duration_seconds_sum",
        }[family]
        samples = series[key(name, content_guid=guid)]
        assert samples[-1] == (takeover, value), label


async def test_top_viewers_and_users_are_back_filled_as_the_service_shows_them(
    busy: Connect, tmp_path: Path
) -> None:
    # At each grid step, the viewer and top-user series a scrape would have found are exactly
    # the truth's top 3 viewers an item and top 5 users (ties by guid), with the caps' counts
    # of what they leave out; a viewer that left the top has no sample there.
    sim = busy.sim
    await first_start(busy, tmp_path / "state.sqlite", days=1)
    await backfill(busy, tmp_path / "state.sqlite", tmp_path / "h.om", top_viewers=3, top_users=5)
    series = parse(tmp_path / "h.om")
    takeover = int(TUESDAY_AFTERNOON)
    origin = takeover - 86400
    viewer_names = {
        P + n
        for n in (
            "content_viewer_sessions", "content_viewer_session_seconds", "content_viewer_visits",
            "content_viewer_last_seen_timestamp_seconds", "content_viewer_series_dropped",
            "user_sessions", "user_visits", "user_series_dropped",
        )
    }  # fmt: skip
    grid = list(range(origin, takeover + 1, HEARTBEAT))
    dropped_some = 0
    for step in [*grid[1::11], takeover]:
        viewers, viewers_dropped, users, users_dropped = expected_viewers(
            sim, step, origin, 3, 5, as_of=True
        )
        last_seen = sim.viewer_truth(0, step, as_of=step)["last_seen"]
        want: dict[SeriesKey, float] = {}
        for (content, user, window), (sessions, micros, visits) in viewers.items():
            labels = {"content_guid": content, "user_guid": user, "window": window}
            if sessions or micros:
                want[key("content_viewer_sessions", **labels)] = sessions
                want[key("content_viewer_session_seconds", **labels)] = micros / US
            if visits:
                want[key("content_viewer_visits", **labels)] = visits
            pair = {"content_guid": content, "user_guid": user}
            want[key("content_viewer_last_seen_timestamp_seconds", **pair)] = (
                last_seen[content, user] / US
            )
        for (user, window), (sessions, visits) in users.items():
            want[key("user_sessions", user_guid=user, window=window)] = sessions
            want[key("user_visits", user_guid=user, window=window)] = visits
        for window in VIEWER_WINDOWS:
            want[key("content_viewer_series_dropped", window=window)] = viewers_dropped[window]
            want[key("user_series_dropped", window=window)] = users_dropped[window]
        got = {
            k: v
            for k, samples in series.items()
            if k[0] in viewer_names
            for t, v in samples
            if t == step
        }
        assert got == want, step - origin
        assert len(viewers) > 20 and len(users) == 15, step - origin
        dropped_some += viewers_dropped["24h"] > 0
    assert dropped_some  # the cap did leave viewers out


async def test_samples_are_where_prometheus_looks_for_them(busy: Connect, tmp_path: Path) -> None:
    """Every series is sampled at every step it changes and then within Prometheus's lookback
    while its item is active; a change after a quiet stretch has the old value a step before
    (so increase() sees it); every item starts at the first step and all end at the last."""
    await first_start(busy, tmp_path / "state.sqlite", days=1)
    await backfill(busy, tmp_path / "state.sqlite", tmp_path / "history.om")
    takeover = int(TUESDAY_AFTERNOON)
    origin = takeover - 86400
    series = parse(tmp_path / "history.om")
    listed = {c.guid: c.app_mode for c in busy.sim.world.content if c.deleted_us is None}
    shiny = {
        f"{P}shiny_{n}" for n in ("sessions_total", "sessions_active", "sessions_abandoned_total")
    }
    shiny.update(f"{P}shiny_session_duration_seconds_{n}" for n in ("bucket", "count", "sum"))
    for (name, labels), samples in series.items():
        times = [t for t, _v in samples]
        assert times == sorted(set(times)), name
        assert all(origin <= t <= takeover and t % 60 == 0 for t in times)
        assert times[-1] == takeover, name  # no gap at the seam
        changed = times[0]
        for (t0, v0), (t1, v1) in itertools.pairwise(samples):
            if v0 != v1:
                changed = t1
                if name != P + "content_last_activity_timestamp_seconds":
                    assert t1 - t0 == 60, (name, labels, t0 - origin)
            elif t1 - t0 > HEARTBEAT:  # quiet: KEEP after a change, or at 0 (off the grid)
                at_zero = v0 == 0
                assert at_zero or t0 + HEARTBEAT - changed > KEEP, (name, labels, t0 - origin)
        mode = listed.get(dict(labels).get("content_guid", ""))
        if mode and name != P + "content_last_activity_timestamp_seconds":
            # The series the service shows at 0 for the item are there from the first sample.
            if name in shiny:
                initialised = mode in SHINY_APP_MODES
            elif name == P + "content_visits_total":
                initialised = mode not in SHINY_APP_MODES
            else:  # content_active_users, content_info
                initialised = True
            assert times[0] == origin or not initialised, (name, labels)
    for window in USER_WINDOWS:  # server-wide: sampled throughout
        times = [t for t, _v in series[key("active_users", window=window)]]
        assert max(b - a for a, b in itertools.pairwise(times)) <= HEARTBEAT
    assert len(series[key("counting_since_timestamp_seconds")]) >= 86400 / HEARTBEAT
    assert {v for _t, v in series[key("counting_since_timestamp_seconds")]} == {origin}


async def test_before_any_first_start_the_history_ends_at_connects_now(
    busy: Connect, tmp_path: Path
) -> None:
    busy.sim.clock.advance(30)  # Connect's now, not on a step: the last sample is before it
    written = await backfill(busy, None, tmp_path / "history.om", days=0.5)
    now = int(TUESDAY_AFTERNOON) + 30
    assert written.history == Range((now - 43200) * US, now * US, None)
    series = parse(tmp_path / "history.om")
    last = max(t for samples in series.values() for t, _v in samples)
    assert last == now - 30
    want = expected_at(busy.sim, now - 43200, last)
    for name_labels, v in want.items():
        assert value_at(series.get(name_labels, []), last) == v or v == 0, name_labels


async def test_an_origin_before_connects_oldest_record_starts_the_history_there(
    busy: Connect, tmp_path: Path
) -> None:
    written = await backfill(busy, None, tmp_path / "history.om", days=30)
    oldest = int(TUESDAY_AFTERNOON) - 4 * 86400  # the simulator's history
    assert written.history.origin == (int(TUESDAY_AFTERNOON) - 30 * 86400) * US
    assert oldest * US <= written.first <= (oldest + 3600) * US
    series = parse(tmp_path / "history.om")
    assert min(t for samples in series.values() for t, _v in samples) == written.first // US
    total = sum(
        samples[-1][1]
        for (name, _l), samples in series.items()
        if name == P + "shiny_sessions_total"
    )
    assert total == busy.sim.truth(0, TUESDAY_AFTERNOON)["totals"]["sessions_started"]


async def test_a_state_file_of_another_server_is_refused(busy: Connect, tmp_path: Path) -> None:
    await first_start(busy, tmp_path / "state.sqlite", days=1)
    other = Connect(busy.sim, busy.url.replace("127.0.0.1", "localhost"))
    with pytest.raises(BackfillError, match=r"the state file counts http://127\.0\.0\.1"):
        await backfill(other, tmp_path / "state.sqlite", tmp_path / "history.om")
    assert not [p for p in tmp_path.iterdir() if "history" in p.name]  # noqa: ASYNC240


def test_a_failure_inside_leaves_neither_the_file_nor_a_temporary_one(tmp_path: Path) -> None:
    target = tmp_path / "history.om"
    target.write_text("an older back-fill\n")
    with pytest.raises(KeyboardInterrupt), output_file(target) as out:
        out.write("half of it")
        raise KeyboardInterrupt
    assert [p.name for p in tmp_path.iterdir()] == ["history.om"]
    assert target.read_text() == "an older back-fill\n"  # untouched
    with output_file(target) as out:
        out.write("# EOF\n")
    assert target.read_text() == "# EOF\n"
    assert [p.name for p in tmp_path.iterdir()] == ["history.om"]


def test_an_unwritable_output_fails_at_once(tmp_path: Path) -> None:
    missing = tmp_path / "missing" / "history.om"
    with (
        pytest.raises(BackfillError, match=r"cannot write .*missing/history\.om"),
        output_file(missing),
    ):
        pytest.fail("the block must not run")


@pytest.mark.parametrize(
    ("labels", "error"),
    [
        (["env"], "expected NAME=VALUE"),
        (["1env=prod"], "expected NAME=VALUE"),
        (["__name__=x"], "expected NAME=VALUE"),
        (["job=x"], "job is already a label"),
        (["content_guid=x"], "content_guid is already a label"),
    ],
)
def test_target_labels_are_checked(labels: list[str], error: str) -> None:
    with pytest.raises(BackfillError, match=error):
        target_labels("j", "i:1", labels)


def test_target_labels_take_any_value() -> None:
    assert target_labels("j", "i:1", ['env=a,b="c"', "team="]) == [
        ("env", 'a,b="c"'),
        ("instance", "i:1"),
        ("job", "j"),
        ("team", ""),
    ]


# --- the trailing windows against a brute-force count ------------------------------------------

_EVENT = st.one_of(
    st.tuples(st.just("seen"), st.integers(0, 5), st.integers(0, 7200)),
    st.tuples(st.just("open"), st.integers(0, 5), st.just(0)),
    st.tuples(st.just("close"), st.integers(0, 5), st.just(0)),
    st.tuples(st.just("tick"), st.just(0), st.integers(0, 50_000)),
)


@given(st.lists(_EVENT, max_size=80))
def test_windows_count_what_a_brute_force_count_does(events: list[tuple[str, int, int]]) -> None:
    """Users seen in a trailing window, or held by an open session, as the replay's now moves
    on (times in seconds; the model's map holds each user's latest time)."""
    last: dict[Any, int] = {}
    counted = TrailingWindows(USER_WINDOWS, last.get, lambda _u: "")
    now, opened = 100_000, dict.fromkeys(range(6), 0)
    for kind, user, amount in events:
        if kind == "tick":
            now += amount
        elif kind == "seen":
            last[user] = max(last.get(user, 0), (now - amount) * US)
            counted.seen(user, last[user])
        elif kind == "open":
            opened[user] += 1
            counted.opened(user)
        elif opened[user]:
            opened[user] -= 1
            counted.closed(user)
        counted.expire(now * US)
        for window in USER_WINDOWS:
            since = (now - WINDOW_SECONDS[window]) * US
            inside = {u for u, t in last.items() if t >= since} | {
                u for u, n in opened.items() if n
            }
            assert counted.counts[window].get("", 0) == len(inside), (window, now)


# --- end to end: the command line, promtool and a real Prometheus ------------------------------

HISTORY_DAYS = 15  # two weeks and a day: the week-over-week panels have both weeks
LE_300 = LE[DURATION_BUCKETS.index(300.0)]
DASHBOARD_VALUES = {
    "job": "connect-usage-exporter",
    "instance": ".+",
    "datasource": "prometheus",
    "__range": "7d",
    "unused_days": "0",  # every item of the simulated server is used within 30 days
}


def _exposition(text: str) -> dict[str, dict[frozenset[tuple[str, str]], float]]:
    out: dict[str, dict[frozenset[tuple[str, str]], float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, {})[frozenset(sample.labels.items())] = sample.value
    return out


def _checked(sim: Simulator, origin: int, at: int) -> dict[str, dict[str, float]]:
    """The four figures the test reads from Prometheus, as the truth has them at a step."""
    truth = sim.truth(origin, at, buckets=DURATION_BUCKETS)
    le_index = LE.index(LE_300)
    return {
        "sessions": dict(truth["sessions_started"]),
        "visits": dict(truth["visits"]),
        "le300": {g: c[le_index] for g, c in truth["sessions_ended_le"].items()},
        "users7d": {"": sim.truth(at - 7 * 86400, at)["distinct_users"]},
    }


_QUERIES = {
    "sessions": P + "shiny_sessions_total",
    "visits": P + "content_visits_total",
    "le300": f'{P}shiny_session_duration_seconds_bucket{{le="{LE_300}"}}',
    "users7d": f'{P}active_users{{window="7d"}}',
}


def _prometheus_has(api: str, expr: str, at: float) -> dict[str, float]:
    result = instant(api, expr, at)["result"]
    return {r["metric"].get("content_guid", ""): float(r["value"][1]) for r in result}


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_prometheus_shows_the_truth_across_the_back_fill_and_the_live_period(
    tmp_path: Path,
) -> None:
    """The user's way: a first start, `backfill`, promtool's blocks in a Prometheus that then
    scrapes the live exporter; at 24 instants of the history and 6 of the live period,
    Prometheus answers what the simulator's truth says."""
    sim = Simulator(
        SimConfig(
            seed=3,
            content=12,
            users=40,
            history_days=HISTORY_DAYS + 1,
            sessions_per_day=150,
            visits_per_day=400,
            max_session_seconds=4 * 3600,
            quiet_content=1,
        ),
        now=TUESDAY_AFTERNOON,
        paused=True,
    )
    (quiet,) = [c.guid for c in sim.world.content if c.weight == 0.0]
    takeover = int(TUESDAY_AFTERNOON)
    origin = takeover - HISTORY_DAYS * 86400
    server = SimServer(sim)
    url = server.start()
    target = StampedTarget()
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONNECT_")}
    env.update(
        CONNECT_SERVER=url,
        CONNECT_API_KEY=sim.keys["admin"],
        CONNECT_EXPORTER_STATE_PATH=str(tmp_path / "state.sqlite"),
        CONNECT_EXPORTER_HISTORY_DAYS=str(HISTORY_DAYS),
        CONNECT_EXPORTER_MAX_SESSION_AGE=str(1e9),
        CONNECT_EXPORTER_POLL_INTERVAL="0.5",
        CONNECT_EXPORTER_LISTEN_ADDRESS=f"127.0.0.1:{port}",
    )
    service = subprocess.Popen(
        [sys.executable, "-m", "exporter", "run"],
        env=env,
        stderr=(tmp_path / "service.log").open("w"),
    )
    metrics = f"http://127.0.0.1:{port}/metrics"
    try:

        def exact_at(at: int) -> Any:
            want = _checked(sim, origin, at)

            def check(body: str) -> None:
                got = _exposition(body)
                # Connect's now as the exporter knows it: its Date header (whole seconds),
                # plus the exporter's own time since; the clock is paused at `at`.
                # (absent until the first start's replay is complete)
                evaluated = got.get(P + "windows_evaluated_timestamp_seconds", {}).get(frozenset())
                assert evaluated is not None and 0 <= evaluated - at < 1
                for name, expr in _QUERIES.items():
                    family = expr.split("{")[0]
                    shown = {
                        dict(labels).get("content_guid", ""): value
                        for labels, value in got.get(family, {}).items()
                        if name != "le300" or dict(labels)["le"] == LE_300
                        if name != "users7d" or dict(labels)["window"] == "7d"
                    }
                    assert {g: v for g, v in shown.items() if v} == want[name], name

            return check

        # 1. The first start: the service counts the history since the origin.
        wait_for("the exporter to listen", lambda: _get(metrics), 60)
        scrape_until(metrics, exact_at(takeover), within=120)
        # 2. The back-fill, then promtool's blocks in the Prometheus data directory.
        history = [origin + 5 + i * (HISTORY_DAYS * 86400 - 10) // 23 for i in range(24)]
        truth = {at: _checked(sim, origin, at // 60 * 60) for at in history}
        out = tmp_path / "history.om"
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "exporter",
                "backfill",
                "--output",
                str(out),
                "--instance",
                target.address,
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr
        load = done.stderr.splitlines()[-1].removeprefix("load it: ")
        assert load.endswith(f"{out} <prometheus data directory>"), load
        load = load.removesuffix(" <prometheus data directory>").split()
        assert load[:4] == ["promtool", "tsdb", "create-blocks-from", "openmetrics"]
        data = tmp_path / "data"
        blocks = subprocess.run(
            [executable("promtool"), *load[1:], str(data)],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert blocks.returncode == 0, blocks.stdout + blocks.stderr
        # 3. Prometheus with those blocks scrapes the live exporter, dated in Connect's time.
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            # Samples dated by Connect's clock are a year behind the machine's, where
            # Prometheus's own series are written: they arrive "out of order".
            "storage": {"tsdb": {"out_of_order_time_window": "3650d"}},
            "scrape_configs": [
                {
                    "job_name": "connect-usage-exporter",
                    "static_configs": [{"targets": [target.address]}],
                }
            ],
        }
        with prometheus(config, tmp_path, "--storage.tsdb.retention.time=100y") as api:
            live: list[int] = []
            for minute in range(1, 7):
                sim.clock.advance(60)
                at = takeover + 60 * minute
                if minute == 3:  # the quiet app's first session, ended a few seconds ago
                    sim.add_shiny_session(quiet, None, at - 30, at - 10)
                body = scrape_until(metrics, exact_at(at), within=60)
                truth[at] = _checked(sim, origin, at)
                target.show(body, at)
                wait_for(
                    f"the scrape dated {at}",
                    lambda a=at: (
                        _prometheus_has(api, f"timestamp({P}counting_since_timestamp_seconds)", a)
                        == {"": a}
                    ),
                    30,
                    interval=0.2,
                )
                live.append(at)
            # 4. At every instant, Prometheus answers the truth: the series it has there
            # (an item quiet for hours has no sample in the lookback), and every item's latest
            # value over the whole history.
            instants = [*history, *(t + 17 for t in live)]
            answered = dict.fromkeys(_QUERIES, 0)
            for at in instants:
                for name, expr in _QUERIES.items():
                    want = truth[at if at in truth else at - 17][name]
                    shown = _prometheus_has(api, expr, at)
                    answered[name] += bool(shown)
                    assert shown == {g: want.get(g, 0) for g in shown}, (name, at - takeover)
                    whole = f"last_over_time({expr}[{HISTORY_DAYS + 1}d])"
                    latest = _prometheus_has(api, whole, at)
                    assert {g: v for g, v in latest.items() if v} == want, (name, at - takeover)
            # Items are sampled for two hours after a change: most instants find some.
            assert all(n > len(instants) // 2 for n in answered.values()), answered
            assert answered["users7d"] == len(instants)  # server-wide: sampled throughout
            # 5. The quiet app's first session: increase() over the seam counts it, once.
            last = live[-1]
            first_session = _prometheus_has(
                api,
                f'increase({P}shiny_sessions_total{{content_guid="{quiet}"}}[{last - takeover}s])',
                last,
            )
            assert first_session == {quiet: 1.0}
            # 6. Every dashboard query has data on day one, week-over-week ones included: the
            # content detail's for an app or a document (an app has no visits, a document no
            # sessions). Prometheus's own `up` is dated by the machine's clock: asked at its now.
            gen = load_generator()
            apps = {"content": next(iter(truth[last]["sessions"]))}
            documents = {"content": next(iter(truth[last]["visits"]))}
            world = sim.world
            granted = {  # an item a group may see: its members by name
                "content": next(
                    world.content[p.content].guid
                    for p in world.permissions
                    if p.principal_type == "group" and world.content[p.content].deleted_us is None
                )
            }
            empty = []
            for name, make in gen.DASHBOARDS.items():
                for title, expr in gen.panel_queries(gen.to_dict(make())):
                    at = None if expr.startswith("up{") else last
                    if not any(
                        instant(api, gen.substitute(expr, DASHBOARD_VALUES | item), at)["result"]
                        for item in (apps, documents, granted)
                    ):
                        empty.append(f"{name} / {title}: {expr}")
            assert not empty, empty
    finally:
        terminate(service)
        target.close()
        server.stop()


def _get(url: str) -> bool:
    try:
        return httpx.get(url, timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


# --- the usage-drop alerts over back-filled history --------------------------------------------

RULES = Path(__file__).resolve().parent.parent / "prometheus" / "rules.yml"
DROP_ALERTS = ("ConnectUsageContentUsageDrop", "ConnectUsageServerUsageDrop")


def _rule_test_series(path: Path, origin: int, end: int, step: int) -> list[dict[str, str]]:
    """The back-filled visits, origin and names as promtool's input series: a value at every
    step from the origin (time 0 for promtool, and the origin's value 0), `_` where none."""
    wanted = {P + n for n in ("content_visits_total", "counting_since_timestamp_seconds")}
    wanted.add(P + "content_info")
    out = []
    for (name, labels), samples in parse(path).items():
        if name not in wanted:
            continue
        values = ["_"] * ((end - origin) // step + 1)
        for t, v in samples:
            values[(t - origin) // step] = f"{v - origin if 'counting_since' in name else v:g}"
        text = ", ".join(
            f'{k}="{v}"'
            for k, v in sorted([*labels, ("job", "connect-usage-exporter"), ("instance", "x:1")])
        )
        out.append({"series": f"{name}{{{text}}}", "values": " ".join(values)})
    return out


async def _drop_test_input(tmp_path: Path, *, drop_at: float | None) -> list[dict[str, str]]:
    sim = Simulator(
        SimConfig(
            seed=21,
            content=12,
            users=150,
            history_days=16,
            sessions_per_day=100,
            visits_per_day=8000,
            drop_at=drop_at,
        ),
        now=TUESDAY_AFTERNOON,
        paused=True,
    )
    server = SimServer(sim)
    try:
        await backfill(Connect(sim, server.start()), None, tmp_path / "h.om", step=300, days=15)
    finally:
        server.stop()
    end = int(TUESDAY_AFTERNOON)
    return _rule_test_series(tmp_path / "h.om", end - 15 * 86400, end, 300)


def _promtool_test(tmp_path: Path, tests: list[dict[str, Any]]) -> None:
    path = tmp_path / "drop_test.yml"
    path.write_text(
        yaml.safe_dump({"rule_files": [str(RULES)], "evaluation_interval": "5m", "tests": tests})
    )
    result = subprocess.run(
        [executable("promtool"), "test", "rules", str(path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]


@pytest.mark.slow
@pytest.mark.timeout(900)
async def test_usage_drop_alerts_over_back_filled_history_fire_on_a_drop_not_on_the_week(
    tmp_path: Path,
) -> None:
    """Two weeks of a simulated server's history, back-filled, read by promtool's rule tests:
    the weekly rhythm (quiet nights and weekends) never fires a usage-drop alert; traffic
    stopping on a Tuesday morning fires the server-wide one within two hours."""
    normal = await _drop_test_input(tmp_path, drop_at=None)
    eight_days = 8 * 86400
    silent = [
        {"eval_time": f"{t}s", "alertname": alert, "exp_alerts": []}
        for t in range(eight_days, 15 * 86400 + 1, 3 * 3600)
        for alert in DROP_ALERTS
    ]
    drop = int(TUESDAY_AFTERNOON) - 3 * 3600  # 11:00 UTC
    dropped = await _drop_test_input(tmp_path, drop_at=drop)
    at_drop = 15 * 86400 - 3 * 3600  # promtool's time of the drop: the origin is 0
    fired = {
        "exp_labels": {"severity": "warning", "job": "connect-usage-exporter"},
        "exp_annotations": {
            "summary": "Connect usage dropped by more than half week over week "
            "(job connect-usage-exporter)",
            "description": "Connect had 0 content visits and Shiny sessions in the last hour, "
            "less than half of the same hour one week ago (at least 100 then).",
            "runbook_url": "https://github.com/connect-usage-exporter/connect-usage-exporter/"
            "blob/main/docs/runbooks/ConnectUsageServerUsageDrop.md",
        },
    }
    server_alert = DROP_ALERTS[1]
    _promtool_test(
        tmp_path,
        [
            {
                "name": "the weekly rhythm",
                "interval": "5m",
                "input_series": normal,
                "alert_rule_test": silent,
            },
            {
                "name": "traffic stops",
                "interval": "5m",
                "input_series": dropped,
                "alert_rule_test": [
                    {
                        "eval_time": f"{at_drop - 3600}s",
                        "alertname": server_alert,
                        "exp_alerts": [],
                    },
                    {
                        "eval_time": f"{at_drop + 6300}s",
                        "alertname": server_alert,
                        "exp_alerts": [fired],
                    },
                ],
            },
        ],
    )
