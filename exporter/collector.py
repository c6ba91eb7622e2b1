"""Render a `Snapshot` as Prometheus metric families.

The collector never talks to Connect and never waits for the poller: each scrape calls
`get_snapshot()` once and turns that immutable view into fresh metric families. All values are
what the last committed poll saw, so every HELP text says the numbers come from a background poll.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from itertools import accumulate
from typing import TypeVar

from prometheus_client import PlatformCollector, ProcessCollector
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

from exporter.snapshot import (
    CONTENT_WINDOWS,
    DURATION_BUCKETS,
    EXCLUDE_REASONS,
    POLL_BUCKETS,
    POLL_STREAMS,
    STREAMS,
    USER_WINDOWS,
    HistogramValue,
    Snapshot,
)

__all__ = ["SnapshotCollector", "build_registry"]

_K = TypeVar("_K")
_V = TypeVar("_V")

PREFIX = "connect_usage_"
_POLL = "by the background poll of Connect's instrumentation API"
_META = "as of the last background poll of Connect's metadata API"

# `le` label values exactly as prometheus_client's own Histogram writes them, computed once.
_DURATION_LE: tuple[str, ...] = (*map(floatToGoString, DURATION_BUCKETS), "+Inf")
_POLL_LE: tuple[str, ...] = (*map(floatToGoString, POLL_BUCKETS), "+Inf")

# name (without `_total` for counters), type, HELP, label names. The single source for both
# describe() and collect(), so the two cannot drift apart.
_FAMILIES: tuple[tuple[str, str, str, tuple[str, ...]], ...] = (
    (
        "shiny_sessions",
        "counter",
        f"Shiny sessions started, counted once each {_POLL}.",
        ("content_guid",),
    ),
    (
        "shiny_session_duration_seconds",
        "histogram",
        f"Duration of ended Shiny sessions, observed once each {_POLL}.",
        ("content_guid",),
    ),
    (
        "shiny_sessions_active",
        "gauge",
        f"Shiny sessions started but not yet ended, as seen {_POLL}.",
        ("content_guid",),
    ),
    (
        "shiny_sessions_abandoned",
        "counter",
        "Shiny sessions that never reported an end and were given up on, counted once each "
        f"{_POLL}.",
        ("content_guid",),
    ),
    (
        "content_visits",
        "counter",
        f"Content visits (excluding synthetic ones), counted once each {_POLL}.",
        ("content_guid",),
    ),
    (
        "active_users",
        "gauge",
        "Distinct known users with a visit or Shiny session in the trailing window, evaluated "
        f"{_POLL}.",
        ("window",),
    ),
    (
        "content_active_users",
        "gauge",
        f"Distinct known users of a content item in the trailing window, evaluated {_POLL}.",
        ("content_guid", "window"),
    ),
    (
        "content_last_activity_timestamp_seconds",
        "gauge",
        f"Unix time of the latest visit or Shiny session of a content item, as seen {_POLL}.",
        ("content_guid",),
    ),
    (
        "content_info",
        "gauge",
        f"Names of a content item (value 1), {_META}; join on content_guid. "
        'Deleted content has app_mode="deleted".',
        ("content_guid", "content_name", "title", "app_mode", "access_type", "owner"),
    ),
    (
        "content_items",
        "gauge",
        f"Content items by app mode and access type, {_META}.",
        ("app_mode", "access_type"),
    ),
    (
        "users",
        "gauge",
        f"Connect users by role and state, {_META}.",
        ("role", "state"),
    ),
    (
        "content_permissions",
        "gauge",
        f"Permission grants on a content item by principal type and role, {_META}.",
        ("content_guid", "principal_type", "role"),
    ),
    (
        "excluded_events",
        "counter",
        f"Usage records left uncounted (synthetic traffic or malformed records), counted {_POLL}.",
        ("stream", "reason"),
    ),
    (
        "user_events",
        "gauge",
        "Events of the most active users in the trailing window (opt-in top-N), evaluated "
        f"{_POLL}.",
        ("user_guid", "username", "window"),
    ),
    (
        "user_series_dropped",
        "counter",
        f"Per-user series left out because of the top-N cap, counted {_POLL}.",
        ("window",),
    ),
    (
        "up",
        "gauge",
        "1 if the last background poll of Connect succeeded, else 0.",
        (),
    ),
    (
        "last_successful_poll_timestamp_seconds",
        "gauge",
        "Unix time of the last successful background poll of Connect, by stream.",
        ("stream",),
    ),
    (
        "poll_duration_seconds",
        "histogram",
        "Duration of background polls of Connect, by stream.",
        ("stream",),
    ),
    (
        "poll_errors",
        "counter",
        "Background polls of Connect that failed, by stream.",
        ("stream",),
    ),
    (
        "api_requests",
        "counter",
        "HTTP requests the background poll made to Connect's API, by endpoint template and "
        "status (or timeout, connection_error, invalid_response).",
        ("endpoint", "status"),
    ),
    (
        "events_ingested",
        "counter",
        f"Usage records accepted as new (not duplicates), counted {_POLL}.",
        ("stream",),
    ),
    (
        "state_errors",
        "counter",
        "Batches the exporter could not commit to its state file (disk full, read-only, …); "
        "the batch is retried from the last committed state.",
        (),
    ),
    (
        "high_water_mark_timestamp_seconds",
        "gauge",
        f"Connect time below which every usage record has been seen {_POLL}, by stream.",
        ("stream",),
    ),
    (
        "counting_since_timestamp_seconds",
        "gauge",
        "Connect time from which the usage counters count (the counting epoch).",
        (),
    ),
    (
        "windows_evaluated_timestamp_seconds",
        "gauge",
        f"Unix time at which the windowed gauges were last evaluated {_POLL}.",
        (),
    ),
    (
        "exporter_build_info",
        "gauge",
        "Version of this exporter (value 1).",
        ("version",),
    ),
    (
        "server_info",
        "gauge",
        f"Version of the Connect server (value 1), {_META}.",
        ("version",),
    ),
)


def _family(name: str, typ: str, doc: str, labels: tuple[str, ...]) -> Metric:
    full = PREFIX + name
    if typ == "counter":
        return CounterMetricFamily(full, doc, labels=labels)
    if typ == "gauge":
        return GaugeMetricFamily(full, doc, labels=labels)
    return HistogramMetricFamily(full, doc, labels=labels)


_new = tuple.__new__


def _sample(name: str, labels: dict[str, str], value: float) -> Sample:
    """A `Sample` without the NamedTuple keyword-default overhead (about twice as fast)."""
    return _new(Sample, (name, labels, value, None, None, None))


def _sample_name(metric: Metric) -> str:
    return metric.name + "_total" if metric.type == "counter" else metric.name


def _add_simple(
    metric: Metric,
    values: Mapping[str, float],
    label_sets: Mapping[str, dict[str, str]],
) -> None:
    """Append one sample per key, reusing one shared label dict per key.

    The hot path for per-content families; label dicts are never mutated by the encoders, so the
    same `{"content_guid": guid}` serves every family of that content item.
    """
    name = _sample_name(metric)
    metric.samples.extend(
        [
            _new(Sample, (name, label_sets[key], value, None, None, None))
            for key, value in values.items()
        ]
    )


def _add_multi(
    metric: Metric,
    labels: tuple[str, ...],
    values: Iterable[tuple[tuple[str, ...], float]],
) -> None:
    name = _sample_name(metric)
    metric.samples.extend(
        [_sample(name, dict(zip(labels, key, strict=True)), value) for key, value in values]
    )


def _add_histogram(
    metric: Metric,
    label: str,
    key: str,
    value: HistogramValue,
    *,
    le: tuple[str, ...],
    base: dict[str, str],
) -> None:
    """Emit cumulative buckets, `_count` and `_sum` from per-bucket counts."""
    counts = value.counts
    if len(counts) != len(le):
        raise ValueError(
            f"{metric.name}{{{label}={key!r}}}: {len(counts)} bucket counts "
            f"for {len(le)} buckets (including +Inf)"
        )
    bucket_name = metric.name + "_bucket"
    cumulative = list(accumulate(counts))
    samples = metric.samples
    samples.extend(
        [
            _new(Sample, (bucket_name, {label: key, "le": bound}, total, None, None, None))
            for bound, total in zip(le, cumulative)  # noqa: B905 - lengths checked above
        ]
    )
    samples.append(_new(Sample, (metric.name + "_count", base, cumulative[-1], None, None, None)))
    samples.append(_new(Sample, (metric.name + "_sum", base, value.sum, None, None, None)))


class _LabelSets(dict[str, dict[str, str]]):
    """`{key: {label: key}}`, built on first use so each label dict exists once per scrape."""

    def __init__(self, label: str) -> None:
        super().__init__()
        self._label = label

    def __missing__(self, key: str) -> dict[str, str]:
        labels = self[key] = {self._label: key}
        return labels


_EMPTY_POLL = HistogramValue(counts=(0,) * len(_POLL_LE), sum=0.0)


class SnapshotCollector(Collector):
    """A prometheus_client collector that renders whatever `get_snapshot()` returns.

    `get_snapshot` must be cheap and non-blocking (it should just read a reference), since it runs
    on every scrape.
    """

    def __init__(self, get_snapshot: Callable[[], Snapshot]) -> None:
        self._get_snapshot = get_snapshot

    def describe(self) -> Iterator[Metric]:
        """Name every family without sampling, so registration never calls `get_snapshot`."""
        for spec in _FAMILIES:
            yield _family(*spec)

    def collect(self) -> Iterator[Metric]:
        """Yield fresh families for one snapshot, read exactly once."""
        snap = self._get_snapshot()
        fam = {spec[0]: _family(*spec) for spec in _FAMILIES}
        by_guid = _LabelSets("content_guid")
        by_window = _LabelSets("window")
        by_stream = _LabelSets("stream")

        # Usage, per content item.
        _add_simple(fam["shiny_sessions"], snap.shiny_sessions_total, by_guid)
        duration = fam["shiny_session_duration_seconds"]
        for guid, hist in snap.shiny_session_duration.items():
            _add_histogram(
                duration, "content_guid", guid, hist, le=_DURATION_LE, base=by_guid[guid]
            )
        _add_simple(fam["shiny_sessions_active"], snap.shiny_sessions_active, by_guid)
        _add_simple(fam["shiny_sessions_abandoned"], snap.shiny_sessions_abandoned_total, by_guid)
        _add_simple(fam["content_visits"], snap.content_visits_total, by_guid)
        _add_simple(fam["active_users"], _with_zeros(USER_WINDOWS, snap.active_users, 0), by_window)
        self._content_active_users(snap, fam["content_active_users"])
        _add_simple(
            fam["content_last_activity_timestamp_seconds"], snap.content_last_activity, by_guid
        )

        # Metadata.
        info = fam["content_info"]
        info.samples.extend(
            [
                _sample(
                    info.name,
                    {
                        "content_guid": guid,
                        "content_name": ci.name,
                        "title": ci.title,
                        "app_mode": ci.app_mode,
                        "access_type": ci.access_type,
                        "owner": ci.owner,
                    },
                    1,
                )
                for guid, ci in snap.content_info.items()
            ]
        )
        _add_multi(fam["content_items"], ("app_mode", "access_type"), snap.content_items.items())
        _add_multi(fam["users"], ("role", "state"), snap.users.items())
        _add_multi(
            fam["content_permissions"],
            ("content_guid", "principal_type", "role"),
            snap.content_permissions.items(),
        )

        # Exclusions and opt-in per-user detail.
        excluded_keys = [(s, r) for s in STREAMS for r in EXCLUDE_REASONS]
        _add_multi(
            fam["excluded_events"],
            ("stream", "reason"),
            _with_zeros(excluded_keys, snap.excluded_events_total, 0).items(),
        )
        _add_multi(
            fam["user_events"], ("user_guid", "username", "window"), snap.user_events.items()
        )
        _add_simple(
            fam["user_series_dropped"],
            _with_zeros(USER_WINDOWS, snap.user_series_dropped_total, 0),
            by_window,
        )

        # Health of the poll. Timestamps are exported only once known: a 0 would read as 1970.
        fam["up"].samples.append(_sample(PREFIX + "up", {}, 1 if snap.up else 0))
        _add_simple(
            fam["last_successful_poll_timestamp_seconds"], snap.last_successful_poll, by_stream
        )
        poll = fam["poll_duration_seconds"]
        for stream, hist in _with_zeros(POLL_STREAMS, snap.poll_duration, _EMPTY_POLL).items():
            _add_histogram(poll, "stream", stream, hist, le=_POLL_LE, base=by_stream[stream])
        _add_simple(
            fam["poll_errors"], _with_zeros(POLL_STREAMS, snap.poll_errors_total, 0), by_stream
        )
        _add_multi(fam["api_requests"], ("endpoint", "status"), snap.api_requests_total.items())
        _add_simple(
            fam["events_ingested"], _with_zeros(STREAMS, snap.events_ingested_total, 0), by_stream
        )
        fam["state_errors"].samples.append(
            _sample(PREFIX + "state_errors_total", {}, snap.state_errors_total)
        )
        _add_simple(fam["high_water_mark_timestamp_seconds"], snap.high_water_mark, by_stream)
        for key, value in (
            ("counting_since_timestamp_seconds", snap.counting_since),
            ("windows_evaluated_timestamp_seconds", snap.windows_evaluated_at),
        ):
            if value is not None:
                fam[key].samples.append(_sample(PREFIX + key, {}, value))
        fam["exporter_build_info"].samples.append(
            _sample(PREFIX + "exporter_build_info", {"version": snap.exporter_version}, 1)
        )
        if snap.server_version is not None:
            fam["server_info"].samples.append(
                _sample(PREFIX + "server_info", {"version": snap.server_version}, 1)
            )

        yield from fam.values()

    @staticmethod
    def _content_active_users(snap: Snapshot, metric: Metric) -> None:
        """Every content item known from usage or metadata gets every window, at 0 if absent."""
        cau = snap.content_active_users
        guids: dict[str, None] = dict.fromkeys(snap.content_info)
        for usage in (
            snap.shiny_sessions_total,
            snap.shiny_session_duration,
            snap.shiny_sessions_active,
            snap.shiny_sessions_abandoned_total,
            snap.content_visits_total,
            snap.content_last_activity,
        ):
            guids.update(dict.fromkeys(usage))
        guids.update(dict.fromkeys(guid for guid, _ in cau))
        name = metric.name
        get = cau.get
        metric.samples.extend(
            [
                _new(
                    Sample,
                    (
                        name,
                        {"content_guid": guid, "window": w},
                        get((guid, w), 0),
                        None,
                        None,
                        None,
                    ),
                )
                for guid in guids
                for w in CONTENT_WINDOWS
            ]
        )
        # A window the snapshot has but the contract does not list is still shown, not lost.
        _add_multi(
            metric,
            ("content_guid", "window"),
            [(key, value) for key, value in cau.items() if key[1] not in CONTENT_WINDOWS],
        )


def _with_zeros(keys: Iterable[_K], values: Mapping[_K, _V], zero: _V) -> dict[_K, _V]:
    """`values` with every expected key present (at `zero` when missing), expected keys first."""
    out: dict[_K, _V] = dict.fromkeys(keys, zero)
    out.update(values)
    return out


def build_registry(get_snapshot: Callable[[], Snapshot]) -> CollectorRegistry:
    """A fresh registry with the snapshot collector plus the standard process_/python_ metrics.

    A private registry (not the global REGISTRY) keeps tests and embedded demos independent.
    """
    registry = CollectorRegistry()
    registry.register(SnapshotCollector(get_snapshot))
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    return registry
