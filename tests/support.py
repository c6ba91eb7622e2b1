"""Helpers for tests against the simulator: an in-process exporter, and truth comparisons."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio

from exporter.client import ConnectClient
from exporter.health import Health
from exporter.model import US, USER_WINDOWS, WINDOW_SECONDS, Rules, UsageModel
from exporter.poller import Poller
from exporter.simulator import Simulator
from exporter.store import SqliteStore
from exporter.streams import STREAMS

FAR_FUTURE = 1e11
# Where every simulator of the tests starts its clock: a fixed instant, never the wall clock, so
# the traffic a test reads is the same at whatever hour the suite runs.
TUESDAY_AFTERNOON = 1_764_079_200.0  # 2025-11-25T14:00:00Z


@dataclass
class Connect:
    sim: Simulator
    url: str


def make_poller(
    connect: Connect,
    state_path: Path,
    *,
    overlap: float = 360.0,  # the simulator writes ~1% of visits up to 5 minutes late
    max_session_age: float = 1e9,
    top_users: int = 0,
    max_retries: int = 8,
    timeout: float = 5.0,
    catchup_concurrency: int = 4,
    history_days: float = 0.0,
) -> tuple[ConnectClient, Poller, SqliteStore]:
    health = Health(s.name for s in STREAMS)
    client = ConnectClient(
        connect.url,
        connect.sim.keys["admin"],
        timeout=timeout,
        max_retries=max_retries,
        backoff_base=0.01,
        backoff_max=0.05,
        observer=health.observe_request,
    )
    store = SqliteStore(state_path)
    model = UsageModel(
        Rules(
            overlap_us=int(overlap * US),
            max_session_age_us=int(max_session_age * US),
            exclude_user_agents=("ContentHealthMonitor/",),
            track_user_hours=top_users > 0,
            history_us=int(history_days * 86400 * US),
        )
    )
    poller = Poller(
        client,
        model,
        store,
        poll_interval=1.0,
        metadata_interval=60.0,
        top_users=top_users,
        catchup_concurrency=catchup_concurrency,
        health=health,
    )
    return client, poller, store


def assert_matches_truth(poller: Poller, sim: Simulator) -> None:
    """Every usage figure of the snapshot equals the simulator's ground truth, exactly."""
    assert_counters_match_truth(poller, sim)
    snap = poller.snapshot
    usage = snap.usage
    now = snap.windows_evaluated_at
    assert now is not None
    assert dict(usage.shiny_sessions_active) == sim.truth(now, FAR_FUTURE)["sessions_running"]
    for window in USER_WINDOWS:
        expected = sim.truth(now - WINDOW_SECONDS[window], FAR_FUTURE)
        assert usage.active_users[window] == expected["distinct_users"], window
        if window != "1h":
            got = {g: n for (g, w), n in usage.content_active_users.items() if w == window and n}
            assert got == expected["content_distinct_users"], window


def assert_counters_match_truth(poller: Poller, sim: Simulator) -> None:
    """Every counter and histogram equals the truth (the gauges may differ by design: a session
    past the age limit is abandoned by the exporter but still "running" for Connect)."""
    snap = poller.snapshot
    usage = snap.usage
    assert snap.counting_since is not None
    truth = sim.truth(snap.counting_since, FAR_FUTURE)
    assert dict(usage.shiny_sessions_total) == truth["sessions_started"]
    durations = usage.shiny_session_duration
    assert {g: h.count for g, h in durations.items()} == truth["sessions_ended"]
    assert {g: h.sum for g, h in durations.items()} == {
        g: us / US for g, us in truth["session_microseconds"].items()
    }
    assert dict(usage.content_visits_total) == truth["visits"]
    assert (
        usage.excluded_events_total.get(("visits", "synthetic"), 0)
        == truth["totals"]["synthetic_visits"]
    )


class PageGate:
    """Holds the pages a client method yields after the first `after`, until `release()`.

    A test that must stop a walk "after two pages" waits for `held` instead of guessing how
    many pages some latency lets through, so it does the same at any speed and any hour.
    """

    def __init__(self, client: ConnectClient, method: str, after: int) -> None:
        self.after = after
        self.pages: list[Any] = []  # the pages let through
        self.held = anyio.Event()  # set when the next page is being held back
        self._release = anyio.Event()
        original = getattr(client, method)

        async def gated(*args: Any, **kwargs: Any) -> AsyncIterator[Any]:
            async with aclosing(original(*args, **kwargs)) as pages:
                async for page in pages:
                    if len(self.pages) >= self.after:
                        self.held.set()
                        await self._release.wait()
                    self.pages.append(page)
                    yield page

        setattr(client, method, gated)

    def release(self) -> None:
        self._release.set()


async def eventually(check: Callable[[], bool], within: float = 30.0) -> None:
    """Wait until `check()` holds: for what another task does in its own time (an apply)."""
    with anyio.fail_after(within):
        while not check():  # noqa: ASYNC110  # the state is another task's, no event to wait on
            await anyio.sleep(0.01)
