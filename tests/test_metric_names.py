"""The public metric contract, frozen: a rename, a type change or a new label fails here loudly.

Dashboards, alerts and recording rules depend on these names. Changing one is a deliberate act:
edit this list, the family's definition (`exporter/metrics.py` or `exporter/health.py`) and
README.md together (`python -m exporter.metrics` prints README's table), and say so in the
changelog.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from exporter.collector import build_registry
from exporter.health import Health
from exporter.metrics import contract, markdown_table
from exporter.model import (
    CONTENT_WINDOWS,
    DURATION_BUCKETS,
    USER_WINDOWS,
    HistogramValue,
    UsageView,
)
from exporter.snapshot import ContentInfo, MetadataView, Snapshot
from exporter.viewers import ViewerView

# (exposed family name, type, label names in order)
FROZEN: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("connect_usage_shiny_sessions_total", "counter", ("content_guid",)),
    ("connect_usage_shiny_session_duration_seconds", "histogram", ("content_guid",)),
    ("connect_usage_shiny_sessions_active", "gauge", ("content_guid",)),
    ("connect_usage_shiny_sessions_abandoned_total", "counter", ("content_guid",)),
    ("connect_usage_content_visits_total", "counter", ("content_guid",)),
    ("connect_usage_content_hits_total", "counter", ("content_guid",)),
    ("connect_usage_active_users", "gauge", ("window",)),
    ("connect_usage_content_active_users", "gauge", ("content_guid", "window")),
    ("connect_usage_content_last_activity_timestamp_seconds", "gauge", ("content_guid",)),
    ("connect_usage_content_created_timestamp_seconds", "gauge", ("content_guid",)),
    (
        "connect_usage_content_info",
        "gauge",
        ("content_guid", "content_name", "title", "app_mode", "access_type", "owner"),
    ),
    ("connect_usage_content_items", "gauge", ("app_mode", "access_type")),
    ("connect_usage_users", "gauge", ("role", "state")),
    ("connect_usage_user_info", "gauge", ("user_guid", "username", "role", "state")),
    ("connect_usage_group_info", "gauge", ("group_guid", "group_name")),
    ("connect_usage_group_member_info", "gauge", ("group_guid", "user_guid")),
    ("connect_usage_group_member_series_dropped", "gauge", ()),
    ("connect_usage_content_permissions", "gauge", ("content_guid", "principal_type", "role")),
    (
        "connect_usage_content_access_info",
        "gauge",
        ("content_guid", "principal_guid", "principal_type", "role"),
    ),
    ("connect_usage_excluded_events_total", "counter", ("stream", "reason")),
    ("connect_usage_content_viewer_sessions", "gauge", ("content_guid", "user_guid", "window")),
    (
        "connect_usage_content_viewer_session_seconds",
        "gauge",
        ("content_guid", "user_guid", "window"),
    ),
    ("connect_usage_content_viewer_visits", "gauge", ("content_guid", "user_guid", "window")),
    (
        "connect_usage_content_viewer_last_seen_timestamp_seconds",
        "gauge",
        ("content_guid", "user_guid"),
    ),
    ("connect_usage_content_viewer_series_dropped", "gauge", ("window",)),
    ("connect_usage_user_sessions", "gauge", ("user_guid", "window")),
    ("connect_usage_user_visits", "gauge", ("user_guid", "window")),
    ("connect_usage_user_series_dropped", "gauge", ("window",)),
    ("connect_usage_up", "gauge", ()),
    ("connect_usage_last_successful_poll_timestamp_seconds", "gauge", ("stream",)),
    ("connect_usage_poll_lag_seconds", "gauge", ("stream",)),
    ("connect_usage_connect_clock_offset_seconds", "gauge", ()),
    ("connect_usage_poll_duration_seconds", "histogram", ("stream",)),
    ("connect_usage_poll_errors_total", "counter", ("stream",)),
    ("connect_usage_api_requests_total", "counter", ("endpoint", "status")),
    ("connect_usage_events_ingested_total", "counter", ("stream",)),
    ("connect_usage_state_errors_total", "counter", ()),
    ("connect_usage_state_file_missing", "gauge", ()),
    ("connect_usage_high_water_mark_timestamp_seconds", "gauge", ("stream",)),
    ("connect_usage_counting_since_timestamp_seconds", "gauge", ()),
    ("connect_usage_windows_evaluated_timestamp_seconds", "gauge", ()),
    ("connect_usage_exporter_build_info", "gauge", ("version",)),
    ("connect_usage_server_info", "gauge", ("version",)),
)

README = Path(__file__).resolve().parent.parent / "README.md"
G = "6f300623-1e0c-48e6-a473-ddf630c0c0c3"
STREAMS = ("shiny", "visits", "hits")


def fully_populated() -> Snapshot:
    """Every mapping non-empty and every optional value known, so every family has samples."""
    duration = HistogramValue(tuple([1] * (len(DURATION_BUCKETS) + 1)), 10.0)
    return Snapshot(
        usage=UsageView(
            shiny_sessions_total={G: 1},
            shiny_session_duration={G: duration},
            shiny_sessions_active={G: 1},
            shiny_sessions_abandoned_total={G: 1},
            content_visits_total={G: 1},
            content_hits_total={G: 1},
            active_users=dict.fromkeys(USER_WINDOWS, 1),
            content_active_users={(G, w): 1 for w in CONTENT_WINDOWS},
            content_last_activity={G: 3.0},
            excluded_events_total={("visits", "synthetic"): 1},
            viewers=ViewerView(
                viewers={(G, "u", "7d"): (1, 5, 1)},
                viewers_dropped={"7d": 1},
                users={("u", "7d"): (1, 1)},
                users_dropped={"7d": 1},
            ),
            viewer_last_seen={(G, "u"): 3.0},
        ),
        metadata=MetadataView(
            content_items={("shiny", "acl"): 1},
            users={("viewer", "active"): 1},
            user_info={("u", "alice", "viewer", "active"): 1},
            group_info={("g", "Data Science"): 1},
            group_members={("g", "u"): 1},
            group_members_dropped=0,
            permissions={(G, "user", "viewer"): 1},
            access={(G, "u", "user", "viewer"): 1},
            server_version="2025.04.0",
        ),
        content_info={G: ContentInfo("n", "t", "shiny", "acl", "o", created=0.5)},
        counting_since=1.0,
        windows_evaluated_at=2.0,
        high_water_mark=dict.fromkeys(STREAMS, 5.0),
        streams=STREAMS,
    )


def busy_health() -> Health:
    """Health with every family holding a sample."""
    health = Health(STREAMS)
    health.observe_request("v1/content", "200", 0.1)
    for poll in (*STREAMS, "metadata"):
        health.record_poll(poll, 0.1, ok=True, at=4.0)
    for stream in STREAMS:
        health.lag(stream, 1.5)
    health.clock_offset(-3.0)
    return health


def exposed() -> list[tuple[str, str, tuple[str, ...]]]:
    """Every family of the real registry's exposition: name, type, label names."""
    text = generate_latest(build_registry(fully_populated, busy_health())).decode()
    got = []
    for family in text_string_to_metric_families(text):
        if not family.name.startswith("connect_usage_"):
            continue
        assert family.samples, f"{family.name} has no samples in a fully populated registry"
        label_sets = {tuple(k for k in s.labels if k != "le") for s in family.samples}
        assert len(label_sets) == 1, f"{family.name} has mixed label names: {label_sets}"
        name = family.name + "_total" if family.type == "counter" else family.name
        got.append((name, family.type, label_sets.pop()))
    return got


def test_the_exposition_matches_the_frozen_contract() -> None:
    def unordered(families: list[tuple[str, str, tuple[str, ...]]]) -> list[object]:
        return sorted((name, typ, sorted(labels)) for name, typ, labels in families)

    assert unordered(exposed()) == unordered(list(FROZEN))


def test_the_definitions_match_the_frozen_contract() -> None:
    assert sorted((name, typ, labels) for name, typ, _help, labels in contract()) == sorted(FROZEN)


def test_names_follow_the_conventions() -> None:
    for name, typ, _ in FROZEN:
        assert name.startswith("connect_usage_")
        assert name.endswith("_total") == (typ == "counter"), name
        assert not name.endswith(("_sum", "_count", "_bucket")), name


def test_readme_lists_every_family_as_defined() -> None:
    assert README.exists(), "README.md is missing at the repository root"
    assert markdown_table() in README.read_text(encoding="utf-8"), (
        "README's metric table differs from the definitions: paste `python -m exporter.metrics`"
    )


@pytest.mark.parametrize(("name", "typ", "labels"), FROZEN, ids=[n for n, _, _ in FROZEN])
def test_every_family_has_help(name: str, typ: str, labels: tuple[str, ...]) -> None:
    (doc,) = [d for n, _t, d, _l in contract() if n == name]
    assert doc.strip() and doc.endswith(".")
