"""Posit's own Python client, pointed at the simulator, agrees with the simulator's truth.

If posit-sdk can walk the simulator and count what the truth counts, the simulator speaks
Connect's dialect (auth header, cursor paging, offset paging, shapes) well enough to stand in
for a real server.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from exporter.simulator import SimConfig, SimServer, Simulator

connect = pytest.importorskip("posit.connect")

NOW = 1_750_000_000.0


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[Simulator, str]]:
    config = SimConfig(
        seed=21,
        content=25,
        users=60,
        history_days=4,
        sessions_per_day=250,
        visits_per_day=600,
        connect_version="2026.01.0",
    )
    sim = Simulator(config, now=NOW, paused=True)
    with SimServer(sim) as srv:
        yield sim, srv.url


def client(url: str, key: str) -> Any:
    return connect.Client(url=url, api_key=key)


def everything(sim: Simulator) -> dict[str, Any]:
    # A window wider than the whole history: every visible event is in it.
    return sim.truth(NOW - 365 * 86400, NOW + 1)


def test_usage_find_counts_every_visible_session_and_visit(served: Any) -> None:
    sim, url = served
    c = client(url, sim.keys["admin"])  # posit-sdk holds the client weakly: keep a reference
    events = c.metrics.usage.find()
    totals = everything(sim)["totals"]
    # Every session has started by now; every visit, synthetic or not, is a usage event.
    expected = totals["sessions_started"] + totals["visits"] + totals["synthetic_visits"]
    assert len(events) == expected
    assert sum(1 for e in events if e.ended is None) == totals["sessions_running"]


def test_usage_find_with_a_window_and_content(served: Any) -> None:
    sim, url = served
    c = client(url, sim.keys["admin"])
    start = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(NOW - 86400))
    visits = c.metrics.usage.find(start=start)
    truth = sim.truth(NOW - 86400, NOW + 1)["totals"]
    shiny_rows = [e for e in visits if e.started != e.ended]
    visit_rows = [e for e in visits if e.started == e.ended]
    assert len(visit_rows) == truth["visits"] + truth["synthetic_visits"]
    # Shiny `from` keeps sessions that ended at/after it and all running ones.
    assert len(shiny_rows) == truth["sessions_ended"] + truth["sessions_running"]


def test_users_and_content_find(served: Any) -> None:
    sim, url = served
    c = client(url, sim.keys["admin"])
    totals = everything(sim)["totals"]
    users = c.users.find()
    assert len(users) == totals["users"]
    assert len({u["guid"] for u in users}) == totals["users"]
    content = c.content.find(include="owner")
    assert len(content) == totals["content"]
    assert all(item["owner"]["guid"] == item["owner_guid"] for item in content)
    assert len(c.groups.find()) == len(sim.world.groups)


def test_server_version_and_hits(served: Any) -> None:
    sim, url = served
    c = client(url, sim.keys["admin"])
    assert c.version == "2026.01.0"
    hits = c.metrics.hits.fetch(**{"from": "2025-06-14T00:00:00Z", "to": "2025-06-15T00:00:00Z"})
    assert len(hits) > 0


def test_sdk_raises_connects_error_for_a_viewer(served: Any) -> None:
    sim, url = served
    from posit.connect.errors import ClientError

    viewer = client(url, sim.keys["viewer"])
    with pytest.raises(ClientError) as info:
        viewer.metrics.usage.find()
    assert info.value.http_status == 403
