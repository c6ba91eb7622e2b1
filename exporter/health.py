"""The exporter's own health: plain prometheus_client metrics, live, process-local.

They describe this process (its requests, polls and commits), so they restart with it and are
rendered fresh on every scrape, unlike the usage figures, which come from committed state.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
)

from exporter import __version__

# No `_created` series: they would add a gauge per counter to the public metric names.
disable_created_metrics()  # type: ignore[no-untyped-call]

PREFIX = "connect_usage_"
METADATA = "metadata"  # the poll that is not an event stream
# A poll is one or a few HTTP round trips; catch-up walks can take minutes.
POLL_BUCKETS: tuple[float, ...] = (
    0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
)  # fmt: skip


# The health families: (exposed name, type, help, labels).
HEALTH_FAMILIES: tuple[tuple[str, str, str, tuple[str, ...]], ...] = (
    (
        PREFIX + "up",
        "gauge",
        "1 if the last background poll of every stream succeeded, else 0.",
        (),
    ),
    (
        PREFIX + "last_successful_poll_timestamp_seconds",
        "gauge",
        "Unix time of the last successful background poll of Connect, by stream, in the "
        "exporter's clock (compare it with Prometheus's time()).",
        ("stream",),
    ),
    (
        PREFIX + "poll_lag_seconds",
        "gauge",
        "Connect's now minus the stream's high-water mark at its last successful poll, both in "
        "Connect's clock: how far behind Connect the counts are, by stream.",
        ("stream",),
    ),
    (
        PREFIX + "connect_clock_offset_seconds",
        "gauge",
        "Connect's clock minus the exporter's, from the Date header of Connect's last answer.",
        (),
    ),
    (
        PREFIX + "poll_duration_seconds",
        "histogram",
        "Duration of background polls of Connect, by stream.",
        ("stream",),
    ),
    (
        PREFIX + "poll_errors_total",
        "counter",
        "Background polls of Connect that failed, by stream.",
        ("stream",),
    ),
    (
        PREFIX + "api_requests_total",
        "counter",
        "HTTP requests the background poll made to Connect's API, by endpoint template and "
        "status (or timeout, connection_error, invalid_response).",
        ("endpoint", "status"),
    ),
    (
        PREFIX + "events_ingested_total",
        "counter",
        "Usage records accepted as new (not duplicates) and committed, by stream.",
        ("stream",),
    ),
    (
        PREFIX + "state_errors_total",
        "counter",
        "Batches the exporter could not commit to its state file (disk full, read-only, …); "
        "the batch is retried from the last committed state.",
        (),
    ),
    (
        PREFIX + "state_file_missing",
        "gauge",
        "1 if the state file was deleted or replaced while the exporter ran, else 0; nothing is "
        "committed from then on (the log says how to keep the counts).",
        (),
    ),
    (PREFIX + "exporter_build_info", "gauge", "Version of this exporter (value 1).", ("version",)),
)
_KINDS: dict[str, Any] = {"counter": Counter, "gauge": Gauge, "histogram": Histogram}


class Health:
    """The health metrics in their own registry, with every known label value at zero."""

    def __init__(self, streams: Iterable[str]) -> None:
        self.streams = tuple(streams)
        self.polls = (*self.streams, METADATA)
        self.registry = CollectorRegistry()
        made: dict[str, Any] = {}
        for name, kind, doc, labels in HEALTH_FAMILIES:
            extra = {"buckets": POLL_BUCKETS} if kind == "histogram" else {}
            base = name.removesuffix("_total") if kind == "counter" else name
            made[name] = _KINDS[kind](base, doc, labels, registry=self.registry, **extra)
        self._up = made[PREFIX + "up"]
        self._last_success = made[PREFIX + "last_successful_poll_timestamp_seconds"]
        self._poll_lag = made[PREFIX + "poll_lag_seconds"]
        self._clock_offset = made[PREFIX + "connect_clock_offset_seconds"]
        self._poll_duration = made[PREFIX + "poll_duration_seconds"]
        self._poll_errors = made[PREFIX + "poll_errors_total"]
        self._requests = made[PREFIX + "api_requests_total"]
        self._ingested = made[PREFIX + "events_ingested_total"]
        self._state_errors = made[PREFIX + "state_errors_total"]
        self._state_file_missing = made[PREFIX + "state_file_missing"]
        made[PREFIX + "exporter_build_info"].labels(__version__).set(1)
        for poll in self.polls:
            self._poll_errors.labels(poll)
            self._poll_duration.labels(poll)
        for stream in self.streams:
            self._ingested.labels(stream)
        self.last_ok: dict[str, bool] = {}
        self.last_success: dict[str, float] = {}

    def observe_request(self, endpoint: str, outcome: str, _seconds: float) -> None:
        """The client's request observer: one call per attempt."""
        self._requests.labels(endpoint, outcome).inc()

    def record_poll(self, stream: str, seconds: float, ok: bool, at: float) -> None:
        self._poll_duration.labels(stream).observe(seconds)
        self.last_ok[stream] = ok
        if ok:
            self.last_success[stream] = at
            self._last_success.labels(stream).set(at)
        else:
            self._poll_errors.labels(stream).inc()
        self._up.set(1 if self.up else 0)

    def lag(self, stream: str, seconds: float) -> None:
        """The stream's lag behind Connect's now after a successful poll (Connect's clock)."""
        self._poll_lag.labels(stream).set(seconds)

    def clock_offset(self, seconds: float) -> None:
        """Connect's clock minus the exporter's, as its last Date header said."""
        self._clock_offset.set(seconds)

    def ingested(self, stream: str, count: int) -> None:
        """New events of `stream` that a commit has just made durable."""
        self._ingested.labels(stream).inc(count)

    def state_error(self) -> None:
        self._state_errors.inc()

    def state_file_missing(self) -> None:
        """The state file is gone from its path; it stays so for this process's life."""
        self._state_file_missing.set(1)

    @property
    def up(self) -> bool:
        return all(self.last_ok.get(poll, False) for poll in self.polls)

    # -- reading back (tests, benchmarks) ---------------------------------------------------

    def value(self, name: str, **labels: str) -> float:
        """A sample's current value (0 when it does not exist yet)."""
        return self.registry.get_sample_value(PREFIX + name, labels) or 0.0

    def requests(self) -> dict[tuple[str, str], int]:
        """Requests so far by (endpoint, status)."""
        return {
            (s.labels["endpoint"], s.labels["status"]): int(s.value)
            for metric in self._requests.collect()
            for s in metric.samples
            if s.name.endswith("_total")
        }

    def poll_errors(self) -> dict[str, int]:
        """Failed polls so far by stream."""
        return {poll: int(self.value("poll_errors_total", stream=poll)) for poll in self.polls}

    @property
    def state_errors(self) -> int:
        return int(self.value("state_errors_total"))

    def ingested_total(self, stream: str) -> int:
        return int(self.value("events_ingested_total", stream=stream))
