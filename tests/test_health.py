"""The exporter's own health metrics: every known label value at zero, then what happened."""

from __future__ import annotations

from prometheus_client import generate_latest

from exporter import __version__
from exporter.health import POLL_BUCKETS, Health

STREAMS = ("shiny", "visits")


def value(health: Health, name: str, **labels: str) -> float | None:
    return health.registry.get_sample_value("connect_usage_" + name, labels)


def test_every_known_series_starts_at_zero() -> None:
    health = Health(STREAMS)
    for stream in STREAMS:
        assert value(health, "events_ingested_total", stream=stream) == 0
    for poll in (*STREAMS, "metadata"):
        assert value(health, "poll_errors_total", stream=poll) == 0
        assert value(health, "poll_duration_seconds_count", stream=poll) == 0
        assert value(health, "poll_duration_seconds_bucket", stream=poll, le="+Inf") == 0
    assert value(health, "up") == 0
    assert value(health, "state_errors_total") == 0
    assert value(health, "exporter_build_info", version=__version__) == 1
    text = generate_latest(health.registry).decode()
    # An unknown timestamp is absent, not 0 (0 would read as 1970); no `_created` series.
    assert "last_successful_poll_timestamp_seconds{" not in text
    assert "_created" not in text


def test_polls_requests_commits_and_up() -> None:
    health = Health(STREAMS)
    health.observe_request("v1/content", "200", 0.1)
    health.observe_request("v1/content", "200", 0.1)
    health.observe_request("v1/users", "503", 0.1)
    assert health.requests() == {("v1/content", "200"): 2, ("v1/users", "503"): 1}
    health.record_poll("shiny", 0.07, ok=True, at=1_736_000_000.0)
    health.record_poll("visits", 2.0, ok=False, at=1_736_000_001.0)
    health.record_poll("metadata", 0.3, ok=True, at=1_735_999_000.0)
    assert value(health, "poll_duration_seconds_bucket", stream="shiny", le="0.05") == 0
    assert value(health, "poll_duration_seconds_bucket", stream="shiny", le="0.1") == 1
    assert value(health, "poll_duration_seconds_sum", stream="visits") == 2.0
    assert health.poll_errors() == {"shiny": 0, "visits": 1, "metadata": 0}
    assert value(health, "last_successful_poll_timestamp_seconds", stream="shiny") == 1.736e9
    assert value(health, "last_successful_poll_timestamp_seconds", stream="visits") is None
    assert value(health, "up") == 0 and not health.up  # visits failed
    health.record_poll("visits", 0.1, ok=True, at=1_736_000_002.0)
    assert value(health, "up") == 1 and health.up
    health.ingested("shiny", 9)
    health.state_error()
    assert health.ingested_total("shiny") == 9
    assert health.state_errors == 1
    assert len(POLL_BUCKETS) == 12
