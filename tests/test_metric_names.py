"""The public metric contract, frozen: a rename, a type change or a new label fails here loudly.

Dashboards, alerts and recording rules depend on these names. Changing one is a deliberate act:
edit this list, docs/design.md and README.md together, and say so in the changelog.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from exporter.collector import SnapshotCollector
from exporter.snapshot import (
    CONTENT_WINDOWS,
    DURATION_BUCKETS,
    POLL_BUCKETS,
    POLL_STREAMS,
    STREAMS,
    USER_WINDOWS,
    ContentInfo,
    HistogramValue,
    Snapshot,
)

# (exposed family name, type, label names in order)
FROZEN: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("connect_usage_shiny_sessions_total", "counter", ("content_guid",)),
    ("connect_usage_shiny_session_duration_seconds", "histogram", ("content_guid",)),
    ("connect_usage_shiny_sessions_active", "gauge", ("content_guid",)),
    ("connect_usage_shiny_sessions_abandoned_total", "counter", ("content_guid",)),
    ("connect_usage_content_visits_total", "counter", ("content_guid",)),
    ("connect_usage_active_users", "gauge", ("window",)),
    ("connect_usage_content_active_users", "gauge", ("content_guid", "window")),
    ("connect_usage_content_last_activity_timestamp_seconds", "gauge", ("content_guid",)),
    (
        "connect_usage_content_info",
        "gauge",
        ("content_guid", "content_name", "title", "app_mode", "access_type", "owner"),
    ),
    ("connect_usage_content_items", "gauge", ("app_mode", "access_type")),
    ("connect_usage_users", "gauge", ("role", "state")),
    ("connect_usage_content_permissions", "gauge", ("content_guid", "principal_type", "role")),
    ("connect_usage_excluded_events_total", "counter", ("stream", "reason")),
    ("connect_usage_user_events", "gauge", ("user_guid", "username", "window")),
    ("connect_usage_user_series_dropped_total", "counter", ("window",)),
    ("connect_usage_up", "gauge", ()),
    ("connect_usage_last_successful_poll_timestamp_seconds", "gauge", ("stream",)),
    ("connect_usage_poll_duration_seconds", "histogram", ("stream",)),
    ("connect_usage_poll_errors_total", "counter", ("stream",)),
    ("connect_usage_api_requests_total", "counter", ("endpoint", "status")),
    ("connect_usage_events_ingested_total", "counter", ("stream",)),
    ("connect_usage_state_errors_total", "counter", ()),
    ("connect_usage_high_water_mark_timestamp_seconds", "gauge", ("stream",)),
    ("connect_usage_counting_since_timestamp_seconds", "gauge", ()),
    ("connect_usage_windows_evaluated_timestamp_seconds", "gauge", ()),
    ("connect_usage_exporter_build_info", "gauge", ("version",)),
    ("connect_usage_server_info", "gauge", ("version",)),
)

README = Path(__file__).resolve().parent.parent / "README.md"
G = "6f300623-1e0c-48e6-a473-ddf630c0c0c3"


def fully_populated() -> Snapshot:
    """Every mapping non-empty and every optional value known, so every family has samples."""
    duration = HistogramValue(tuple([1] * (len(DURATION_BUCKETS) + 1)), 10.0)
    poll = HistogramValue(tuple([1] * (len(POLL_BUCKETS) + 1)), 1.0)
    return Snapshot(
        counting_since=1.0,
        windows_evaluated_at=2.0,
        shiny_sessions_total={G: 1},
        shiny_session_duration={G: duration},
        shiny_sessions_active={G: 1},
        shiny_sessions_abandoned_total={G: 1},
        content_visits_total={G: 1},
        active_users=dict.fromkeys(USER_WINDOWS, 1),
        content_active_users={(G, w): 1 for w in CONTENT_WINDOWS},
        content_last_activity={G: 3.0},
        content_info={G: ContentInfo("n", "t", "shiny", "acl", "o")},
        content_items={("shiny", "acl"): 1},
        users={("viewer", "active"): 1},
        content_permissions={(G, "user", "viewer"): 1},
        excluded_events_total={("visits", "synthetic"): 1},
        user_events={("u", "alice", "7d"): 1},
        user_series_dropped_total={"7d": 1},
        up=True,
        last_successful_poll=dict.fromkeys(POLL_STREAMS, 4.0),
        poll_duration=dict.fromkeys(POLL_STREAMS, poll),
        poll_errors_total=dict.fromkeys(POLL_STREAMS, 1),
        api_requests_total={("/v1/content", "200"): 1},
        events_ingested_total=dict.fromkeys(STREAMS, 1),
        high_water_mark=dict.fromkeys(STREAMS, 5.0),
        server_version="2025.04.0",
    )


def exposed(name: str, typ: str) -> str:
    """prometheus_client keeps counters without `_total` internally; the wire name has it."""
    return name + "_total" if typ == "counter" else name


def test_describe_matches_the_frozen_contract() -> None:
    collector = SnapshotCollector(fully_populated)
    described = [(exposed(m.name, m.type), m.type) for m in collector.describe()]
    assert described == [(name, typ) for name, typ, _ in FROZEN]


def test_collect_matches_the_frozen_contract() -> None:
    got: list[tuple[str, str, tuple[str, ...]]] = []
    for family in SnapshotCollector(fully_populated).collect():
        assert family.samples, f"{family.name} has no samples in a fully populated snapshot"
        label_sets = {tuple(k for k in s.labels if k != "le") for s in family.samples}
        assert len(label_sets) == 1, f"{family.name} has mixed label names: {label_sets}"
        got.append((exposed(family.name, family.type), family.type, label_sets.pop()))
    assert got == list(FROZEN)


def test_names_follow_the_conventions() -> None:
    for name, typ, _ in FROZEN:
        assert name.startswith("connect_usage_")
        assert name.endswith("_total") == (typ == "counter"), name
        assert not name.endswith(("_sum", "_count", "_bucket")), name


@pytest.mark.parametrize(("name", "typ", "labels"), FROZEN, ids=[n for n, _, _ in FROZEN])
def test_readme_documents_every_metric(name: str, typ: str, labels: tuple[str, ...]) -> None:
    assert README.exists(), "README.md is missing at the repository root"
    assert name in README.read_text(encoding="utf-8"), f"README.md does not mention {name}"
