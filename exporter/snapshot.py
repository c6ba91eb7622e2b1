"""The immutable view of committed state that a scrape renders.

The poller builds a new `Snapshot` after each committed batch and swaps a single reference, so a
scrape never waits for a poll and never sees a half-applied batch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from exporter import __version__

# Session durations run from seconds (a bounce) to hours (a dashboard left open all day).
DURATION_BUCKETS: tuple[float, ...] = (
    1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0,
    3600.0, 7200.0, 14400.0, 28800.0, 86400.0,
)  # fmt: skip
# A poll is one or a few HTTP round trips; catch-up walks can take minutes.
POLL_BUCKETS: tuple[float, ...] = (
    0.01,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
)

USER_WINDOWS: tuple[str, ...] = ("1h", "24h", "7d", "30d")
CONTENT_WINDOWS: tuple[str, ...] = ("24h", "7d", "30d")
WINDOW_SECONDS: Mapping[str, int] = MappingProxyType(
    {"1h": 3600, "24h": 86400, "7d": 7 * 86400, "30d": 30 * 86400}
)
STREAMS: tuple[str, ...] = ("shiny", "visits")
POLL_STREAMS: tuple[str, ...] = ("shiny", "visits", "metadata")
EXCLUDE_REASONS: tuple[str, ...] = ("synthetic", "malformed")
DELETED_APP_MODE = "deleted"
DELETED_NAME = "(deleted)"


@dataclass(frozen=True, slots=True)
class HistogramValue:
    """Per-bucket (non-cumulative) counts aligned with a bucket tuple, the last one being +Inf."""

    counts: tuple[int, ...]
    sum: float

    @property
    def count(self) -> int:
        return sum(self.counts)


@dataclass(frozen=True, slots=True)
class ContentInfo:
    """Labels for the `_info` join; deleted content keeps its usage and says so here."""

    name: str
    title: str
    app_mode: str
    access_type: str
    owner: str


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Everything `/metrics` shows, as of one committed state. Keys are label values."""

    taken_at: float = 0.0
    counting_since: float | None = None
    windows_evaluated_at: float | None = None
    # usage, keyed by content_guid unless said otherwise
    shiny_sessions_total: Mapping[str, int] = field(default_factory=dict)
    shiny_session_duration: Mapping[str, HistogramValue] = field(default_factory=dict)
    shiny_sessions_active: Mapping[str, int] = field(default_factory=dict)
    shiny_sessions_abandoned_total: Mapping[str, int] = field(default_factory=dict)
    content_visits_total: Mapping[str, int] = field(default_factory=dict)
    active_users: Mapping[str, int] = field(default_factory=dict)  # window
    content_active_users: Mapping[tuple[str, str], int] = field(
        default_factory=dict
    )  # (guid, window)
    content_last_activity: Mapping[str, float] = field(default_factory=dict)
    # metadata
    content_info: Mapping[str, ContentInfo] = field(default_factory=dict)
    content_items: Mapping[tuple[str, str], int] = field(
        default_factory=dict
    )  # (app_mode, access_type)
    users: Mapping[tuple[str, str], int] = field(default_factory=dict)  # (role, state)
    content_permissions: Mapping[tuple[str, str, str], int] = field(
        default_factory=dict
    )  # (guid, principal_type, role)
    # exclusions and opt-in per-user detail
    excluded_events_total: Mapping[tuple[str, str], int] = field(
        default_factory=dict
    )  # (stream, reason)
    user_events: Mapping[tuple[str, str, str], int] = field(
        default_factory=dict
    )  # (user_guid, username, window)
    user_series_dropped_total: Mapping[str, int] = field(default_factory=dict)  # window
    # health
    up: bool = False
    last_successful_poll: Mapping[str, float] = field(default_factory=dict)  # stream
    poll_duration: Mapping[str, HistogramValue] = field(default_factory=dict)  # stream
    poll_errors_total: Mapping[str, int] = field(default_factory=dict)  # stream
    api_requests_total: Mapping[tuple[str, str], int] = field(
        default_factory=dict
    )  # (endpoint, status)
    events_ingested_total: Mapping[str, int] = field(default_factory=dict)  # stream
    high_water_mark: Mapping[str, float] = field(default_factory=dict)
    state_errors_total: int = 0  # stream
    server_version: str | None = None
    exporter_version: str = __version__
