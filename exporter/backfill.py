"""`connect-usage-exporter backfill`: the history before the takeover, for a Prometheus.

Connect keeps its whole usage history; Prometheus scrapes only the present. This command reads
the history from Connect, replays it through the same usage model the service counts with, and
writes what every usage series would have shown at each step, from the counting origin up to the
takeover (the service's first start, read from its state file), as OpenMetrics for
`promtool tsdb create-blocks-from openmetrics`. The samples carry the scrape's target labels
(`--job`, `--instance`, `--label`), so back-filled and live samples form one series each.

What is written (see README, "History from day one"):
- every series at each step where its value changed; after a quiet stretch, its old value at
  the step before as well, so `increase()` and `rate()` see the change within one step;
- while a series is live (for `KEEP` after its last change, or while a session of its item is
  open), a sample on a grid of `HEARTBEAT` seconds (Prometheus's lookback, so an instant query
  at any time finds it, and a range holds enough samples for `rate()` to extrapolate little);
  then nothing until it changes again. A series at 0 is off the grid: Prometheus reads an
  absent series as nothing, and a sum or a rate as 0;
- the server-wide series (active users, excluded events, the origin) on the grid throughout;
- every item on the server at the first sample, every series at the last (the takeover);
- counters never above what the service first showed (its baseline): events written late,
  after the takeover, are the service's to count, never twice;
- with `--viewers` (rules with top viewers or top users), their series as the service would
  have shown them at each grid step: a viewer's series are sampled on the grid while it is in
  its item's top N (at 0 too), and stop when it leaves it.
"""

from __future__ import annotations

import contextlib
import heapq
import logging
import math
import os
import re
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from itertools import accumulate
from pathlib import Path
from typing import IO, Any, Generic, TypeVar, cast

import anyio
import anyio.abc
from anyio.streams.memory import MemoryObjectReceiveStream
from prometheus_client.utils import floatToGoString

from exporter.client import ConnectClient, Page
from exporter.collector import OPENMETRICS, escape_label_value, family_header, sample_value
from exporter.metadata import content_info
from exporter.metrics import FAMILIES, Family
from exporter.model import (
    ABANDONED_SESSIONS,
    CONTENT_WINDOWS,
    DURATION_BUCKETS,
    EXCLUDE_REASONS,
    EXCLUDED,
    HOUR_US,
    OPEN,
    SESSIONS,
    US,
    USER_WINDOWS,
    VISITS,
    WINDOW_SECONDS,
    Baseline,
    Delta,
    ModelState,
    Rules,
    SessionKey,
    UsageModel,
    UsageView,
    WalkTally,
    last_seen,
)
from exporter.records import ShinySession, Visit
from exporter.snapshot import DELETED, ContentInfo, Snapshot, counts_sessions, counts_visits

log = logging.getLogger("exporter.backfill")

HEARTBEAT = 300  # seconds: Prometheus's lookback; samples on a grid this far apart are always seen
KEEP = 3600  # seconds a series stays on the grid after its last change: the alerts' hour
PREFIX = "connect_usage_"
_LE = (*map(floatToGoString, DURATION_BUCKETS), "+Inf")
R = TypeVar("R")


class BackfillError(Exception):
    """A back-fill that cannot start or go on; the message is the one line a user needs."""


@dataclass(frozen=True)
class Range:
    """What to back-fill: from the origin to the takeover (µs), and the state's baseline."""

    origin: int
    takeover: int
    baseline: Baseline | None


@dataclass
class Written:
    """What a back-fill wrote: its range, the first and last sample (µs), events, samples."""

    history: Range
    first: int = 0
    last: int = 0
    events: int = 0
    samples: int = 0


# --- distinct keys in trailing windows -------------------------------------------------------


class TrailingWindows:
    """How many keys (users, or (content, user) pairs) of each group were seen in each trailing
    window, or are held active by an open session, as the replay's now moves on.

    `last` is the model's map of each key's latest time; a heap per window holds one entry per
    key inside it, re-pushed with the key's newer time when an old entry comes up.
    """

    def __init__(
        self, windows: Sequence[str], last_of: Callable[[Any], int | None], group: Any
    ) -> None:
        self.windows = tuple(windows)
        self.last_of = last_of  # key -> its latest time, or None
        self.group = group  # key -> its group (the content of a pair, or one group for users)
        self.heaps: dict[str, list[tuple[int, Any]]] = {w: [] for w in windows}
        self.inside: dict[str, set[Any]] = {w: set() for w in windows}
        self.open: dict[Any, int] = {}
        self.counts: dict[str, dict[Any, int]] = {w: {} for w in windows}
        self.changed: set[Any] = set()  # groups whose counts changed since the last `take`

    def _count(self, window: str, key: Any, step: int) -> None:
        group = self.group(key)
        counts = self.counts[window]
        counts[group] = counts.get(group, 0) + step
        self.changed.add(group)

    def seen(self, key: Any, when: int) -> None:
        for window in self.windows:
            if key not in self.inside[window]:
                self.inside[window].add(key)
                heapq.heappush(self.heaps[window], (when, key))
                if not self.open.get(key):
                    self._count(window, key, 1)

    def opened(self, key: Any) -> None:
        self.open[key] = self.open.get(key, 0) + 1
        if self.open[key] == 1:
            for window in self.windows:
                if key not in self.inside[window]:
                    self._count(window, key, 1)

    def closed(self, key: Any) -> None:
        left = self.open.get(key, 0) - 1
        if left > 0:
            self.open[key] = left
            return
        self.open.pop(key, None)
        for window in self.windows:
            if key not in self.inside[window]:
                self._count(window, key, -1)

    def expire(self, now: int) -> None:
        """Keys whose latest time left a window leave it (unless an open session holds them)."""
        for window in self.windows:
            threshold = now - WINDOW_SECONDS[window] * US
            heap, inside = self.heaps[window], self.inside[window]
            while heap and heap[0][0] < threshold:
                _when, key = heapq.heappop(heap)
                latest = self.last_of(key)
                if latest is not None and latest >= threshold:
                    heapq.heappush(heap, (latest, key))
                    continue
                inside.discard(key)
                if not self.open.get(key):
                    self._count(window, key, -1)

    def take(self) -> set[Any]:
        changed, self.changed = self.changed, set()
        return changed


# --- the series being written ----------------------------------------------------------------


def _family(name: str) -> Family:
    return next(f for f in FAMILIES if f.name == PREFIX + name)


SESSIONS_TOTAL = _family("shiny_sessions_total")
DURATIONS = _family("shiny_session_duration_seconds")
SESSIONS_ACTIVE = _family("shiny_sessions_active")
ABANDONED_TOTAL = _family("shiny_sessions_abandoned_total")
VISITS_TOTAL = _family("content_visits_total")
ACTIVE_USERS = _family("active_users")
CONTENT_ACTIVE_USERS = _family("content_active_users")
LAST_ACTIVITY = _family("content_last_activity_timestamp_seconds")
CONTENT_INFO = _family("content_info")
EXCLUDED_TOTAL = _family("excluded_events_total")
COUNTING_SINCE = _family("counting_since_timestamp_seconds")
BACKFILLED = (
    SESSIONS_TOTAL,
    DURATIONS,
    SESSIONS_ACTIVE,
    ABANDONED_TOTAL,
    VISITS_TOTAL,
    ACTIVE_USERS,
    CONTENT_ACTIVE_USERS,
    LAST_ACTIVITY,
    CONTENT_INFO,
    EXCLUDED_TOTAL,
    COUNTING_SINCE,
)
# The top viewers and top users: gauges of the present, sampled on the grid while shown.
VIEWER_FAMILIES = tuple(
    _family(name)
    for name in (
        "content_viewer_sessions",
        "content_viewer_session_seconds",
        "content_viewer_visits",
        "content_viewer_last_seen_timestamp_seconds",
        "content_viewer_series_dropped",
        "user_sessions",
        "user_visits",
        "user_series_dropped",
    )
)
COUNTER_FAMILY = {
    SESSIONS: SESSIONS_TOTAL,
    VISITS: VISITS_TOTAL,
    ABANDONED_SESSIONS: ABANDONED_TOTAL,
}


@dataclass(slots=True)
class _Series:
    head: str  # the line up to its value: `name{labels} `
    value: str
    written: int = -1  # the step of its last sample
    live_until: int = -1  # the last step it is sampled at without a change
    steady: bool = False  # server-wide: on the grid throughout, at 0 too


@dataclass
class _Writer:
    """Samples as OpenMetrics lines: each series at its changes, and on a grid of `HEARTBEAT`
    seconds while it is live (for `KEEP` after its last change or touch).

    A series that changes after a quiet stretch gets its old value at the step before the
    change as well, so `increase()` and `rate()` over a range see the whole step.
    """

    out: IO[str]
    target: Sequence[tuple[str, str]]  # job, instance and any extra labels
    step_s: int
    series: dict[Any, _Series] = field(default_factory=dict)
    live: dict[Any, _Series] = field(default_factory=dict)  # sampled on the grid
    pending: list[_Series] = field(default_factory=list)  # written at this step
    before: list[str] = field(default_factory=list)  # old values, dated the step before
    lines: int = 0

    def __post_init__(self) -> None:
        self.heartbeat = max(1, HEARTBEAT // self.step_s)  # steps between grid samples
        self.grid = self.heartbeat * self.step_s
        self.keep = max(1, KEEP // self.step_s)

    def head(self, name: str, labels: Sequence[tuple[str, str]]) -> str:
        pairs = sorted([*labels, *self.target])
        text = ",".join(f'{k}="{escape_label_value(v)}"' for k, v in pairs)
        return f"{name}{{{text}}} "

    def set(
        self,
        key: Any,
        family: Family,
        values: Sequence[str],
        value: str,
        i: int,
        *,
        suffix: str = "",
        extra: Sequence[tuple[str, str]] = (),
        steady: bool = False,
    ) -> None:
        """The series' value at step `i`: written now if it changed (or is new)."""
        s = self.series.get(key)
        if s is None:
            labels = [*zip(family.labels, values, strict=True), *extra]
            head = self.head(family.name + suffix, labels)
            s = self.series[key] = _Series(head, value, steady=steady)
            if value == "0" and not steady:
                self._write(s, i)  # at 0: shown once (see `touch`)
                return
            if family.type != "gauge" and i > 0:
                self.before.append(s.head + "0")  # a count from the origin was 0 before
        elif s.value != value:
            if s.written < i - 1:
                self.before.append(s.head + s.value)
            s.value = value
        else:
            self.touch(key, i)
            return
        self._write(s, i)
        s.live_until = i + self.keep
        self.live[key] = s

    def touch(self, key: Any, i: int) -> None:
        """Keep a series sampled as if it had changed at step `i`; one at 0 is left off the
        grid (a sum or a rate reads an absent series as 0; nothing needs its heartbeat)."""
        s = self.series.get(key)
        if s is None or (s.value == "0" and not s.steady):
            return
        if s.live_until < i + self.keep:
            s.live_until = i + self.keep
            self.live[key] = s
            if s.written < i - self.heartbeat:
                self._write(s, i)  # seen from now on, not only from the next grid step

    def _write(self, s: _Series, i: int) -> None:
        if s.written != i:  # else already in this step's lines, which take its latest value
            s.written = i
            self.pending.append(s)

    def heartbeats(self, i: int, when_s: int) -> None:
        """At a grid step, every live series; the others leave the grid."""
        if when_s % self.grid:
            return
        gone = []
        for key, s in self.live.items():
            if s.live_until < i or (s.value == "0" and not s.steady):
                gone.append(key)
            else:
                self._write(s, i)
        for key in gone:
            del self.live[key]

    def drop(self, key: Any) -> None:
        """The series is no longer shown: no more samples (Prometheus lets it go after its
        lookback)."""
        self.series.pop(key, None)
        self.live.pop(key, None)

    def everything(self, i: int) -> None:
        """Every series at step `i` (the last one: the live exporter takes over from here)."""
        for s in self.series.values():
            self._write(s, i)

    def flush(self, when_s: int) -> None:
        earlier = f" {when_s - self.step_s}\n"
        stamp = f" {when_s}\n"
        self.out.write(
            "".join([line + earlier for line in self.before])
            + "".join([s.head + s.value + stamp for s in self.pending])
        )
        self.lines += len(self.before) + len(self.pending)
        self.before.clear()
        self.pending.clear()


def _number(value: float) -> str:
    return str(value) if type(value) is int else sample_value(value)


# --- the replay ------------------------------------------------------------------------------


class Replay:
    """The usage model fed the history step by step, and the samples each step shows."""

    def __init__(
        self,
        rules: Rules,
        history: Range,
        writer: _Writer,
        *,
        content: dict[str, ContentInfo],
        streams: Sequence[str],
        replay_from: int,
    ) -> None:
        self.history = history
        self.writer = writer
        self.content = dict(content)
        self.streams = tuple(streams)
        state = ModelState(
            counting_since=history.origin,
            marks=dict.fromkeys(self.streams, replay_from),
        )
        self.model = UsageModel(
            Rules(
                overlap_us=0,
                max_session_age_us=rules.max_session_age_us,
                exclude_user_agents=rules.exclude_user_agents,
                top_viewers=rules.top_viewers,
                top_users=rules.top_users,
            ),
            state,
        )
        self.viewer_series: set[Any] = set()  # the viewer series shown at the last grid step
        # Each record is read once, in order: every one after the origin is new.
        self.walks = {
            s: WalkTally(start_us=replay_from, fresh_after=history.origin - 1) for s in self.streams
        }
        self.users = TrailingWindows(USER_WINDOWS, self.model.user_last.get, lambda _u: "")
        pair_last = self.model.pair_last
        self.pairs = TrailingWindows(CONTENT_WINDOWS, lambda k: pair_last.get(*k), lambda k: k[0])
        self.open: dict[str, int] = {}  # content -> sessions open now
        self.sessions: dict[SessionKey, bool] = {}  # open now?
        self.abandon_at: list[tuple[int, SessionKey]] = []  # sessions still open at takeover
        self.step_index = 0
        self.pruned_hour = -1

    # -- feeding ---------------------------------------------------------------------------

    def start(self, session: ShinySession, now: int) -> None:
        """A session as it was at its start: open, unless it ended within this step."""
        takeover = self.history.takeover
        ended = session.ended
        key = (session.content_guid, session.user_guid or "", session.started)
        if ended is None or ended > takeover:
            # Still open when the service took over: given up on once past the age limit.
            self.model.apply_shiny([session._replace(ended=None)], self.walks["shiny"], now)
            heapq.heappush(
                self.abandon_at, (session.started + self.model.rules.max_session_age_us, key)
            )
        else:
            self.model.apply_shiny(
                [session._replace(ended=None) if ended >= now else session],
                self.walks["shiny"],
                now,
            )

    def end(self, session: ShinySession, now: int) -> None:
        self.model.apply_shiny([session], self.walks["shiny"], now)

    def visits(self, visits: Sequence[Visit], now: int) -> None:
        self.model.apply_visits(visits, self.walks["visits"], now)

    def malformed(self, stream: str, raws: Sequence[bytes], anchor: int) -> None:
        self.model.count_malformed(stream, raws, anchor, self.walks[stream])

    # -- a step ----------------------------------------------------------------------------

    def sample(self, now: int, *, last: bool = False) -> None:
        """Everything as of `now` (µs): abandon what is due, then write the changed series."""
        model = self.model
        while self.abandon_at and self.abandon_at[0][0] <= now:
            _due, key = heapq.heappop(self.abandon_at)
            if self.sessions.get(key):
                model.abandon(key)
        for stream in self.streams:
            model.set_hwm(stream, now)
        if now // HOUR_US != self.pruned_hour:  # memory only: an hour's pass over the maps
            self.pruned_hour = now // HOUR_US
            model.prune_windows(now)
        delta = model.take_delta()
        i = self.step_index
        self._sessions(delta)
        for user, when in delta.user_last.items():
            if when is not None:
                self.users.seen(user, when)
        for (content, user), when in delta.pair_last.items():
            if when is not None:
                self.pairs.seen((content, user), when)
        self.users.expire(now)
        self.pairs.expire(now)
        w = self.writer
        for (name, label), value in delta.counters.items():
            self._counter(name, label, value, i)
        for content, (counts, total) in delta.durations.items():
            self._durations(content, counts, total, i)
        touched = {label for (name, label) in delta.counters if name != EXCLUDED}
        touched.update(delta.durations, delta.content_last)
        for content in {*delta.content_last, *self.open}:
            if content not in delta.content_last and (now // US) % w.grid and not last:
                continue  # "now" for an item with a session open: refreshed on the grid
            touched.add(content)
            if self.open.get(content):
                w.touch(("active", content), i)  # sessions open: the gauge stays visible
            latest = now if self.open.get(content) else model.content_last.get(content)
            if latest is not None:
                w.set(("last", content), LAST_ACTIVITY, (content,), _number(latest / US), i)
        for content in self.pairs.take():
            self._content_users(content, i)
            touched.add(content)
        self.users.take()
        for window in USER_WINDOWS:
            count = self.users.counts[window].get("", 0)
            w.set(("au", window), ACTIVE_USERS, (window,), str(count), i, steady=True)
        w.set(("origin",), COUNTING_SINCE, (), _number(self.history.origin / US), i, steady=True)
        for content in touched:
            self._live(content, i)
        for stream in self.streams:  # the server-wide series stay sampled throughout
            for reason in EXCLUDE_REASONS:
                w.touch(("excluded", f"{stream}/{reason}"), i)
        if model.viewers is not None and (last or not (now // US) % w.grid):
            self._viewers(now, i)
        w.heartbeats(i, now // US)  # after the changes, which come with their old values
        if last:
            w.everything(i)
        self.step_index += 1

    def first(self, now: int, *, last: bool = False) -> None:
        """The first sample: every item on the server at its value, 0 where nothing happened."""
        self.sample(now, last=last)
        i = self.step_index - 1
        counters = self.model.counters
        for guid, info in self.content.items():
            if counts_sessions(info):
                self._counter(SESSIONS, guid, counters.get((SESSIONS, guid), 0), i)
                self._counter(
                    ABANDONED_SESSIONS, guid, counters.get((ABANDONED_SESSIONS, guid), 0), i
                )
                counts = self.model.duration_counts.get(guid, [0] * len(_LE))
                self._durations(guid, counts, self.model.duration_sums.get(guid, 0), i)
                self._active(guid, i)
            if counts_visits(info):
                self._counter(VISITS, guid, counters.get((VISITS, guid), 0), i)
            self._content_users(guid, i)
            self._info(guid, i)
        for stream in self.streams:
            for reason in EXCLUDE_REASONS:
                label = f"{stream}/{reason}"
                self._counter(EXCLUDED, label, counters.get((EXCLUDED, label), 0), i)
        if last:
            self.writer.everything(i)

    def _viewers(self, now: int, i: int) -> None:
        """The top viewers and users at `now`, rendered by the same families as live."""
        model = self.model
        assert model.viewers is not None
        rules = model.rules
        view = model.viewers.view(now, rules.top_viewers, rules.top_users)
        snap = Snapshot(
            usage=UsageView(viewers=view, viewer_last_seen=last_seen(model.pair_last, view))
        )
        shown: set[Any] = set()
        w = self.writer
        for family in VIEWER_FAMILIES:
            for values, value in family.samples(snap):
                key = ("viewer", family.name, values)
                shown.add(key)
                w.set(key, family, values, _number(value), i, steady=True)
        for key in self.viewer_series - shown:
            w.drop(key)
        self.viewer_series = shown

    def _sessions(self, delta: Delta) -> None:
        """Open sessions, as their keys change state: the active gauges and the windows."""
        for changed_key, change in delta.keys.get("shiny", {}).items():
            key = cast(SessionKey, changed_key)
            now_open = change is not None and change[0] == OPEN
            was_open = self.sessions.get(key, False)
            if now_open == was_open:
                if change is None:
                    self.sessions.pop(key, None)
                continue
            content, user, _started = key
            self.open[content] = self.open.get(content, 0) + (1 if now_open else -1)
            if user:
                if now_open:
                    self.users.opened(user)
                    self.pairs.opened((content, user))
                else:
                    self.users.closed(user)
                    self.pairs.closed((content, user))
            if change is None:
                self.sessions.pop(key, None)
            else:
                self.sessions[key] = now_open
            self._active(content, self.step_index)
            if not self.open[content]:
                del self.open[content]

    def _content_users(self, content: str, i: int) -> None:
        for window in CONTENT_WINDOWS:
            count = str(self.pairs.counts[window].get(content, 0))
            key = ("cau", content, window)
            self.writer.set(key, CONTENT_ACTIVE_USERS, (content, window), count, i)

    def _active(self, content: str, i: int) -> None:
        value = str(self.open.get(content, 0))
        self.writer.set(("active", content), SESSIONS_ACTIVE, (content,), value, i)

    def _clamp(self, name: str, label: str, value: int) -> int:
        baseline = self.history.baseline
        if baseline is None:
            return value
        return min(value, baseline.counters.get((name, label), 0))

    def _counter(self, name: str, label: str, value: int, i: int) -> None:
        value = self._clamp(name, label, value)
        if name == EXCLUDED:
            values = tuple(label.split("/", 1))
            self.writer.set(("excluded", label), EXCLUDED_TOTAL, values, str(value), i, steady=True)
        else:
            self.writer.set((name, label), COUNTER_FAMILY[name], (label,), str(value), i)

    def _durations(self, content: str, counts: Sequence[int], total: int, i: int) -> None:
        baseline = self.history.baseline
        if baseline is not None:
            cap, cap_sum = baseline.durations.get(content, ([0] * len(_LE), 0))
            counts = [min(n, c) for n, c in zip(counts, cap, strict=True)]
            total = min(total, cap_sum)
        w = self.writer
        cumulative = list(accumulate(counts))
        for le, n in zip(_LE, cumulative, strict=True):
            key = ("bucket", content, le)
            w.set(key, DURATIONS, (content,), str(n), i, suffix="_bucket", extra=[("le", le)])
        w.set(("count", content), DURATIONS, (content,), str(cumulative[-1]), i, suffix="_count")
        w.set(("sum", content), DURATIONS, (content,), _number(total / US), i, suffix="_sum")

    def _info(self, content: str, i: int) -> None:
        info = self.content.get(content, DELETED)  # usage of an item gone from Connect
        values = (content, info.name, info.title, info.app_mode, info.access_type, info.owner)
        self.writer.set(("info", content), CONTENT_INFO, values, "1", i)

    def _live(self, content: str, i: int) -> None:
        """An item that changed keeps its names sampled while its changed series are."""
        w = self.writer
        if ("cau", content, CONTENT_WINDOWS[0]) not in w.series:
            self._content_users(content, i)
        if ("info", content) not in w.series:
            self._info(content, i)
        else:
            w.touch(("info", content), i)


# --- reading the history ---------------------------------------------------------------------


def _read_ahead(
    group: anyio.abc.TaskGroup, pages: AsyncIterator[Page[R]], depth: int = 8
) -> MemoryObjectReceiveStream[Page[R]]:
    """Pages read by a task of `group`, a few ahead, so fetching overlaps the replay."""
    send, receive = anyio.create_memory_object_stream[Page[R]](depth)

    async def read() -> None:
        async with send, aclosing(pages) as source:  # type: ignore[type-var]
            async for page in source:
                await send.send(page)

    group.start_soon(read)
    return receive


async def replay(
    client: ConnectClient,
    rules: Rules,
    history: Range,
    writer: _Writer,
    content: dict[str, ContentInfo],
    *,
    progress: Any = None,
) -> Written:
    """Read the history and write every step's samples."""
    step_us = writer.step_s * US
    replay_from = history.origin - max(WINDOW_SECONDS.values()) * US
    engine = Replay(
        rules,
        history,
        writer,
        content=content,
        streams=("shiny", "visits"),
        replay_from=replay_from,
    )
    takeover = history.takeover
    first = -(-history.origin // step_us) * step_us  # the first step at or after the origin
    last = takeover // step_us * step_us
    if last < first:
        raise BackfillError(
            "nothing to back-fill: the takeover is less than one step after the origin "
            "(CONNECT_EXPORTER_HISTORY_DAYS is 0 or tiny)"
        )
    result = Written(history)
    ends: list[tuple[int, int, ShinySession]] = []  # (ended, order, session) of open ones
    order = 0
    async with anyio.create_task_group() as group:
        pages = client.shiny_usage_pages(start=replay_from, end=takeover)
        sessions = _Feed("shiny", _read_ahead(group, pages), _started, engine, result)
        pages_v = client.visit_pages(start=replay_from, end=takeover)
        visits = _Feed("visits", _read_ahead(group, pages_v), _time, engine, result)
        # Before Connect's oldest record every value is 0: the samples start at its step.
        await sessions.until(None)
        await visits.until(None)
        oldest = min(
            [_started(r) for r in sessions.pending[:1]] + [_time(v) for v in visits.pending[:1]],
            default=takeover,
        )
        if oldest // step_us * step_us > first:
            first = min(oldest // step_us * step_us, last)
        steps = (last - first) // step_us + 1
        result.first, result.last = first, last
        if progress is not None:
            progress.total = steps
        for index in range(steps):
            now = first + index * step_us
            # Everything before `now`: session starts, their ends, visits.
            await sessions.until(now)
            await visits.until(now)
            for session in sessions.take(now):
                engine.start(session, now)
                if session.ended is not None and now <= session.ended <= takeover:
                    order += 1
                    heapq.heappush(ends, (session.ended, order, session))
            while ends and ends[0][0] < now:
                engine.end(heapq.heappop(ends)[2], now)
            batch = visits.take(now)
            if batch:
                engine.visits(batch, now)
            if index == 0:
                engine.first(now, last=steps == 1)
            else:
                engine.sample(now, last=index == steps - 1)
            writer.flush(now // US)
            if progress is not None:
                progress.update(1)
        group.cancel_scope.cancel()  # the readers may hold records past the last step
    result.samples = writer.lines
    return result


def _started(session: ShinySession) -> int:
    return session.started


def _time(visit: Visit) -> int:
    return visit.time


@dataclass
class _Feed(Generic[R]):
    """One stream's pages, read a few ahead, and its records (before the takeover) not yet fed
    to the replay; a page's malformed records are counted as they come."""

    stream: str
    pages: MemoryObjectReceiveStream[Page[R]]
    time: Callable[[R], int]
    engine: Replay
    result: Written
    pending: list[R] = field(default_factory=list)
    done: bool = False

    async def until(self, now: int | None) -> None:
        """Read on until a record at or after `now` is in hand (any record, when None)."""
        while not self.done and (
            not self.pending or (now is not None and self.time(self.pending[-1]) < now)
        ):
            try:
                page = await self.pages.receive()
            except anyio.EndOfStream:
                self.done = True
                return
            self.result.events += len(page.records)
            takeover = self.result.history.takeover
            self.pending.extend(r for r in page.records if self.time(r) < takeover)
            if page.malformed and page.records:
                raws = [m.identity() for m in page.malformed]
                self.engine.malformed(self.stream, raws, self.time(page.records[-1]))

    def take(self, now: int) -> list[R]:
        """The records before `now`, in order, handed over once."""
        cut = _before(self.pending, now, self.time)
        out = self.pending[:cut]
        del self.pending[:cut]
        return out


def _before(records: Sequence[R], now: int, key: Any) -> int:
    """How many of `records` (in order by `key`) lie before `now`."""
    low, high = 0, len(records)
    while low < high:
        mid = (low + high) // 2
        if key(records[mid]) < now:
            low = mid + 1
        else:
            high = mid
    return low


# --- the command -----------------------------------------------------------------------------

_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
_OWN_LABELS = {label for family in FAMILIES for label in family.labels} | {"le"}


def target_labels(job: str, instance: str, extra: Sequence[str]) -> list[tuple[str, str]]:
    """The scrape target's labels as the samples carry them: `job`, `instance`, and NAME=VALUE."""
    labels = {"job": job, "instance": instance}
    for item in extra:
        name, sep, value = item.partition("=")
        if not sep or not _LABEL_NAME.fullmatch(name) or name.startswith("__"):
            raise BackfillError(f"invalid --label {item!r}: expected NAME=VALUE")
        if name in labels or name in _OWN_LABELS:
            raise BackfillError(f"invalid --label {item!r}: {name} is already a label")
        labels[name] = value
    return sorted(labels.items())


async def history_range(client: ConnectClient, state: ModelState | None, days: float) -> Range:
    """From the state file (the live exporter's origin and takeover), or, before any first
    start, from Connect's now."""
    if state is not None and state.counting_since is not None:
        if state.server and state.server != client.server:
            raise BackfillError(
                f"the state file counts {state.server}, not {client.server}: back-fill with "
                "the CONNECT_SERVER the exporter reads"
            )
        takeover = state.takeover if state.takeover is not None else state.counting_since
        return Range(state.counting_since, takeover, state.baseline)
    now = await client.server_time()
    if now is None:
        raise BackfillError("Connect sent no Date header: its present time is unknown")
    takeover = math.floor(now) * US
    return Range(takeover - int(days * 86400 * US), takeover, None)


def _umask() -> int:
    """The process's umask, read without changing it (Linux), else the common 022."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    return 0o022


@contextlib.contextmanager
def output_file(path: Path) -> Iterator[IO[str]]:
    """A temporary file beside `path`, renamed onto it when the block ends without an error;
    removed otherwise, so nothing half-written is ever where promtool would read it."""
    if path.is_dir():
        raise BackfillError(f"cannot write {path}: it is a directory")
    try:
        handle = tempfile.NamedTemporaryFile(  # noqa: SIM115  # renamed or removed below
            "w",
            encoding="utf-8",
            dir=path.parent,
            prefix=f".{path.name}.",
            suffix=".tmp",
            delete=False,
        )
    except OSError as exc:
        raise BackfillError(f"cannot write {path}: {exc.strerror or exc}") from None
    try:
        with handle:
            os.chmod(
                handle.fileno(), 0o666 & ~_umask()
            )  # as `open` would: promtool may be another user
            yield handle
        try:
            os.replace(handle.name, path)
        except OSError as exc:
            raise BackfillError(f"cannot write {path}: {exc.strerror or exc}") from None
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(handle.name)
        raise


async def run_backfill(
    client: ConnectClient,
    rules: Rules,
    state: ModelState | None,
    *,
    output: Path,
    step: int,
    target: Sequence[tuple[str, str]],
    history_days: float,
    progress: bool,
) -> Written:
    """The whole back-fill, written to `output` only once complete."""
    with output_file(output) as out:
        history = await history_range(client, state, history_days)
        content_page = await client.content()
        content = {item.guid: content_info(item) for item in content_page.records}
        viewers = rules.top_viewers > 0 or rules.top_users > 0
        for family in FAMILIES:
            if family in BACKFILLED or (viewers and family in VIEWER_FAMILIES):
                out.write(family_header(family, OPENMETRICS))
        writer = _Writer(out, target, step)
        steps = (history.takeover // (step * US)) - (history.origin // (step * US))
        bar = _progress(steps) if progress else None
        try:
            written = await replay(client, rules, history, writer, content, progress=bar)
        finally:
            if bar is not None:
                bar.close()
        out.write("# EOF\n")
    return written


def _progress(total: int) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, unit="step", file=sys.stderr, dynamic_ncols=True, leave=False)
