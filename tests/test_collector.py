"""SnapshotCollector and SnapshotRenderer: exact exposition text, bucket math, pre-initialised
series, promtool lint, and the renderer byte-identical to prometheus_client."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as openmetrics_latest
from prometheus_client.registry import CollectorRegistry

from exporter.collector import (
    OPENMETRICS,
    TEXT,
    SnapshotCollector,
    SnapshotRenderer,
    build_registry,
)
from exporter.health import Health
from exporter.metrics import FAMILIES
from exporter.model import (
    CONTENT_WINDOWS,
    DURATION_BUCKETS,
    EXCLUDE_REASONS,
    USER_WINDOWS,
    HistogramValue,
    UsageView,
)
from exporter.snapshot import (
    DELETED_APP_MODE,
    DELETED_NAME,
    ContentInfo,
    MetadataView,
    Snapshot,
)
from exporter.viewers import ViewerView
from tests.prometheus import executable
from tests.snapshots import populated_snapshot

STREAMS = ("shiny", "visits")

GOLDEN = Path(__file__).parent / "golden" / "collector.prom"
APP = "6f300623-1e0c-48e6-a473-ddf630c0c0c3"
DOC = "0f4e5b2a-9c1d-4b8e-8f00-1a2b3c4d5e6f"
GONE = "deadbeef-0000-4000-8000-000000000000"


def handcrafted() -> Snapshot:
    """A small snapshot touching every family, with label values that need escaping."""
    duration = [0] * (len(DURATION_BUCKETS) + 1)
    duration[0], duration[3], duration[-1] = 2, 5, 1  # two ≤1 s, five ≤30 s, one > 1 day
    info = {
        APP: ContentInfo("sales-app", 'Sales "live" \\ dashboard', "shiny", "acl", "alice"),
        DOC: ContentInfo("report", "Quarterly\nreport", "rmd-static", "logged_in", "bob"),
    }
    return Snapshot(
        usage=UsageView(
            shiny_sessions_total={APP: 8, GONE: 1},
            shiny_session_duration={APP: HistogramValue(tuple(duration), 100_123.25)},
            shiny_sessions_active={APP: 1},
            shiny_sessions_abandoned_total={APP: 1},
            content_visits_total={APP: 12, DOC: 3},
            active_users={"24h": 4, "7d": 9},
            content_active_users={(APP, "24h"): 2, (APP, "30d"): 5},
            content_last_activity={APP: 1_735_999_999.25, DOC: 1_735_900_000.0},
            excluded_events_total={("visits", "synthetic"): 7},
            viewers=ViewerView(
                viewers={
                    (APP, "u-1", "24h"): (2, 630_250_000, 0),
                    (APP, "u-1", "7d"): (5, 1_800_500_000, 0),
                    (APP, "u-2", "7d"): (1, 0, 0),  # a session still running: no time yet
                    (DOC, "u-2", "30d"): (0, 0, 3),
                },
                viewers_dropped={"7d": 4},
                users={("u-1", "7d"): (5, 2), ("u-2", "7d"): (1, 3)},
                users_dropped={"30d": 12},
            ),
            viewer_last_seen={(APP, "u-1"): 1_735_999_000.5, (APP, "u-2"): 1_735_998_000.0},
        ),
        metadata=MetadataView(
            content=info,
            content_items={("shiny", "acl"): 1, ("rmd-static", "logged_in"): 1},
            users={("viewer", "active"): 10, ("publisher", "locked"): 1},
            user_info={
                ("u-1", "alice", "viewer", "active"): 1,
                ("u-2", 'o"neil', "publisher", "locked"): 1,
            },
            group_info={("g-1", "Data Science"): 1},
            permissions={(APP, "user", "viewer"): 3, (APP, "group", "owner"): 1},
            access={(APP, "u-1", "user", "viewer"): 1, (APP, "g-1", "group", "owner"): 1},
            server_version="2025.04.0",
        ),
        content_info={**info, GONE: ContentInfo(DELETED_NAME, "", DELETED_APP_MODE, "", "")},
        counting_since=1_735_000_000.0,
        windows_evaluated_at=1_736_000_000.5,
        high_water_mark={"shiny": 1_735_999_990.0},
        streams=STREAMS,
        taken_at=1_736_000_000.0,
    )


def render(snapshot: Snapshot) -> str:
    registry = CollectorRegistry()
    registry.register(SnapshotCollector(lambda: snapshot))
    return generate_latest(registry).decode()


def samples(snapshot: Snapshot) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    out = {}
    for family in SnapshotCollector(lambda: snapshot).collect():
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def key(name: str, **labels: str) -> tuple[str, frozenset[tuple[str, str]]]:
    return (name, frozenset(labels.items()))


def test_exposition_matches_golden_file() -> None:
    text = render(handcrafted())
    if os.environ.get("UPDATE_GOLDEN") == "1":
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(text)
    assert text == GOLDEN.read_text(), "exposition changed; rerun with UPDATE_GOLDEN=1 if intended"


def test_histogram_buckets_are_cumulative_with_count_and_sum() -> None:
    got = samples(handcrafted())
    name = "connect_usage_shiny_session_duration_seconds"
    les = ["1.0", "5.0", "15.0", "30.0", "60.0", "120.0", "300.0", "600.0", "1200.0", "1800.0"]
    les += ["3600.0", "7200.0", "14400.0", "28800.0", "86400.0", "+Inf"]
    expected = [2, 2, 2, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 8]
    assert [got[key(name + "_bucket", content_guid=APP, le=le)] for le in les] == expected
    assert got[key(name + "_count", content_guid=APP)] == 8
    assert got[key(name + "_sum", content_guid=APP)] == 100_123.25


def test_histogram_with_wrong_bucket_count_is_refused() -> None:
    bad = Snapshot(usage=UsageView(shiny_session_duration={APP: HistogramValue((1, 2, 3), 1.0)}))
    with pytest.raises(ValueError, match="3 bucket counts for 16 buckets"):
        list(SnapshotCollector(lambda: bad).collect())


def test_empty_snapshot_preinitialises_series() -> None:
    got = samples(Snapshot(streams=STREAMS))
    for window in USER_WINDOWS:
        assert got[key("connect_usage_active_users", window=window)] == 0
    for stream in STREAMS:
        for reason in EXCLUDE_REASONS:
            excluded = key("connect_usage_excluded_events_total", stream=stream, reason=reason)
            assert got[excluded] == 0
    names = {name for name, _ in got}
    # Unknown timestamps and an unknown server version are absent, not 0 (0 would read as 1970).
    for absent in (
        "connect_usage_high_water_mark_timestamp_seconds",
        "connect_usage_counting_since_timestamp_seconds",
        "connect_usage_windows_evaluated_timestamp_seconds",
        "connect_usage_server_info",
    ):
        assert absent not in names


def test_content_active_users_has_every_window_for_every_known_content() -> None:
    got = samples(handcrafted())
    # APP has usage, DOC has visits, GONE has sessions and a deleted _info: all get all windows.
    name = "connect_usage_content_active_users"
    for guid in (APP, DOC, GONE):
        for window in CONTENT_WINDOWS:
            assert key(name, content_guid=guid, window=window) in got
    assert got[key(name, content_guid=APP, window="24h")] == 2
    assert got[key(name, content_guid=APP, window="7d")] == 0
    assert got[key(name, content_guid=DOC, window="30d")] == 0


def test_deleted_content_keeps_usage_and_says_so_in_info() -> None:
    got = samples(handcrafted())
    assert got[key("connect_usage_shiny_sessions_total", content_guid=GONE)] == 1
    info = key(
        "connect_usage_content_info",
        content_guid=GONE,
        content_name=DELETED_NAME,
        title="",
        app_mode=DELETED_APP_MODE,
        access_type="",
        owner="",
    )
    assert got[info] == 1


def test_snapshot_values() -> None:
    got = samples(handcrafted())
    assert got[key("connect_usage_server_info", version="2025.04.0")] == 1
    assert got[key("connect_usage_counting_since_timestamp_seconds")] == 1_735_000_000.0
    mark = "connect_usage_high_water_mark_timestamp_seconds"
    assert got[key(mark, stream="shiny")] == 1_735_999_990.0
    assert key(mark, stream="visits") not in got


def test_describe_does_not_read_the_snapshot_and_collect_reads_it_once() -> None:
    calls: list[int] = []

    def get_snapshot() -> Snapshot:
        calls.append(1)
        return handcrafted()

    collector = SnapshotCollector(get_snapshot)
    registry = CollectorRegistry()
    registry.register(collector)
    described = [m.name for m in collector.describe()]
    assert calls == []
    assert [m.name for m in collector.collect()] == described
    assert calls == [1]
    generate_latest(registry)
    assert calls == [1, 1]


def test_build_registry_adds_health_and_process_metrics() -> None:
    text = generate_latest(build_registry(handcrafted, Health(STREAMS))).decode()
    assert "connect_usage_up 0.0" in text
    assert "connect_usage_shiny_sessions_total" in text
    assert "python_info" in text
    if Path("/proc/self/stat").exists():
        assert "process_resident_memory_bytes" in text


def _promtool() -> str:
    return executable("promtool")


@pytest.mark.parametrize("snapshot", [handcrafted(), Snapshot()], ids=["full", "empty"])
def test_promtool_check_metrics_is_silent(snapshot: Snapshot) -> None:
    promtool = _promtool()
    text = generate_latest(build_registry(lambda: snapshot, Health(STREAMS)))
    result = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, timeout=60, check=False
    )
    report = (result.stdout + result.stderr).decode()
    assert result.returncode == 0, report
    assert report.strip() == "", report


GOLDEN_OM = Path(__file__).parent / "golden" / "collector.om"


def edge_values() -> Snapshot:
    """Values on both sides of every formatting switch: small-int table, Go's exponent, floats."""
    guids = [f"g-{i}" for i in range(12)]
    values = [0, 1, 1023, 1024, 999_999, 1_000_000, 1_234_567, -5, -1_000_000, 2**53, 0.1, 1e-7]
    return Snapshot(
        usage=UsageView(
            shiny_sessions_total=dict(zip(guids, values, strict=True)),
            shiny_session_duration={"g-2": HistogramValue((0,) * 15 + (5,), float("nan"))},
            content_last_activity={g: float(v) + 0.25 for g, v in zip(guids, values, strict=True)},
            content_active_users={("g-1", "90d"): 3, ("g-1", "24h"): 1},
        ),
        content_info={"g-0": ContentInfo('a"b', "x\\y\nz", "shiny", "acl", "ünïcode ✓")},
        counting_since=float("inf"),
        windows_evaluated_at=10**7,  # type: ignore[arg-type]  # an int, as a count would be
    )


def reference(snapshot: Snapshot, encoder: object = generate_latest) -> bytes:
    registry = CollectorRegistry()
    registry.register(SnapshotCollector(lambda: snapshot))
    return encoder(registry)  # type: ignore[operator,no-any-return]


def test_openmetrics_exposition_matches_golden_file() -> None:
    text = reference(handcrafted(), openmetrics_latest).decode()
    if os.environ.get("UPDATE_GOLDEN") == "1":
        GOLDEN_OM.write_text(text)
    assert text == GOLDEN_OM.read_text(), "changed; rerun with UPDATE_GOLDEN=1 if intended"


def test_renderer_matches_both_golden_files() -> None:
    renderer = SnapshotRenderer()
    assert renderer.render(handcrafted(), TEXT).decode() == GOLDEN.read_text()
    om = renderer.render(handcrafted(), OPENMETRICS).decode() + "# EOF\n"
    assert om == GOLDEN_OM.read_text()


@pytest.mark.parametrize(
    "make",
    [handcrafted, Snapshot, edge_values, lambda: populated_snapshot(150, seed=3)],
    ids=["handcrafted", "empty", "edge-values", "populated"],
)
def test_renderer_is_byte_identical_to_prometheus_client(make: object) -> None:
    snapshot = make()  # type: ignore[operator]
    renderer = SnapshotRenderer()
    for _ in range(2):  # the second pass runs on the label templates
        assert renderer.render(snapshot, TEXT) == reference(snapshot)
        om = renderer.render(snapshot, OPENMETRICS) + b"# EOF\n"
        assert om == reference(snapshot, openmetrics_latest)


def test_renderer_pieces_are_bounded_and_make_the_text(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("exporter.collector._PIECE", 7)
    snapshot = populated_snapshot(150, seed=3)
    pieces = list(SnapshotRenderer().pieces(snapshot, OPENMETRICS))
    assert "".join(pieces).encode() + b"# EOF\n" == reference(snapshot, openmetrics_latest)
    bodies = [p for p in pieces if not p.startswith("#")]
    histograms = [p for p in bodies if "_bucket{" in p]
    assert max(p.count("\n") for p in bodies if p not in histograms) == 7
    # A histogram's lines stay together: one a piece when it alone has more than 7.
    assert histograms and all(p.count("_count{") == 1 for p in histograms)
    assert len(bodies) > len(FAMILIES)


def test_renderer_label_cache_follows_changed_content() -> None:
    renderer = SnapshotRenderer()
    before = Snapshot(content_info={APP: ContentInfo("old", "Old", "shiny", "acl", "alice")})
    after = Snapshot(content_info={APP: ContentInfo("new", "New", "shiny", "acl", "alice")})
    renderer.render(before)
    text = renderer.render(after).decode()
    assert text == reference(after).decode()
    assert 'content_name="new"' in text
    assert 'content_name="old"' not in text


def test_renderer_refuses_wrong_bucket_count_like_the_collector() -> None:
    bad = Snapshot(usage=UsageView(shiny_session_duration={APP: HistogramValue((1, 2, 3), 1.0)}))
    with pytest.raises(ValueError, match="3 bucket counts for 16 buckets"):
        SnapshotRenderer().render(bad)


def test_exporter_registry_keeps_live_collectors_apart() -> None:
    registry = build_registry(handcrafted, Health(STREAMS))
    runtime = generate_latest(registry.runtime).decode()
    assert "python_info" in runtime
    assert "connect_usage_up" in runtime  # the exporter's own health is rendered live
    assert "connect_usage_shiny_sessions_total" not in runtime  # the snapshot is cached
    assert generate_latest(registry).decode().startswith(GOLDEN.read_text())
