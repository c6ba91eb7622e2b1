"""Render a `Snapshot` as Prometheus metric families, or straight to exposition text.

The collector never talks to Connect and never waits for the poller: each scrape calls
`get_snapshot()` once and turns that immutable view into fresh metric families. All values are
what the last committed poll saw, so every HELP text says the numbers come from a background poll.

`SnapshotRenderer` writes the same families as text without building a `Sample` per series:
with 10,000 content items a snapshot has ~280k samples, and prometheus_client's encoders need
seconds for them. Its output is byte-identical to `generate_latest` (both formats) over
`SnapshotCollector`; the tests hold the two together.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from itertools import accumulate
from typing import TypeVar

from prometheus_client import PlatformCollector, ProcessCollector
from prometheus_client import generate_latest as _text_latest
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.openmetrics.exposition import generate_latest as _om_latest_untyped
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
    ContentInfo,
    HistogramValue,
    Snapshot,
)

__all__ = [
    "OPENMETRICS",
    "TEXT",
    "ExporterRegistry",
    "SnapshotCollector",
    "SnapshotRenderer",
    "build_registry",
]

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


def content_with_windows(snap: Snapshot) -> dict[str, None]:
    """Content items that get every window of content_active_users (0 if absent), in order."""
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
    guids.update(dict.fromkeys(guid for guid, _ in snap.content_active_users))
    return guids


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
        guids = content_with_windows(snap)
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


_openmetrics_latest: Callable[[Collector], bytes] = _om_latest_untyped
_go_float: Callable[[float], str] = floatToGoString

TEXT = "text"  # Prometheus text format 0.0.4
OPENMETRICS = "openmetrics"  # OpenMetrics 1.0.0 (without the final "# EOF")


class _Families:
    """Families handed to a prometheus_client encoder as if from a registry."""

    def __init__(self, families: Iterable[Metric]) -> None:
        self._families = list(families)

    def collect(self) -> Iterable[Metric]:
        return self._families


def _headers(kind: str) -> tuple[str, ...]:
    """`# HELP`/`# TYPE` lines of every family, written by prometheus_client itself."""
    out = []
    for spec in _FAMILIES:
        family = _families_only(_family(*spec))
        if kind == TEXT:
            out.append(_text_latest(family).decode())
        else:
            out.append(_openmetrics_latest(family).decode().removesuffix("# EOF\n"))
    return tuple(out)


def _families_only(*families: Metric) -> _Families:
    return _Families(families)


def _escape(value: str) -> str:
    """A label value as both encoders escape it."""
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


_SMALL: tuple[str, ...] = tuple(f"{i}.0" for i in range(1024))
_N_SMALL = len(_SMALL)


def _value(value: float, small: tuple[str, ...] = _SMALL) -> str:
    """`floatToGoString`, with a fast path for the small non-negative integers most samples are.

    An int below 10**6 prints as `"<int>.0"` (Go switches to an exponent at 10**6); anything else
    goes to `floatToGoString` itself.
    """
    if type(value) is int:
        if 0 <= value < _N_SMALL:
            return small[value]
        if -1_000_000 < value < 1_000_000:
            return f"{value}.0"
    return _go_float(value)


def _label_str(labels: tuple[str, ...], values: tuple[str, ...]) -> str:
    """`{a="x",b="y"}` with label names sorted, as the encoders sort them."""
    pairs = sorted(zip(labels, values, strict=True))
    return "{" + ",".join([f'{k}="{_escape(v)}"' for k, v in pairs]) + "}"


class SnapshotRenderer:
    """Writes a snapshot's families as exposition text, identical to prometheus_client's encoders.

    Escaped label strings of content items (their guid, their `_info` labels) are kept across
    snapshots: content changes rarely, snapshots every poll. Not thread-safe; one caller at a time.
    """

    def __init__(self) -> None:
        self._headers = {TEXT: _headers(TEXT), OPENMETRICS: _headers(OPENMETRICS)}
        self._guids: dict[str, str] = {}  # guid -> 'content_guid="…"'
        self._info: dict[str, tuple[ContentInfo, str]] = {}  # guid -> (info, its whole line)

    def render(self, snap: Snapshot, kind: str = TEXT) -> bytes:
        """Every family of `snap` in `kind` (`TEXT` or `OPENMETRICS`, the latter without EOF)."""
        return self.join(self.bodies(snap), kind)

    def join(self, bodies: list[str], kind: str) -> bytes:
        """Headers and sample lines (the same in both formats) as one UTF-8 text."""
        headers = self._headers[kind]
        return "".join(
            [part for pair in zip(headers, bodies, strict=True) for part in pair]
        ).encode()

    def bodies(self, snap: Snapshot) -> list[str]:
        """The sample lines of every family, in `_FAMILIES` order."""
        self._prune(snap)
        guid = self._guid
        out: list[str] = []
        add = out.append
        p = PREFIX

        add(self._per_guid(p + "shiny_sessions_total", snap.shiny_sessions_total))
        add(self._duration(snap))
        add(self._per_guid(p + "shiny_sessions_active", snap.shiny_sessions_active))
        add(
            self._per_guid(
                p + "shiny_sessions_abandoned_total", snap.shiny_sessions_abandoned_total
            )
        )
        add(self._per_guid(p + "content_visits_total", snap.content_visits_total))
        add(_simple(p + "active_users", "window", _with_zeros(USER_WINDOWS, snap.active_users, 0)))
        add(self._content_active_users(snap))
        add(
            self._per_guid(
                p + "content_last_activity_timestamp_seconds", snap.content_last_activity
            )
        )
        add(self._content_info(snap))
        add(_multi(p + "content_items", ("app_mode", "access_type"), snap.content_items.items()))
        add(_multi(p + "users", ("role", "state"), snap.users.items()))
        add(
            "".join(
                [
                    f'{p}content_permissions{{{guid(g)},principal_type="{_escape(t)}",'
                    f'role="{_escape(r)}"}} {_value(v)}\n'
                    for (g, t, r), v in snap.content_permissions.items()
                ]
            )
        )
        excluded_keys = [(s, r) for s in STREAMS for r in EXCLUDE_REASONS]
        add(
            _multi(
                p + "excluded_events_total",
                ("stream", "reason"),
                _with_zeros(excluded_keys, snap.excluded_events_total, 0).items(),
            )
        )
        add(
            _multi(p + "user_events", ("user_guid", "username", "window"), snap.user_events.items())
        )
        add(
            _simple(
                p + "user_series_dropped_total",
                "window",
                _with_zeros(USER_WINDOWS, snap.user_series_dropped_total, 0),
            )
        )
        add(f"{p}up {_value(1 if snap.up else 0)}\n")
        add(
            _simple(
                p + "last_successful_poll_timestamp_seconds", "stream", snap.last_successful_poll
            )
        )
        poll = _with_zeros(POLL_STREAMS, snap.poll_duration, _EMPTY_POLL)
        name = p + "poll_duration_seconds"
        add(
            "".join(
                [
                    _histogram(name, "stream", key, f'stream="{_escape(key)}"', hist, le=_POLL_LE)
                    for key, hist in poll.items()
                ]
            )
        )
        add(
            _simple(
                p + "poll_errors_total",
                "stream",
                _with_zeros(POLL_STREAMS, snap.poll_errors_total, 0),
            )
        )
        add(
            _multi(
                p + "api_requests_total", ("endpoint", "status"), snap.api_requests_total.items()
            )
        )
        add(
            _simple(
                p + "events_ingested_total",
                "stream",
                _with_zeros(STREAMS, snap.events_ingested_total, 0),
            )
        )
        add(f"{p}state_errors_total {_value(snap.state_errors_total)}\n")
        add(_simple(p + "high_water_mark_timestamp_seconds", "stream", snap.high_water_mark))
        for key, value in (
            ("counting_since_timestamp_seconds", snap.counting_since),
            ("windows_evaluated_timestamp_seconds", snap.windows_evaluated_at),
        ):
            add("" if value is None else f"{p}{key} {_value(value)}\n")
        add(f'{p}exporter_build_info{{version="{_escape(snap.exporter_version)}"}} 1.0\n')
        version = snap.server_version
        add("" if version is None else f'{p}server_info{{version="{_escape(version)}"}} 1.0\n')
        return out

    def _prune(self, snap: Snapshot) -> None:
        """Forget cached labels once they outnumber the live content items twice over."""
        live = len(snap.content_info) + len(snap.shiny_sessions_total) + 64
        if len(self._guids) > 2 * live:
            self._guids.clear()
        if len(self._info) > 2 * live:
            self._info.clear()

    def _guid(self, guid: str) -> str:
        labels = self._guids.get(guid)
        if labels is None:
            labels = self._guids[guid] = f'content_guid="{_escape(guid)}"'
        return labels

    def _per_guid(self, name: str, values: Mapping[str, float]) -> str:
        guid = self._guid
        value = _value
        return "".join([f"{name}{{{guid(g)}}} {value(v)}\n" for g, v in values.items()])

    def _duration(self, snap: Snapshot) -> str:
        name = PREFIX + "shiny_session_duration_seconds"
        guid = self._guid
        return "".join(
            [
                _histogram(name, "content_guid", g, guid(g), hist, le=_DURATION_LE)
                for g, hist in snap.shiny_session_duration.items()
            ]
        )

    def _content_active_users(self, snap: Snapshot) -> str:
        """Same series, same order as `SnapshotCollector._content_active_users`."""
        cau = snap.content_active_users
        guids = content_with_windows(snap)
        name = PREFIX + "content_active_users"
        guid = self._guid
        get = cau.get
        windows = [(w, f',window="{_escape(w)}"}} ') for w in CONTENT_WINDOWS]
        lines = [
            f"{name}{{{guid(g)}{tail}{_value(get((g, w), 0))}\n"
            for g in guids
            for w, tail in windows
        ]
        extra = {key: value for key, value in cau.items() if key[1] not in CONTENT_WINDOWS}
        lines.append(_multi(name, ("content_guid", "window"), extra.items()))
        return "".join(lines)

    def _content_info(self, snap: Snapshot) -> str:
        cache = self._info
        lines = []
        for g, ci in snap.content_info.items():
            hit = cache.get(g)
            if hit is None or (hit[0] is not ci and hit[0] != ci):
                labels = _label_str(
                    ("content_guid", "content_name", "title", "app_mode", "access_type", "owner"),
                    (g, ci.name, ci.title, ci.app_mode, ci.access_type, ci.owner),
                )
                hit = cache[g] = (ci, f"{PREFIX}content_info{labels} 1.0\n")
            lines.append(hit[1])
        return "".join(lines)


def _simple(name: str, label: str, values: Mapping[str, float]) -> str:
    return "".join([f'{name}{{{label}="{_escape(k)}"}} {_value(v)}\n' for k, v in values.items()])


def _multi(
    name: str, labels: tuple[str, ...], items: Iterable[tuple[tuple[str, ...], float]]
) -> str:
    return "".join([f"{name}{_label_str(labels, k)} {_value(v)}\n" for k, v in items])


def _histogram(
    name: str, label: str, key: str, labels: str, value: HistogramValue, *, le: tuple[str, ...]
) -> str:
    """Cumulative `_bucket` lines, then `_count` and `_sum`; `labels` is the escaped `label` pair.

    `le` goes where the encoders' sort of label names puts it: after `content_guid`, before
    `stream`.
    """
    counts = value.counts
    if len(counts) != len(le):
        raise ValueError(
            f"{name}{{{label}={key!r}}}: {len(counts)} bucket counts "
            f"for {len(le)} buckets (including +Inf)"
        )
    cumulative = list(accumulate(counts))
    if label < "le":
        prefix = f'{name}_bucket{{{labels},le="'
        bounds = [f'{bound}"}} ' for bound in le]
    else:
        prefix = f'{name}_bucket{{le="'
        bounds = [f'{bound}",{labels}}} ' for bound in le]
    lines = [
        f"{prefix}{bound}{_value(total)}\n"
        for bound, total in zip(bounds, cumulative)  # noqa: B905 - lengths checked above
    ]
    lines.append(f"{name}_count{{{labels}}} {_value(cumulative[-1])}\n")
    lines.append(f"{name}_sum{{{labels}}} {_value(value.sum)}\n")
    return "".join(lines)


class ExporterRegistry(CollectorRegistry):
    """The exporter's registry: the snapshot collector plus process_/python_ metrics.

    It is an ordinary `CollectorRegistry` (for `generate_latest` and `run --once`) that also
    exposes its parts, so the HTTP layer can serve the snapshot's text from a cache and render
    only the cheap `runtime` collectors on each scrape.
    """

    def __init__(self, get_snapshot: Callable[[], Snapshot]) -> None:
        super().__init__()
        self.get_snapshot = get_snapshot
        self.snapshot_collector = SnapshotCollector(get_snapshot)
        self.register(self.snapshot_collector)
        self.runtime = CollectorRegistry()
        for collector in (ProcessCollector(registry=None), PlatformCollector(registry=None)):
            self.register(collector)
            self.runtime.register(collector)


def build_registry(get_snapshot: Callable[[], Snapshot]) -> ExporterRegistry:
    """A fresh registry with the snapshot collector plus the standard process_/python_ metrics.

    A private registry (not the global REGISTRY) keeps tests and embedded demos independent.
    """
    return ExporterRegistry(get_snapshot)
