"""A short soak (four simulated days, every fault kind) through the soak's own code (tests/soak.py).

The full month is ``python -m bench.soak`` (docs/soak.md); this keeps the same path honest in
CI: the real service, a fast clock, faults on and off, exact totals, and bounded de-dup keys.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.soak import FAULTS, Series, SoakConfig, compare_with_truth, run_soak
from tests.support import METRICS_URL, log_lines


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_short_soak_is_exact_and_keeps_keys_bounded() -> None:
    cfg = SoakConfig(
        days=4,
        speed=8640,  # four simulated days in 40 real seconds
        content=30,
        users=80,
        history_days=2,
        sessions_per_day=800,
        visits_per_day=2400,
        faults_every=1.5,
        fault_seconds=0.75,
        sample_every=1.0,
    )
    result = run_soak(cfg, say=lambda _line: None)

    assert result.caught_up, "the exporter never caught up with the stopped clock"
    assert result.mismatches == []
    assert result.exact
    assert result.events > 1000
    assert set(result.episodes) == {
        name for name, _spec, _lasts in FAULTS
    }  # every kind, outage too
    assert result.scrape_failures == 0  # /metrics answered through every fault
    assert result.exit_code == 0

    keys = [s.dedup_keys for s in result.samples]
    # Keys live only inside the overlap, or for the span of one catch-up walk after an outage
    # (here up to a simulated day: ~15 real seconds of outage and back-off), never for the run.
    assert max(keys) * 3 < result.events
    assert result.samples[-1].dedup_keys * 10 < result.events  # pruned to the overlap's keys
    assert result.stale_keys_end == 0  # nothing a walk can no longer return is kept
    users = [s.rows["user_last"] for s in result.samples]
    assert max(users) <= cfg.users


def test_compare_names_each_lost_or_doubled_series() -> None:
    truth = {
        "sessions_started": {"a": 3},
        "visits": {"b": 2},
        "sessions_ended": {"a": 1},
        "session_microseconds": {"a": 1_500_000},
        "totals": {"synthetic_visits": 4},
    }
    series: Series = {
        "connect_usage_shiny_sessions_total": {(("content_guid", "a"),): 3.0},
        "connect_usage_content_visits_total": {(("content_guid", "b"),): 3.0},
        "connect_usage_shiny_session_duration_seconds_count": {(("content_guid", "a"),): 1.0},
        "connect_usage_shiny_session_duration_seconds_sum": {(("content_guid", "a"),): 1.5},
        "connect_usage_excluded_events_total": {
            (("reason", "synthetic"), ("stream", "visits")): 4.0
        },
    }
    mismatches = compare_with_truth(series, truth)
    assert [(m.metric, m.content_guid, m.exporter, m.truth) for m in mismatches] == [
        ("content_visits_total", "b", 3.0, 2.0)
    ]


def test_the_log_is_read_whole_whatever_bytes_two_streams_left_in_it(tmp_path: Path) -> None:
    """The soak reads the service's log while it is written: a character split between stdout's
    and stderr's writes, and a last line still being written, once raised UnicodeDecodeError."""
    log = tmp_path / "exporter.log"
    log.write_bytes(
        b"2025-11-25T14:00:00Z INFO exporter.service: serving metrics on "
        b"http://127.0.0.1:40123/metrics (polling http://127.0.0.1:1)\n"
        b"2025-11-25T14:00:01Z ERROR exporter.poller: poll of shiny failed: caf\xc3"
        b"2025-11-25T14:00:01Z WARNING exporter.client: retry\n"
        b"\xc3\xa9\n"
        b"2025-11-25T14:00:02Z ERROR exporter.poller: poll of visits failed\n"
        b"2025-11-25T14:00:03Z INFO exporter.service: serving metrics on http://127.0.0.1:9"
    )
    lines = log_lines(log)
    assert len(lines) == 4  # the unfinished last line waits for the next read
    assert [m.group(1) for m in map(METRICS_URL.search, lines) if m] == [
        "http://127.0.0.1:40123/metrics"
    ]
    assert sum(" ERROR " in line for line in lines) == 2
    assert "\N{REPLACEMENT CHARACTER}" in lines[1]
    assert lines[2] == "é"
    assert log_lines(log, complete=False)[-1].endswith("http://127.0.0.1:9")
