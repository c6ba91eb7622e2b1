"""The fault matrix: one test per fault, the in-process poller against the simulator over HTTP.

Each test shows, for its fault, that the poll reports it (api_requests_total by outcome,
poll_errors_total, the malformed counter) and logs it, that the exporter backs off (the client's
recorded retry waits; the poll loop's own waits for an outage), that the exposition keeps
rendering, and that once the fault clears every counter equals the simulator's ground truth.
Faults the simulator cannot make (a repeating cursor, an oversized page, bad records, future
timestamps) are injected by an httpx transport that rewrites real simulator responses.
docs/faults.md is the table of what these tests prove.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import anyio
import anyio.lowlevel
import httpx
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

import exporter.poller as poller_module
from exporter.client import ConnectClient
from exporter.collector import build_registry
from exporter.http import ExporterHTTPServer
from exporter.poller import Poller
from exporter.records import ENDPOINT_SHINY, ENDPOINT_VISITS
from exporter.simulator import SimConfig, SimServer, Simulator
from exporter.store import SqliteStore
from tests.support import (
    FAR_FUTURE,
    TUESDAY_AFTERNOON,
    Connect,
    assert_counters_match_truth,
    assert_matches_truth,
    make_poller,
)

pytestmark = pytest.mark.anyio

VISITS_PATH = "content/visits"
LONE_GUID = "0badc0de-0000-4000-8000-0000000000f5"  # content with no generated traffic


# --- the rig --------------------------------------------------------------------------------


class Backoff:
    """The client's sleep: records each retry wait and yields instead of sleeping it."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)
        await anyio.lowlevel.checkpoint()


@dataclass
class Rig:
    client: ConnectClient
    poller: Poller
    store: SqliteStore
    backoff: Backoff

    @property
    def requests(self) -> dict[tuple[str, str], int]:
        return self.poller.health.requests()

    def exposition(self) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
        """What /metrics would answer now."""
        text = generate_latest(
            build_registry(lambda: self.poller.snapshot, self.poller.health)
        ).decode()
        out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
        return out

    async def close(self) -> None:
        await self.client.aclose()
        self.store.close()


async def rig(
    connect: Connect,
    path: Path,
    *,
    max_retries: int = 3,
    request_timeout: float = 5.0,
    backoff_max: float = 30.0,
    transport: httpx.AsyncBaseTransport | None = None,
    load: bool = True,
    clock: Callable[[], float] | None = None,
) -> Rig:
    """make_poller's exporter, with a client whose waits are recorded and jitter-free."""
    original, poller, store = make_poller(
        connect, path, max_retries=max_retries, timeout=request_timeout
    )
    await original.aclose()
    backoff = Backoff()
    client = ConnectClient(
        connect.url,
        connect.sim.keys["admin"],
        timeout=request_timeout,
        max_retries=max_retries,
        backoff_base=0.01,
        backoff_max=backoff_max,
        observer=poller.health.observe_request,
        sleep=backoff,
        jitter=lambda cap: cap,
        transport=transport,
    )
    poller.client = client
    if clock is not None:
        poller.clock = clock
    if load:
        await poller.load()
        assert await poller.poll_all_once()
    return Rig(client, poller, store, backoff)


def messages(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == level]


# --- simulator-native faults: transient (retried away) and persistent (the poll fails) -----


@dataclass(frozen=True)
class Fault:
    spec: dict[str, Any]
    outcome: str  # the api_requests_total status label it shows as
    injected: str | None  # the simulator's own count label (None: latency, not a failure)
    retried: bool = True
    timeout: float = 5.0
    waits: Callable[[int], list[float]] = field(
        default=lambda n: [min(0.01 * 2**i, 30.0) for i in range(n)]
    )
    log_detail: str = ""


def _retry_after(n: int) -> list[float]:
    return [7.0] * n


FAULTS = {
    # Far beyond the timeout, and the timeout far beyond a loaded machine's answer.
    "timeout": Fault({"latency": 1.5}, "timeout", None, timeout=0.5, log_detail="ReadTimeout"),
    "connection_reset": Fault(
        {"reset_rate": 1.0}, "connection_error", "reset", log_detail="RemoteProtocolError"
    ),
    "http_500": Fault({"error_rate": {"500": 1.0}}, "500", "500", retried=False),
    "http_502": Fault({"error_rate": {"502": 1.0}}, "502", "502", log_detail="HTTP 502"),
    "http_503": Fault({"error_rate": {"503": 1.0}}, "503", "503", log_detail="HTTP 503"),
    "http_504": Fault({"error_rate": {"504": 1.0}}, "504", "504", log_detail="HTTP 504"),
    "http_429_retry_after": Fault(
        {"error_rate": {"429": 1.0}, "retry_after": 7},
        "429",
        "429",
        waits=_retry_after,
        log_detail="retry 1 of 3 in 7.00s",
    ),
    "http_429_no_retry_after": Fault(
        {"error_rate": {"429": 1.0}}, "429", "429", log_detail="retry 1 of 3 in 0.01s"
    ),
    "malformed_json": Fault(
        {"malformed_rate": 1.0}, "invalid_response", "malformed", log_detail="not valid JSON"
    ),
    "truncated_body": Fault(
        {"truncate_rate": 1.0}, "connection_error", "truncate", log_detail="RemoteProtocolError"
    ),
    "html_page_200": Fault(
        {"html_rate": 1.0}, "invalid_response", "html", log_detail="an HTML page, not JSON"
    ),
}


@pytest.mark.parametrize("name", list(FAULTS))
async def test_simulator_fault(
    name: str, connect: Connect, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fault = FAULTS[name]
    sim = connect.sim
    caplog.set_level(logging.WARNING)
    r = await rig(connect, tmp_path / "s.sqlite", request_timeout=fault.timeout)
    key = (ENDPOINT_VISITS, fault.outcome)
    sim.clock.advance(1800)

    # Transient: the next visits requests fail. Retried faults cost a wait each and the poll
    # succeeds; a 500 is not retried (Connect's own bug, not load): that poll fails, the next
    # one succeeds.
    transient = 2 if fault.retried else 1
    sim.faults.configure({**fault.spec, "count": transient, "paths": [VISITS_PATH]})
    assert await r.poller.poll_once("visits") is fault.retried
    assert r.requests[key] == transient
    if fault.retried:
        assert r.backoff.delays == fault.waits(2)
        warnings = [m for m in messages(caplog, logging.WARNING) if ENDPOINT_VISITS in m]
        assert len(warnings) == 2
        assert fault.log_detail in warnings[0]
        assert r.poller.health.poll_errors()["visits"] == 0
    else:
        assert r.backoff.delays == []
        assert r.poller.health.poll_errors()["visits"] == 1
        assert "HTTP 500" in messages(caplog, logging.ERROR)[0]
        assert await r.poller.poll_once("visits")
    assert await r.poller.poll_all_once()
    assert_matches_truth(r.poller, sim)

    # Persistent: every visits request fails; the poll gives up, the other streams go on.
    caplog.clear()
    errors_before = r.poller.health.poll_errors()["visits"]
    requests_before = r.requests.get(key, 0)
    r.backoff.delays.clear()
    sim.clock.advance(600)
    sim.faults.configure({**fault.spec, "paths": [VISITS_PATH]})
    assert not await r.poller.poll_once("visits")
    assert await r.poller.poll_once("shiny")
    attempts = 4 if fault.retried else 1
    assert r.requests[key] - requests_before == attempts
    assert r.backoff.delays == (fault.waits(3) if fault.retried else [])
    if fault.injected is not None:
        assert sim.faults.injected[fault.injected] == r.requests[key]
    errors = [m for m in messages(caplog, logging.ERROR) if m.startswith("poll of visits failed")]
    assert len(errors) == 1
    assert ENDPOINT_VISITS in errors[0]
    m = r.exposition()
    assert m["connect_usage_up"][()] == 0.0
    assert m["connect_usage_poll_errors_total"][(("stream", "visits"),)] == errors_before + 1
    assert (
        m["connect_usage_api_requests_total"][
            (("endpoint", ENDPOINT_VISITS), ("status", fault.outcome))
        ]
        == r.requests[key]
    )
    truth = sim.truth(r.poller.snapshot.counting_since or 0, FAR_FUTURE)
    assert dict(r.poller.snapshot.usage.shiny_sessions_total) == truth["sessions_started"]

    sim.faults.clear()
    assert await r.poller.poll_all_once()
    assert r.exposition()["connect_usage_up"][()] == 1.0
    assert_matches_truth(r.poller, sim)
    await r.close()


# --- pages a proxy empties: valid answers without the records --------------------------------


SHINY_PATH = "instrumentation/shiny"


async def test_running_sessions_missing_from_two_walks_count_once(
    connect: Connect, tmp_path: Path
) -> None:
    """A proxy answers two walks in a row with a valid, empty page of Shiny sessions.

    Every session running then is missing from both: it is closed as abandoned at the first,
    and when Connect lists it again it is the same session, not a new one (its key outlived the
    second walk). Found over HTTP: 36 sessions counted where 33 had started.
    """
    sim = connect.sim
    r = await rig(connect, tmp_path / "s.sqlite")
    sim.clock.advance(60)
    t = sim.clock.now()
    for i in range(3):  # whatever the generated traffic holds, three sessions run throughout
        sim.add_shiny_session(LONE_GUID, sim.world.users[i].guid, t - 10 - i, None)
    assert await r.poller.poll_all_once()
    running = sim.truth(sim.clock.now(), FAR_FUTURE)["sessions_running"]
    assert running[LONE_GUID] == 3
    assert dict(r.poller.snapshot.usage.shiny_sessions_active) == running
    assert r.poller.snapshot.usage.shiny_sessions_abandoned_total == {}

    sim.faults.configure({"empty_rate": 1.0, "paths": [SHINY_PATH], "count": 2})
    for _ in range(2):
        sim.clock.advance(20)  # well inside the overlap: the next good walk re-reads it all
        assert await r.poller.poll_once("shiny")  # a valid answer: nothing tells it apart
        assert LONE_GUID not in r.poller.snapshot.usage.shiny_sessions_active
    assert sim.faults.injected["empty"] == 2

    sim.clock.advance(20)
    assert await r.poller.poll_all_once()
    assert await r.poller.poll_all_once()
    assert_counters_match_truth(r.poller, sim)  # no session counted twice
    usage = r.poller.snapshot.usage
    assert dict(usage.shiny_sessions_abandoned_total) == running  # each one once
    assert LONE_GUID not in usage.shiny_sessions_active  # listed again, but abandoned for good
    await r.close()

    # Restarted on the file, the keys are there: the next walk counts none of them again.
    sim.clock.advance(20)
    r = await rig(connect, tmp_path / "s.sqlite")
    assert dict(r.poller.snapshot.usage.shiny_sessions_abandoned_total) == running
    assert_counters_match_truth(r.poller, sim)
    await r.close()


# --- injected through a rewriting transport ------------------------------------------------


Rewrite = Callable[[httpx.Request, dict[str, Any]], dict[str, Any] | None]


class Rewriter(httpx.AsyncBaseTransport):
    """Real HTTP to the simulator; `rewrite` may change a usage page's JSON on its way back."""

    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.rewrite: Rewrite | None = None
        self.redirect: Callable[[httpx.Request], httpx.Request] | None = None

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self.redirect is not None:
            request = self.redirect(request)
        response = await self.inner.handle_async_request(request)
        if self.rewrite is None or response.status_code != 200:
            return response
        body = await response.aread()
        await response.aclose()
        changed = self.rewrite(request, json.loads(body))
        if changed is not None:
            body = json.dumps(changed).encode()
        headers = [
            (k, v)
            for k, v in response.headers.multi_items()
            if k.lower() not in ("content-length", "content-encoding", "transfer-encoding")
        ]
        return httpx.Response(response.status_code, headers=headers, content=body)

    async def aclose(self) -> None:
        await self.inner.aclose()


def is_visits(request: httpx.Request) -> bool:
    return request.url.path.endswith("/" + ENDPOINT_VISITS)


async def test_a_repeating_cursor(
    connect: Connect, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Connect answers the next page with the first page and the same cursor, forever."""
    sim = connect.sim
    caplog.set_level(logging.WARNING)
    transport = Rewriter()
    r = await rig(connect, tmp_path / "s.sqlite", transport=transport)
    sim.clock.advance(3 * 3600)

    def loop_cursor(request: httpx.Request) -> httpx.Request:
        if is_visits(request) and request.url.params.get("next") == "LOOP":
            return httpx.Request(
                "GET", request.url.copy_remove_param("next"), headers=request.headers
            )
        return request

    def set_loop(request: httpx.Request, body: dict[str, Any]) -> dict[str, Any] | None:
        if not is_visits(request):
            return None
        body["paging"] = {"cursors": {"next": "LOOP"}}
        return body

    transport.redirect, transport.rewrite = loop_cursor, set_loop
    assert not await r.poller.poll_once("visits")
    errors = [m for m in messages(caplog, logging.ERROR) if "poll of visits failed" in m]
    assert len(errors) == 1
    assert "sent the cursor 'LOOP' a second time" in errors[0]
    assert r.poller.health.poll_errors()["visits"] == 1
    assert r.exposition()["connect_usage_up"][()] == 0.0
    # The first page was committed; the repeat of it must not have been counted again.
    truth = sim.truth(r.poller.snapshot.counting_since or 0, FAR_FUTURE)["visits"]
    counted = dict(r.poller.snapshot.usage.content_visits_total)
    assert all(counted.get(g, 0) <= n for g, n in truth.items()), "a repeated page was counted"

    transport.redirect = transport.rewrite = None
    assert await r.poller.poll_all_once()
    assert_matches_truth(r.poller, sim)
    await r.close()


async def test_a_page_larger_than_limit(
    connect: Connect, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    sim = connect.sim
    caplog.set_level(logging.WARNING)
    transport = Rewriter()
    r = await rig(connect, tmp_path / "s.sqlite", transport=transport)
    sim.clock.advance(1800)
    t = sim.clock.now()  # a visit in range whatever the hour (simulated traffic is diurnal)
    sim.add_visit(sim.world.content[1].guid, sim.world.users[2].guid, t - 30, user_agent="x/1")
    oversized = 0

    def pad(request: httpx.Request, body: dict[str, Any]) -> dict[str, Any] | None:
        nonlocal oversized
        if not is_visits(request) or not body["results"]:
            return None
        limit = int(request.url.params["limit"])
        body["results"] = (body["results"] * (limit + 1))[: limit + 1]
        oversized += 1
        return body

    transport.rewrite = pad
    assert not await r.poller.poll_once("visits")
    assert oversized == 4
    assert r.requests[(ENDPOINT_VISITS, "invalid_response")] == 4
    assert r.backoff.delays == [0.01, 0.02, 0.04]
    warnings = messages(caplog, logging.WARNING)
    assert "a cursor page holds 501 records, more than limit=500" in warnings[0]
    assert r.poller.health.poll_errors()["visits"] == 1
    truth = sim.truth(r.poller.snapshot.counting_since or 0, FAR_FUTURE)
    assert sum(r.poller.snapshot.usage.content_visits_total.values()) < sum(
        truth["visits"].values()
    )

    transport.rewrite = None
    assert await r.poller.poll_all_once()
    assert_matches_truth(r.poller, sim)
    await r.close()


BAD_VISITS: list[Any] = [
    {"user_guid": None, "time": "2026-01-01T00:00:00Z"},  # content_guid missing
    {"content_guid": LONE_GUID, "user_guid": None, "time": 1767225600},  # time a number
    {"content_guid": LONE_GUID, "user_guid": ["x"], "time": "2026-01-01T00:00:00Z"},
    "not an object",
]
BAD_SHINY: list[Any] = [
    {"content_guid": LONE_GUID, "user_guid": None, "started": None, "ended": None},
    {"content_guid": 42, "user_guid": None, "started": "2026-01-01T00:00:00Z", "ended": None},
]


async def test_records_with_missing_extra_and_mistyped_fields(
    connect: Connect, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    sim = connect.sim
    caplog.set_level(logging.WARNING)
    transport = Rewriter()
    r = await rig(connect, tmp_path / "s.sqlite", transport=transport)
    sim.clock.advance(1800)
    guid, user = sim.world.content[3].guid, sim.world.users[4].guid
    t = sim.clock.now()
    sim.add_visit(guid, user, t - 10, user_agent="Mozilla/5.0")  # a real visit to decorate
    sim.add_shiny_session(guid, user, t - 20, t - 15)

    def spoil(request: httpx.Request, body: dict[str, Any]) -> dict[str, Any] | None:
        shiny = request.url.path.endswith("/" + ENDPOINT_SHINY)
        if not (shiny or is_visits(request)):
            return None
        results = body["results"]
        if body.get("paging", {}).get("cursors", {}).get("next"):
            return None  # the bad records ride on the last page of each walk
        for record in results:  # extra fields on real records: ignored, still counted
            record["unexpected"] = {"nested": [1, 2]}
            record["__proto__"] = None
        results.extend(BAD_SHINY if shiny else BAD_VISITS)
        return body

    transport.rewrite = spoil
    for _ in range(3):  # the same bad records on every walk inside the overlap count once
        assert await r.poller.poll_all_once()
        sim.clock.advance(20)
    transport.rewrite = None
    skipped = [m for m in messages(caplog, logging.WARNING) if "malformed record" in m]
    assert len(skipped) == 3 * (len(BAD_VISITS) + len(BAD_SHINY))
    assert any("content_guid" in m for m in skipped)
    snap = r.poller.snapshot
    assert snap.usage.excluded_events_total[("visits", "malformed")] == len(BAD_VISITS)
    assert snap.usage.excluded_events_total[("shiny", "malformed")] == len(BAD_SHINY)
    m = r.exposition()["connect_usage_excluded_events_total"]
    assert m[(("reason", "malformed"), ("stream", "visits"))] == len(BAD_VISITS)
    assert r.poller.health.poll_errors() == {"shiny": 0, "visits": 0, "hits": 0, "metadata": 0}
    assert await r.poller.poll_all_once()
    assert_matches_truth(r.poller, sim)  # every good record exact, decorated ones included
    await r.close()


async def test_a_bad_open_session_that_every_slice_meets_counts_once(
    connect: Connect, tmp_path: Path
) -> None:
    # Connect returns a session without an end on every call, so a catch-up's slices all meet
    # it; a malformed one was counted once per slice.
    sim = connect.sim
    transport = Rewriter()
    r = await rig(connect, tmp_path / "s.sqlite", transport=transport)
    await r.close()
    sim.clock.advance(12 * 3600)  # an outage, then a restart: the walk is cut into slices
    r = await rig(connect, tmp_path / "s.sqlite", transport=transport, load=False)
    await r.poller.load()
    bad = {"content_guid": LONE_GUID, "user_guid": 7, "started": "2026-01-01T00:00:00Z",
           "ended": None}  # fmt: skip
    pages = [0]

    def spoil(request: httpx.Request, body: dict[str, Any]) -> dict[str, Any] | None:
        if not request.url.path.endswith("/" + ENDPOINT_SHINY):
            return None
        pages[0] += 1
        body["results"].insert(0, bad)  # sorted first: it started long ago
        return body

    transport.rewrite = spoil
    assert await r.poller.poll_all_once()
    assert await r.poller.poll_all_once()
    transport.rewrite = None
    assert pages[0] > 4  # several slices, each of which met it
    assert r.poller.snapshot.usage.excluded_events_total[("shiny", "malformed")] == 1
    assert_matches_truth(r.poller, sim)
    await r.close()


class TruthPlus:
    """The simulator's truth plus visits only the exporter was shown (anonymous ones)."""

    def __init__(self, sim: Simulator, extra: list[tuple[str, float]]) -> None:
        self.sim = sim
        self.extra = extra

    def truth(self, start: float, end: float) -> dict[str, Any]:
        truth = self.sim.truth(start, end)
        for guid, at in self.extra:
            if start <= at < end:
                truth["visits"][guid] = truth["visits"].get(guid, 0) + 1
        return truth


async def test_timestamps_in_the_future(
    connect: Connect, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A visit stamped a day ahead is counted once, and never drags the mark into the future."""
    sim = connect.sim
    transport = Rewriter()
    r = await rig(connect, tmp_path / "s.sqlite", transport=transport)
    future = float(int(sim.clock.now()) + 86400)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(future))
    record = {
        "content_guid": LONE_GUID,
        "user_guid": None,
        "variant_key": None,
        "rendering_id": None,
        "bundle_id": None,
        "time": stamp,
        "data_version": 1,
        "path": "/",
        "user_agent": "Mozilla/5.0",
    }

    def inject(request: httpx.Request, body: dict[str, Any]) -> dict[str, Any] | None:
        if not is_visits(request) or body.get("paging", {}).get("cursors", {}).get("next"):
            return None
        body["results"] = sorted([*body["results"], record], key=lambda v: v["time"])
        return body

    transport.rewrite = inject
    for step in (600, 3600, 6 * 3600, 20 * 3600, 3600):  # before and after its time passes
        sim.clock.advance(step)
        assert await r.poller.poll_all_once()
        hwm = r.poller.snapshot.high_water_mark["visits"]
        assert hwm <= sim.clock.now(), "a future record moved the mark past Connect's now"
        assert r.poller.snapshot.usage.content_visits_total[LONE_GUID] == 1
    assert sim.clock.now() > future + 360  # it is in the past now, beyond the overlap
    assert_matches_truth(r.poller, cast(Simulator, TruthPlus(sim, [(LONE_GUID, future)])))
    await r.close()


# --- clock skew and outages ----------------------------------------------------------------


SKEWS = [-5.5 * 3600, 7 * 3600]


@pytest.fixture(params=SKEWS, ids=["connect_behind", "connect_ahead"])
def skewed(request: pytest.FixtureRequest) -> Iterator[tuple[Connect, float]]:
    """A Connect whose clock is hours away from the exporter's, and that skew."""
    sim = Simulator(
        SimConfig(seed=7, content=25, users=60, history_days=3, sessions_per_day=300,
                  visits_per_day=900),
        now=TUESDAY_AFTERNOON + request.param,
        paused=True,
    )  # fmt: skip
    server = SimServer(sim)
    try:
        yield Connect(sim, server.start()), request.param
    finally:
        server.stop()


def running_from(instant: float) -> Callable[[], float]:
    """The exporter's own clock for a test: real seconds passing from a fixed instant."""
    origin = time.monotonic()
    return lambda: instant + (time.monotonic() - origin)


async def test_clock_skew_between_connect_and_the_exporter(
    skewed: tuple[Connect, float], tmp_path: Path
) -> None:
    """Epoch, marks and windows follow Connect's Date header, not the exporter's clock."""
    connect, skew = skewed
    sim = connect.sim
    exporter_clock = running_from(TUESDAY_AFTERNOON)
    assert abs(exporter_clock() + skew - sim.clock.now()) < 60
    r = await rig(connect, tmp_path / "s.sqlite", clock=exporter_clock)
    snap = r.poller.snapshot
    assert snap.counting_since == float(int(sim.clock.now()))
    for step in (300, 1800, 3 * 3600):
        sim.clock.advance(step)
        assert await r.poller.poll_all_once()
        assert_matches_truth(r.poller, sim)
    snap = r.poller.snapshot
    # Connect's clock is paused; the exporter reads it from Date (1 s resolution).
    assert abs(r.poller.connect_now() - sim.clock.now()) <= 2.0
    assert abs(snap.high_water_mark["visits"] - (int(sim.clock.now()) - 1)) <= 2.0
    # Health never mixes the clocks: the lag is Connect's now minus its mark, the offset says
    # the skew, the last successful poll is the exporter's time (what Prometheus compares).
    health = r.poller.health
    for stream in ("shiny", "visits"):
        assert 0 <= health.value("poll_lag_seconds", stream=stream) <= 3.0
        last = health.value("last_successful_poll_timestamp_seconds", stream=stream)
        assert exporter_clock() - 60 < last <= exporter_clock()
    offset = health.value("connect_clock_offset_seconds")
    assert abs(offset - (sim.clock.now() - exporter_clock())) <= 2.0
    assert abs(offset) > 3600  # hours apart, and the lag above unaffected
    await r.close()


class LoopClock:
    """Stands in for `anyio` inside exporter.poller: records the poll loop's waits."""

    def __init__(self, stop_after: int) -> None:
        self.waits: list[float] = []
        self.stop_after = stop_after
        self.scope = anyio.CancelScope()

    def __getattr__(self, name: str) -> Any:
        return getattr(anyio, name)

    async def sleep(self, seconds: float) -> None:
        self.waits.append(seconds)
        if len(self.waits) >= self.stop_after:
            self.scope.cancel()
        await anyio.lowlevel.checkpoint()


@pytest.fixture
def stoppable() -> Iterator[tuple[Connect, SimServer]]:
    """The `connect` fixture's Connect, with its server in hand so a test can stop it."""
    sim = Simulator(
        SimConfig(seed=7, content=25, users=60, history_days=3, sessions_per_day=300,
                  visits_per_day=900),
        now=TUESDAY_AFTERNOON,
        paused=True,
    )  # fmt: skip
    server = SimServer(sim)
    url = server.start()
    try:
        yield Connect(sim, url), server
    finally:
        server.stop()


async def test_connect_down_longer_than_the_overlap(
    stoppable: tuple[Connect, SimServer],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    connect, first_server = stoppable
    sim = connect.sim
    caplog.set_level(logging.WARNING)
    r = await rig(connect, tmp_path / "s.sqlite", max_retries=1)
    http = ExporterHTTPServer(
        build_registry(lambda: r.poller.snapshot, r.poller.health), host="127.0.0.1", port=0,
        readiness=r.poller.readiness,
    )  # fmt: skip
    http.start()
    metrics_url = f"http://127.0.0.1:{http.port}/metrics"
    port = int(connect.url.rsplit(":", 1)[1])
    server = SimServer(sim, port=port)
    try:
        await anyio.to_thread.run_sync(first_server.stop)
        loop = LoopClock(stop_after=14)
        monkeypatch.setattr(poller_module, "anyio", loop)
        with loop.scope:
            await r.poller.run()
        monkeypatch.undo()
        # Every loop failed and waited, doubling: 1, 2, 4, 8, 16, 16 s for the three streams
        # (poll interval 1 s), 60, 120, 240, 300 s for metadata (interval 60 s); never a spin.
        errors = r.poller.health.poll_errors()
        streams = sorted(w for w in loop.waits if w < 60)
        meta = sorted(w for w in loop.waits if w >= 60)
        # Each failure is followed by its wait, but for a loop whose failed poll was still
        # publishing when the stop came (at most one per loop, the stopping one excepted).
        assert 0 <= errors["shiny"] + errors["visits"] + errors["hits"] - len(streams) <= 3
        assert 0 <= errors["metadata"] - len(meta) <= 1
        for waits, ladder, loops in (
            (streams, [1.0, 2.0, 4.0, 8.0, 16.0], 3),
            (meta, [60.0, 120.0, 240.0, 300.0], 1),
        ):
            assert set(waits) <= set(ladder), waits
            steps = [waits.count(w) for w in ladder[:-1]]  # the cap may repeat; steps may not
            assert steps == sorted(steps, reverse=True) and steps[0] <= loops, waits
        assert errors["shiny"] >= 2 and errors["visits"] >= 2
        assert any(m.startswith("poll of visits failed") for m in messages(caplog, logging.ERROR))
        assert r.requests[(ENDPOINT_VISITS, "connection_error")] >= 4
        body = await anyio.to_thread.run_sync(lambda: httpx.get(metrics_url, timeout=5).text)
        assert "connect_usage_up 0.0" in body
        sim.clock.advance(8 * 3600)  # far longer than the 6-minute overlap
        server.start()  # Connect is back, on the same address
        assert await r.poller.poll_all_once()
        assert_matches_truth(r.poller, sim)
        body = await anyio.to_thread.run_sync(lambda: httpx.get(metrics_url, timeout=5).text)
        assert "connect_usage_up 1.0" in body
    finally:
        http.stop()
        server.stop()
        await r.close()
