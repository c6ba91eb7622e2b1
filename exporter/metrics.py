"""Every metric family a snapshot shows, defined once: name, type, help, labels, and how its
samples are read from the snapshot.

The collector, the fast renderer, the contract test and README's table all derive from
`FAMILIES`; the exporter's own health metrics are prometheus_client objects (`health.py`).
`python -m exporter.metrics` prints README's table of every family.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from itertools import chain
from typing import Any, TypeVar

from exporter.model import (
    CONTENT_WINDOWS,
    DURATION_BUCKETS,
    EXCLUDE_REASONS,
    US,
    USER_WINDOWS,
    VIEWER_WINDOWS,
    HistogramValue,
)
from exporter.snapshot import ContentInfo, Snapshot, counts_sessions, counts_visits

PREFIX = "connect_usage_"
_POLL = "by the background poll of Connect's instrumentation API"
_META = "as of the last background poll of Connect's metadata API"

K = TypeVar("K")
Samples = Iterable[tuple[tuple[str, ...], Any]]  # (label values, a number or a HistogramValue)


@dataclass(frozen=True)
class Family:
    """One metric family: its exposed name (counters end in `_total`), type, help, labels, and
    the function that reads its samples from a snapshot."""

    name: str
    type: str  # "counter", "gauge" or "histogram"
    help: str
    labels: tuple[str, ...]
    samples: Callable[[Snapshot], Samples]
    buckets: tuple[float, ...] = ()  # histograms: the upper bounds, +Inf implied

    @property
    def base(self) -> str:
        """The name prometheus_client families take (counters without `_total`)."""
        return self.name.removesuffix("_total") if self.type == "counter" else self.name


def _one(values: Mapping[str, Any]) -> Samples:
    """A mapping keyed by one label value."""
    return (((key,), value) for key, value in values.items())


def _many(values: Mapping[Any, Any]) -> Samples:
    """A mapping keyed by a tuple of label values."""
    return values.items()


def _zeros(keys: Iterable[K], values: Mapping[K, Any]) -> dict[K, Any]:
    """`values` with every expected key present (0 when missing), expected keys first."""
    out: dict[K, Any] = dict.fromkeys(keys, 0)
    out.update(values)
    return out


def _scalar(value: float | None) -> Samples:
    return () if value is None else (((), value),)


def _whole(samples: Callable[[Snapshot], Samples]) -> Callable[[Snapshot], Samples]:
    """A usage gauge's samples, none while the counters are not whole: before a first start's
    replay of the history is complete, its windows would show part of it."""
    return lambda snap: samples(snap) if snap.counters_shown else ()


_NO_DURATIONS = HistogramValue((0,) * (len(DURATION_BUCKETS) + 1), 0.0)


def _counted(
    snap: Snapshot,
    values: Mapping[str, Any],
    applies: Callable[[ContentInfo], bool],
    zero: Any = 0,
) -> Samples:
    """A per-content counter: every content item it applies to, at `zero` where nothing has
    happened, so that the first event of an item is an increase, not a new series (none at
    all while the counters are not whole)."""
    if not snap.counters_shown:
        return ()
    known = {g: zero for g, info in snap.content_info.items() if applies(info)}
    known.update(values)
    return _one(known)


def content_with_windows(snap: Snapshot) -> dict[str, None]:
    """Content items that get every window of content_active_users (0 if absent), in order."""
    usage = snap.usage
    guids: dict[str, None] = dict.fromkeys(snap.content_info)
    for values in (
        usage.shiny_sessions_total,
        usage.shiny_session_duration,
        usage.shiny_sessions_active,
        usage.shiny_sessions_abandoned_total,
        usage.content_visits_total,
        usage.content_last_activity,
    ):
        guids.update(dict.fromkeys(values))
    guids.update(dict.fromkeys(guid for guid, _ in usage.content_active_users))
    return guids


def _content_active_users(snap: Snapshot) -> Samples:
    """Every content item known from usage or metadata gets every window, at 0 if absent."""
    values = snap.usage.content_active_users
    get = values.get
    known = ((g, w) for g in content_with_windows(snap) for w in CONTENT_WINDOWS)
    others = [k for k in values if k[1] not in CONTENT_WINDOWS]  # none from the model
    return ((k, get(k, 0)) for k in chain(known, others))


def _content_info(snap: Snapshot) -> Samples:
    return (
        ((guid, i.name, i.title, i.app_mode, i.access_type, i.owner), 1)
        for guid, i in snap.content_info.items()
    )


def _viewer(snap: Snapshot, index: int) -> Samples:
    """One of a top viewer's figures: session figures where it has sessions or session time,
    visits where it has visits (a viewer has one or both)."""
    for key, figures in snap.usage.viewers.viewers.items():
        wanted = figures[2] > 0 if index == 2 else figures[0] > 0 or figures[1] > 0
        if wanted:
            yield key, figures[index] / US if index == 1 else figures[index]


def _sessions_content(snap: Snapshot) -> list[str]:
    return [g for g, info in snap.content_info.items() if counts_sessions(info)]


def _hits(snap: Snapshot) -> Samples:
    """Only where the hits stream is read: a Connect without it shows no hits, not zeros."""
    if "hits" not in snap.streams:
        return ()
    return _counted(snap, snap.usage.content_hits_total, lambda _info: True)


def _excluded(snap: Snapshot) -> Samples:
    if not snap.counters_shown:
        return ()
    expected = [(s, r) for s in snap.streams for r in EXCLUDE_REASONS]
    return _zeros(expected, snap.usage.excluded_events_total).items()


FAMILIES: tuple[Family, ...] = (
    Family(
        PREFIX + "shiny_sessions_total",
        "counter",
        f"Shiny sessions started, counted once each {_POLL}.",
        ("content_guid",),
        lambda s: _counted(s, s.usage.shiny_sessions_total, counts_sessions),
    ),
    Family(
        PREFIX + "shiny_session_duration_seconds",
        "histogram",
        f"Duration of ended Shiny sessions, observed once each {_POLL}.",
        ("content_guid",),
        lambda s: _counted(s, s.usage.shiny_session_duration, counts_sessions, _NO_DURATIONS),
        DURATION_BUCKETS,
    ),
    Family(
        PREFIX + "shiny_sessions_active",
        "gauge",
        f"Shiny sessions started but not yet ended, as seen {_POLL}.",
        ("content_guid",),
        _whole(
            lambda s: _one(
                {**dict.fromkeys(_sessions_content(s), 0), **s.usage.shiny_sessions_active}
            )
        ),
    ),
    Family(
        PREFIX + "shiny_sessions_abandoned_total",
        "counter",
        "Shiny sessions that never reported an end and were given up on, counted once each "
        f"{_POLL}.",
        ("content_guid",),
        lambda s: _counted(s, s.usage.shiny_sessions_abandoned_total, counts_sessions),
    ),
    Family(
        PREFIX + "content_visits_total",
        "counter",
        f"Content visits (excluding synthetic ones), counted once each {_POLL}.",
        ("content_guid",),
        lambda s: _counted(s, s.usage.content_visits_total, counts_visits),
    ),
    Family(
        PREFIX + "content_hits_total",
        "counter",
        "Content hits, every content type, Shiny sessions at their start (excluding synthetic "
        f"ones; Connect 2025.04.0 and later), counted once each {_POLL}.",
        ("content_guid",),
        _hits,
    ),
    Family(
        PREFIX + "active_users",
        "gauge",
        "Distinct known users with a visit or Shiny session in the trailing window, evaluated "
        f"{_POLL}.",
        ("window",),
        _whole(lambda s: _one(_zeros(USER_WINDOWS, s.usage.active_users))),
    ),
    Family(
        PREFIX + "content_active_users",
        "gauge",
        f"Distinct known users of a content item in the trailing window, evaluated {_POLL}.",
        ("content_guid", "window"),
        _whole(_content_active_users),
    ),
    Family(
        PREFIX + "content_last_activity_timestamp_seconds",
        "gauge",
        f"Unix time of the latest visit or Shiny session of a content item, as seen {_POLL}.",
        ("content_guid",),
        _whole(lambda s: _one(s.usage.content_last_activity)),
    ),
    Family(
        PREFIX + "content_info",
        "gauge",
        f"Names of a content item (value 1), {_META}; join on content_guid. "
        'Deleted content has app_mode="deleted".',
        ("content_guid", "content_name", "title", "app_mode", "access_type", "owner"),
        _content_info,
    ),
    Family(
        PREFIX + "content_created_timestamp_seconds",
        "gauge",
        f"Unix time a content item was created, in Connect's clock, {_META}.",
        ("content_guid",),
        lambda s: (
            ((guid,), i.created) for guid, i in s.content_info.items() if i.created is not None
        ),
    ),
    Family(
        PREFIX + "content_items",
        "gauge",
        f"Content items by app mode and access type, {_META}.",
        ("app_mode", "access_type"),
        lambda s: _many(s.metadata.content_items),
    ),
    Family(
        PREFIX + "users",
        "gauge",
        f"Connect users by role and state, {_META}.",
        ("role", "state"),
        lambda s: _many(s.metadata.users),
    ),
    Family(
        PREFIX + "user_info",
        "gauge",
        f"Names of a Connect user (value 1), {_META}; join on user_guid.",
        ("user_guid", "username", "role", "state"),
        lambda s: _many(s.metadata.user_info),
    ),
    Family(
        PREFIX + "group_info",
        "gauge",
        f"Names of a Connect group (value 1), {_META}; join on group_guid.",
        ("group_guid", "group_name"),
        lambda s: _many(s.metadata.group_info),
    ),
    Family(
        PREFIX + "group_member_info",
        "gauge",
        f"A user's membership of a Connect group (value 1), {_META}, up to "
        "CONNECT_EXPORTER_GROUP_MEMBERS memberships; join user_guid on user_info.",
        ("group_guid", "user_guid"),
        lambda s: _many(s.metadata.group_members),
    ),
    Family(
        PREFIX + "group_member_series_dropped",
        "gauge",
        "Group memberships left out of group_member_info by CONNECT_EXPORTER_GROUP_MEMBERS, "
        f"{_META} (absent when members are not read).",
        (),
        lambda s: _scalar(s.metadata.group_members_dropped),
    ),
    Family(
        PREFIX + "content_permissions",
        "gauge",
        f"Permission grants on a content item by principal type and role, {_META}.",
        ("content_guid", "principal_type", "role"),
        lambda s: _many(s.metadata.permissions),
    ),
    Family(
        PREFIX + "content_access_info",
        "gauge",
        "A user or group with access to a content item and its role (value 1), "
        f"{_META}; join principal_guid on user_info's user_guid or group_info's group_guid. "
        "Who else may see the item is content_info's access_type (all: anyone, logged_in: "
        "every user).",
        ("content_guid", "principal_guid", "principal_type", "role"),
        lambda s: _many(s.metadata.access),
    ),
    Family(
        PREFIX + "excluded_events_total",
        "counter",
        f"Usage records left uncounted (synthetic traffic or malformed records), counted {_POLL}.",
        ("stream", "reason"),
        _excluded,
    ),
    Family(
        PREFIX + "content_viewer_sessions",
        "gauge",
        "Shiny sessions a user started on a content item in the trailing window, for the item's "
        f"top viewers (CONNECT_EXPORTER_TOP_VIEWERS), evaluated {_POLL}.",
        ("content_guid", "user_guid", "window"),
        _whole(lambda s: _viewer(s, 0)),
    ),
    Family(
        PREFIX + "content_viewer_session_seconds",
        "gauge",
        "Summed duration of a user's Shiny sessions on a content item that ended in the trailing "
        f"window (whole sessions), for the item's top viewers, evaluated {_POLL}.",
        ("content_guid", "user_guid", "window"),
        _whole(lambda s: _viewer(s, 1)),
    ),
    Family(
        PREFIX + "content_viewer_visits",
        "gauge",
        "Visits of a user to a content item in the trailing window, for the item's top viewers, "
        f"evaluated {_POLL}.",
        ("content_guid", "user_guid", "window"),
        _whole(lambda s: _viewer(s, 2)),
    ),
    Family(
        PREFIX + "content_viewer_last_seen_timestamp_seconds",
        "gauge",
        "Connect time of a user's latest visit or Shiny session on a content item (its end, or "
        f"its start while it runs), for the item's top viewers in any window, as seen {_POLL}.",
        ("content_guid", "user_guid"),
        _whole(lambda s: _many(s.usage.viewer_last_seen)),
    ),
    Family(
        PREFIX + "content_viewer_series_dropped",
        "gauge",
        "Viewers of content items left out of the viewer series by the top-N cap, now, by window.",
        ("window",),
        _whole(lambda s: _one(_zeros(VIEWER_WINDOWS, s.usage.viewers.viewers_dropped))),
    ),
    Family(
        PREFIX + "user_sessions",
        "gauge",
        "Shiny sessions a user started in the trailing window, for the server's top users "
        f"(CONNECT_EXPORTER_TOP_USERS, by sessions + visits), evaluated {_POLL}.",
        ("user_guid", "window"),
        _whole(lambda s: ((k, v[0]) for k, v in s.usage.viewers.users.items())),
    ),
    Family(
        PREFIX + "user_visits",
        "gauge",
        "Content visits of a user in the trailing window, for the server's top users, evaluated "
        f"{_POLL}.",
        ("user_guid", "window"),
        _whole(lambda s: ((k, v[1]) for k, v in s.usage.viewers.users.items())),
    ),
    Family(
        PREFIX + "user_series_dropped",
        "gauge",
        "Users left out of the per-user series by the top-N cap, now, by window.",
        ("window",),
        _whole(lambda s: _one(_zeros(VIEWER_WINDOWS, s.usage.viewers.users_dropped))),
    ),
    Family(
        PREFIX + "high_water_mark_timestamp_seconds",
        "gauge",
        f"Connect time below which every usage record has been seen {_POLL}, by stream.",
        ("stream",),
        lambda s: _one(s.high_water_mark),
    ),
    Family(
        PREFIX + "counting_since_timestamp_seconds",
        "gauge",
        "Connect time from which the usage counters count (the counting epoch).",
        (),
        lambda s: _scalar(s.counting_since),
    ),
    Family(
        PREFIX + "windows_evaluated_timestamp_seconds",
        "gauge",
        f"Unix time at which the windowed gauges were last evaluated {_POLL}.",
        (),
        lambda s: _scalar(s.windows_evaluated_at),
    ),
    Family(
        PREFIX + "server_info",
        "gauge",
        f"Version of the Connect server (value 1), {_META}.",
        ("version",),
        lambda s: () if s.metadata.server_version is None else (((s.metadata.server_version,), 1),),
    ),
)


def histogram_check(family: Family, labels: tuple[str, ...], value: HistogramValue) -> None:
    """A histogram value must have a count per bucket, +Inf included."""
    if len(value.counts) != len(family.buckets) + 1:
        raise ValueError(
            f"{family.name}{dict(zip(family.labels, labels, strict=True))}: "
            f"{len(value.counts)} bucket counts for {len(family.buckets) + 1} buckets "
            "(including +Inf)"
        )


def contract() -> list[tuple[str, str, str, tuple[str, ...]]]:
    """Every family the exporter serves: (exposed name, type, help, labels), the snapshot's
    then the exporter's own health."""
    from exporter.health import HEALTH_FAMILIES

    return [(f.name, f.type, f.help, f.labels) for f in FAMILIES] + list(HEALTH_FAMILIES)


def markdown_table() -> str:
    """README's metric table, from `contract()`."""
    lines = ["| metric | type | labels | meaning |", "| --- | --- | --- | --- |"]
    for name, typ, doc, labels in contract():
        lines.append(f"| `{name}` | {typ} | {', '.join(labels)} | {doc} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown_table())
