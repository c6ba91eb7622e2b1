"""The usage model: what the exporter knows, and the rules that make every count exactly-once.

Records carry no ids (see the reference), so the model identifies them itself:
- a Shiny session by `(content_guid, user_guid, started)`, with the state open/closed/abandoned;
- a visit by all of its fields but `data_version`, as a multiset: a walk that meets a key more
  often than the stored count has met new, identical visits;
- a hit by its `id` (hits are the one stream that has ids);
- a malformed record by a digest of its raw JSON, counted like a visit.
These de-dup keys live in one key space per kind (`SPACES`). Keys are kept only for records at
or after the counting epoch (older records change no counter, and the last-seen maps they feed
are idempotent), and only while a walk can still return them: below the stream's walk start
(`hwm - overlap`) they are forgotten, except the sessions still open or abandoned.

The model is built from a `ModelState` (what a store loaded) and hands every change back as a
`Delta` in the same terms; it never does I/O.
"""

from __future__ import annotations

import hashlib
from bisect import bisect_left
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

from exporter.lastseen import PairLastSeen, PairTimes, UserIndex, UserLastSeen
from exporter.records import Hit, ShinySession, Visit, share
from exporter.viewers import STARTED, VISITED, ViewerEvent, ViewerLog, ViewerView, top_pairs

US = 1_000_000
# Session durations run from seconds (a bounce) to hours (a dashboard left open all day).
DURATION_BUCKETS: tuple[float, ...] = (
    1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0,
    3600.0, 7200.0, 14400.0, 28800.0, 86400.0,
)  # fmt: skip
USER_WINDOWS: tuple[str, ...] = ("1h", "24h", "7d", "30d")
CONTENT_WINDOWS: tuple[str, ...] = ("24h", "7d", "30d")
VIEWER_WINDOWS: tuple[str, ...] = ("24h", "7d", "30d")  # top viewers and top users
WINDOW_SECONDS: Mapping[str, int] = MappingProxyType(
    {"1h": 3600, "24h": 86400, "7d": 7 * 86400, "30d": 30 * 86400}
)
EXCLUDE_REASONS: tuple[str, ...] = ("synthetic", "malformed")
OPEN, CLOSED, ABANDONED = 0, 1, 2
MAX_WINDOW_US = max(WINDOW_SECONDS.values()) * US
HOUR_US = 3600 * US

Key = tuple[object, ...]  # a de-dup key: a session's, a visit's or a malformed record's identity
KeyValue = tuple[int, int]  # (state or count, time µs)
SessionKey = tuple[str, str, int]  # (content_guid, user_guid or "", started µs)
VisitKey = tuple[object, ...]  # a Visit without its data_version
CounterKey = tuple[str, str]  # (counter name, label)
PairKey = tuple[str, str]  # (content_guid, user_guid)

# Key spaces, and the stream whose walk start bounds each.
SESSIONS_SPACE = "shiny"
VISITS_SPACE = "visits"
HITS_SPACE = "hits"
LEGACY_SPACE = "legacy"  # digests from state files of schema 2 (see `_legacy_seen`)
SPACES: dict[str, str] = {
    SESSIONS_SPACE: "shiny",
    VISITS_SPACE: "visits",
    "shiny:malformed": "shiny",
    "visits:malformed": "visits",
    HITS_SPACE: "hits",
    "hits:malformed": "hits",
    LEGACY_SPACE: "visits",
}

# Counter names.
SESSIONS = "shiny_sessions"
VISITS = "content_visits"
HITS = "content_hits"
ABANDONED_SESSIONS = "shiny_sessions_abandoned"
EXCLUDED = "excluded"  # label "stream/reason"


def _bucket_index(seconds: float) -> int:
    """The first bucket whose upper bound (`le`) holds `seconds`; the last one is +Inf."""
    return bisect_left(DURATION_BUCKETS, seconds)


def visit_key(visit: Visit) -> VisitKey:
    """A visit's identity: every field but `data_version` (the last one)."""
    return visit[:-1]


def legacy_digest(visit: Visit) -> str:
    """The digest a schema-2 state file keyed this visit by."""
    text = "\x1f".join(
        (
            visit.content_guid,
            visit.user_guid or "",
            str(visit.time),
            visit.variant_key or "",
            visit.rendering_id or "",
            visit.bundle_id or "",
            visit.path or "",
            visit.user_agent or "",
        )
    )
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def malformed_digest(stream: str, raw: bytes) -> str:
    """A malformed record's identity: its raw JSON, as it came."""
    return hashlib.blake2b(stream.encode() + b"\x1f" + raw, digest_size=16).hexdigest()


@dataclass(slots=True)
class Rules:
    """The counting rules a model applies (settings, not state)."""

    overlap_us: int
    max_session_age_us: int
    exclude_user_agents: tuple[str, ...] = ()
    top_viewers: int = 0  # per content item and window; 0: no viewer figures
    top_users: int = 0  # server-wide per window; 0: none
    history_us: int = 0  # a first start counts this much history (the origin before it)


@dataclass(slots=True)
class ModelState:
    """Everything the model knows, as a store loads it and as the model's deltas change it."""

    counting_since: int | None = None  # the origin: counters count events from here
    takeover: int | None = None  # the first start, from which the exporter counts live
    server: str | None = None  # the Connect whose events these are
    marks: dict[str, int] = field(default_factory=dict)  # stream -> high-water mark µs
    counters: dict[CounterKey, int] = field(default_factory=dict)
    durations: dict[str, tuple[list[int], int]] = field(default_factory=dict)  # counts, sum µs
    keys: dict[str, dict[Key, KeyValue]] = field(default_factory=dict)  # space -> key -> value
    # Last-seen times as rows, the greatest time of a key's rows winning: (user, µs) and
    # (content, user, µs). These and the viewer events are read once, into compact structures.
    user_last: Iterable[tuple[str, int]] = field(default_factory=list)
    pair_last: Iterable[tuple[str, str, int]] = field(default_factory=list)
    content_last: dict[str, int] = field(default_factory=dict)
    viewer_events: Iterable[ViewerEvent] = field(default_factory=list)  # see exporter.viewers
    # The counters when they were first shown, after a first start's first complete walks:
    # what a back-fill of the history before the takeover must not exceed.
    baseline: Baseline | None = None


@dataclass(slots=True)
class Baseline:
    counters: dict[CounterKey, int]
    durations: dict[str, tuple[list[int], int]]


@dataclass(slots=True)
class Delta:
    """What changed since the last delta, in the model's terms; None means forgotten.

    `keys` values carry whether the key is pinned (an open or abandoned session): every other
    key is forgotten once it falls below its space's `horizons` entry, which a store may apply
    as one range instead of key by key, and may skip writing such a key at all.
    """

    counting_since: int | None = None
    takeover: int | None = None
    server: str | None = None
    marks: dict[str, int] = field(default_factory=dict)
    counters: dict[CounterKey, int] = field(default_factory=dict)
    durations: dict[str, tuple[tuple[int, ...], int]] = field(default_factory=dict)
    keys: dict[str, dict[Key, tuple[int, int, bool] | None]] = field(default_factory=dict)
    horizons: dict[str, int] = field(default_factory=dict)
    user_last: dict[str, int | None] = field(default_factory=dict)
    pair_last: dict[PairKey, int | None] = field(default_factory=dict)
    content_last: dict[str, int] = field(default_factory=dict)
    viewer_events: list[ViewerEvent] = field(default_factory=list)  # added
    viewer_horizon: int | None = None  # viewer events before this are forgotten
    baseline: Baseline | None = None

    def is_empty(self) -> bool:
        return (
            self.counting_since is None
            and self.baseline is None
            and not any(
                (
                    self.marks,
                    self.counters,
                    self.durations,
                    any(self.keys.values()),
                    self.user_last,
                    self.pair_last,
                    self.content_last,
                    self.viewer_events,
                    self.viewer_horizon is not None,
                )
            )
        )


@dataclass(slots=True)
class WalkTally:
    """What one walk over a stream has met so far; multiset counts live only for one walk."""

    start_us: int
    # How often this walk has met each visit key, kept until the committed mark passes them by
    # the overlap (`forget_before`): a whole walk's tally would cost ~150 B per visit of a
    # catch-up. Kept in arrival order for that.
    visit_counts: dict[VisitKey, int] = field(default_factory=dict)
    visit_order: deque[tuple[int, VisitKey]] = field(default_factory=deque)
    # Per (slice, key): a slice's query also returns the open and long sessions that started
    # before it, so one bad record can reach several slices of a walk; it is as many events as
    # the most any one slice met, not their sum.
    malformed_counts: dict[tuple[int, str], int] = field(default_factory=dict)
    open_seen: set[SessionKey] = field(default_factory=set)
    # Visits after this (the newest visit key when the walk began) cannot be re-reads. The
    # default, for a tally made by hand: every visit is checked against the keys.
    fresh_after: int = 2**63
    new_events: int = 0
    records: int = 0
    malformed: int = 0
    excluded: int = 0

    def forget_before(self, bound_us: int) -> None:
        """Drop the tally of visits before `bound_us`; records arrive about in time order."""
        order, counts = self.visit_order, self.visit_counts
        while order and order[0][0] < bound_us:
            counts.pop(order.popleft()[1], None)


@dataclass(frozen=True, slots=True)
class HistogramValue:
    """Per-bucket (non-cumulative) counts aligned with a bucket tuple, the last one being +Inf."""

    counts: tuple[int, ...]
    sum: float

    @property
    def count(self) -> int:
        return sum(self.counts)


@dataclass(frozen=True, slots=True)
class UsageView:
    """The usage part of a snapshot, evaluated at one `now`; keyed by content_guid unless said."""

    shiny_sessions_total: Mapping[str, int] = field(default_factory=dict)
    shiny_session_duration: Mapping[str, HistogramValue] = field(default_factory=dict)
    shiny_sessions_active: Mapping[str, int] = field(default_factory=dict)
    shiny_sessions_abandoned_total: Mapping[str, int] = field(default_factory=dict)
    content_visits_total: Mapping[str, int] = field(default_factory=dict)
    content_hits_total: Mapping[str, int] = field(default_factory=dict)
    active_users: Mapping[str, int] = field(default_factory=dict)  # window
    content_active_users: Mapping[tuple[str, str], int] = field(default_factory=dict)
    content_last_activity: Mapping[str, float] = field(default_factory=dict)
    excluded_events_total: Mapping[tuple[str, str], int] = field(default_factory=dict)
    viewers: ViewerView = field(default_factory=ViewerView)
    # (content, user) of each viewer in some window's top N -> its latest activity (seconds)
    viewer_last_seen: Mapping[tuple[str, str], float] = field(default_factory=dict)
    usage_content: frozenset[str] = frozenset()  # every content item with usage


class WindowCounts(Mapping[tuple[str, str], int]):
    """(content, window) -> a count above 0, held as one tuple of counts per content (in the
    order of `windows`): a 2-tuple key per content and window would cost ~2 MB a snapshot on
    a server of 10,000 items."""

    __slots__ = ("_at", "_counts", "_windows")

    def __init__(self, windows: Sequence[str], counts: dict[str, tuple[int, ...]]) -> None:
        self._windows = tuple(windows)
        self._at = {w: i for i, w in enumerate(self._windows)}
        self._counts = counts

    def __getitem__(self, key: tuple[str, str]) -> int:
        if type(key) is not tuple or len(key) != 2:
            raise KeyError(key)
        row = self._counts.get(key[0])
        at = self._at.get(key[1])
        if row is None or at is None or not row[at]:
            raise KeyError(key)
        return row[at]

    def __iter__(self) -> Iterator[tuple[str, str]]:
        windows = self._windows
        for content, row in self._counts.items():
            for window, count in zip(windows, row, strict=True):
                if count:
                    yield content, window

    def __len__(self) -> int:
        return sum(1 for _ in self)


def last_seen(pair_last: PairLastSeen, view: ViewerView) -> PairTimes:
    """(content, user) -> latest activity in seconds, for each viewer in some window's top N."""
    found = ((c, u, pair_last.get(c, u)) for c, u in top_pairs(view))
    return PairTimes((c, u, when / US) for c, u, when in found if when is not None)


class UsageModel:
    """Counters, histograms, de-dup keys and last-seen maps, with exactly-once rules."""

    def __init__(self, rules: Rules, state: ModelState | None = None) -> None:
        self.rules = rules
        state = state or ModelState()
        self.counting_since = state.counting_since
        self.takeover = state.takeover
        self.server = state.server
        self.baseline = state.baseline
        self.complete_walks: set[str] = set()  # streams walked to the end since it was built
        self.hwm = state.marks
        self.counters = state.counters
        self.duration_counts = {c: counts for c, (counts, _sum) in state.durations.items()}
        self.duration_sums = {c: total for c, (_counts, total) in state.durations.items()}
        # Each item's histogram as last shown, until it changes: snapshots share them.
        self._histograms: dict[str, HistogramValue] = {}
        self.keys: dict[str, dict[Key, KeyValue]] = {
            space: state.keys.get(space, {}) for space in SPACES
        }
        self.sessions: dict[SessionKey, KeyValue] = self.keys[SESSIONS_SPACE]  # type: ignore[assignment]
        self.visits: dict[VisitKey, KeyValue] = self.keys[VISITS_SPACE]
        self._legacy = self.keys[LEGACY_SPACE]
        self._legacy_until = max((t for _n, t in self._legacy.values()), default=-1)
        intern = share
        people = UserIndex()
        self.user_last = UserLastSeen(people, ((intern(u), t) for u, t in state.user_last))
        self.pair_last = PairLastSeen(
            ((intern(c), intern(u), t) for c, u, t in state.pair_last), people
        )
        self.content_last = state.content_last
        self.viewers = (
            ViewerLog({w: WINDOW_SECONDS[w] for w in VIEWER_WINDOWS}, state.viewer_events, people)
            if rules.top_viewers > 0 or rules.top_users > 0
            else None
        )
        self._delta = Delta()
        # Visits newer than every key when their walk began, applied since the last delta: their
        # keys are made when a later walk could meet them (`_key_fresh`), not one by one.
        self._fresh: list[Visit] = []

    def empty_like(self) -> UsageModel:
        """A model with the same rules and no data."""
        return UsageModel(self.rules)

    # -- deltas -----------------------------------------------------------------------------

    def has_changes(self) -> bool:
        """Whether anything changed since the last `take_delta()`."""
        return not self._delta.is_empty()

    def take_delta(self) -> Delta:
        """Everything changed since the last call; keys no walk can return are dropped.

        A key below its space's bound (the walk start of the mark this delta commits) is one no
        later walk can return: a long walk meets most of its keys after the mark has passed
        them, so they go from memory now and the delta says where the bound lies.
        """
        self._key_fresh(self._key_bound(SPACES[VISITS_SPACE]))
        delta, self._delta = self._delta, Delta()
        for space, keys in self.keys.items():
            bound = self._key_bound(SPACES[space])
            if bound < 0:
                continue
            delta.horizons[space] = bound
            pinned = space == SESSIONS_SPACE
            stale = [k for k, (v, t) in keys.items() if t < bound and not (pinned and v != CLOSED)]
            for key in stale:
                del keys[key]
        if not self._legacy:
            self._legacy_until = -1  # every schema-2 digest has been met or aged out
        return delta

    def _note_key(self, space: str, key: Key, value: KeyValue | None) -> None:
        pinned = space == SESSIONS_SPACE and value is not None and value[0] != CLOSED
        noted = None if value is None else (value[0], value[1], pinned)
        self._delta.keys.setdefault(space, {})[key] = noted

    def _key_fresh(self, bound: int) -> None:
        """Key the fresh visits from `bound` on (a walk can meet them again); forget the others.

        Each fresh visit is new, and an identical one (same time, same fields) a twin: its key
        counts how often the walks listed it. In a catch-up most fresh visits fall below the
        bound by the next delta, so they never cost a key.
        """
        fresh, self._fresh = self._fresh, []
        keys = self.visits
        noted = None
        for visit in fresh:
            when = visit.time
            if when < bound:
                continue
            if noted is None:
                noted = self._delta.keys.setdefault(VISITS_SPACE, {})
            key = visit[:-1]
            stored = keys.get(key)
            count = 1 if stored is None else stored[0] + 1
            keys[key] = (count, when)
            noted[key] = (count, when, False)

    def walk_tally(self, stream: str) -> WalkTally:
        """The tally a new walk of `stream` starts with; keys the fresh visits it can meet (a
        change to the model, made where the others are)."""
        self._key_fresh(self._key_bound(SPACES[VISITS_SPACE]))
        newest = max((t for _n, t in self.visits.values()), default=-1)
        fresh_after = max(newest, self._legacy_until, (self.counting_since or 0) - 1)
        return WalkTally(start_us=self.walk_start(stream), fresh_after=fresh_after)

    def _key_bound(self, stream: str) -> int:
        """Keys below this serve no walk to come (-1 before the stream has a mark)."""
        return -1 if stream not in self.hwm else self.walk_start(stream)

    def _add(self, name: str, label: str, amount: int = 1) -> None:
        key = (name, label)
        value = self.counters[key] = self.counters.get(key, 0) + amount
        self._delta.counters[key] = value

    # -- epoch and high-water marks ---------------------------------------------------------

    def start_counting(self, now_us: int, streams: Iterable[str], *, server: str = "") -> None:
        """First start: count from the rules' history before now (the origin). The first walk
        reads from the origin or from the largest window before now, whichever is earlier."""
        delta = self._delta
        history_us = self.rules.history_us
        self.counting_since = delta.counting_since = now_us - history_us
        self.takeover = delta.takeover = now_us
        self.server = delta.server = server
        first = min(now_us - history_us, now_us - MAX_WINDOW_US)
        for stream in streams:
            self.set_hwm(stream, first + self.rules.overlap_us)

    @property
    def counters_shown(self) -> bool:
        """Whether the counters are whole: after a first start's first complete walks."""
        return self.baseline is not None

    def take_baseline(self) -> None:
        """The counters are whole from now on: remember them as they are shown first."""
        self.baseline = self._delta.baseline = Baseline(
            counters=dict(self.counters),
            durations={
                c: (list(n), self.duration_sums[c]) for c, n in self.duration_counts.items()
            },
        )

    def add_streams(self, streams: Iterable[str]) -> None:
        """Streams the state's first start did not read (an upgrade added them): their first
        walk reads from the origin, as every stream's first walk did."""
        if self.counting_since is None:
            return
        for stream in streams:
            if stream not in self.hwm:
                self.set_hwm(stream, self.counting_since + self.rules.overlap_us)

    def walk_start(self, stream: str) -> int:
        """Where the next walk of `stream` begins: the overlap re-reads late writes."""
        return max(0, self.hwm[stream] - self.rules.overlap_us)

    def set_hwm(self, stream: str, value_us: int) -> None:
        if value_us > self.hwm.get(stream, -1):
            self.hwm[stream] = self._delta.marks[stream] = value_us

    def prune_windows(self, now_us: int) -> None:
        """Forget last-seen entries older than the largest window; the gauges never read them.

        Users with an open Shiny session stay: they are active now, whatever their last time.
        """
        cutoff = now_us - MAX_WINDOW_US - HOUR_US
        open_users = {k[1] for k, (state, _t) in self.sessions.items() if state == OPEN}
        delta = self._delta
        for user in self.user_last.forget_before(cutoff, open_users):
            delta.user_last[user] = None
        for pair in self.pair_last.forget_before(cutoff, open_users):
            delta.pair_last[pair] = None
        if self.viewers is not None:
            self.viewers.prune(cutoff)
            delta.viewer_horizon = cutoff

    # -- activity ---------------------------------------------------------------------------

    def _seen(self, events: Sequence[tuple[str, str | None, int, bool]]) -> None:
        """Sessions and visits as (content, user, µs, new event?) on the last-seen maps."""
        content_last, user_last, pair_last = self.content_last, self.user_last, self.pair_last
        delta = self._delta
        changed_content, changed_users = delta.content_last, delta.user_last
        for content, _user, when, _new in events:
            if content_last.get(content, -1) < when:
                content_last[content] = changed_content[content] = when
        for _content, user, when, _new in user_last.seen_all(events):
            changed_users[user] = when
        changed_pairs = delta.pair_last
        for content, user, when, _new in pair_last.seen_all(events):
            changed_pairs[content, user] = when

    def _viewed(self, events: list[ViewerEvent]) -> None:
        """Events of known users, each once (see exporter.viewers)."""
        if events and self.viewers is not None:
            add = self.viewers.add
            for content, user, when, value in events:
                add(content, user, when, value)
            self._delta.viewer_events.extend(events)

    def pair_count(self) -> int:
        """Tracked (content, user) pairs: what the windowed per-content gauges cost in memory."""
        return len(self.pair_last)

    def is_synthetic(self, user_agent: str | None) -> bool:
        prefixes = self.rules.exclude_user_agents
        return bool(user_agent and prefixes and user_agent.startswith(prefixes))

    # -- Shiny sessions ---------------------------------------------------------------------

    def _observe(self, content: str, started: int, ended: int) -> None:
        micros = ended - started
        counts = self.duration_counts.get(content)
        if counts is None:
            counts = self.duration_counts[content] = [0] * (len(DURATION_BUCKETS) + 1)
            self.duration_sums[content] = 0
        counts[_bucket_index(micros / US)] += 1
        total = self.duration_sums[content] = self.duration_sums[content] + micros
        self._histograms.pop(content, None)
        self._delta.durations[content] = (tuple(counts), total)

    def _set_session(self, key: SessionKey, value: KeyValue | None) -> None:
        if value is None:
            self.sessions.pop(key, None)
        else:
            self.sessions[key] = value
        self._note_key(SESSIONS_SPACE, key, value)

    def apply_shiny(self, sessions: Iterable[ShinySession], walk: WalkTally, now_us: int) -> None:
        """Apply a page of sessions: counted when first seen, duration observed when ended."""
        t0 = self.counting_since
        assert t0 is not None, "start_counting() or a loaded state before applying records"
        from_us = walk.start_us
        max_age = self.rules.max_session_age_us
        viewers = self.viewers is not None
        viewed: list[ViewerEvent] = []
        added: dict[str, int] = {}  # one counter update per item and page, not per session
        seen: list[tuple[str, str | None, int, bool]] = []
        for session in sessions:
            walk.records += 1
            ended = session.ended
            if ended is not None and ended < from_us:
                continue  # the query's `from` is whole seconds; this one lies before the walk
            content, user = session.content_guid, session.user_guid
            key = (content, user or "", session.started)
            known = self.sessions.get(key)
            if known is None:
                new = session.started >= t0
                if new:
                    added[content] = added.get(content, 0) + 1
                    if user and viewers:
                        viewed.append((content, user, session.started, STARTED))
                if ended is None:
                    if session.started < now_us - max_age:
                        self._set_session(key, (ABANDONED, session.started))
                        self._add(ABANDONED_SESSIONS, content)
                    else:
                        self._set_session(key, (OPEN, session.started))
                    # Seen without an end in this walk: `finish_shiny_walk` keeps the key, so
                    # the next walk, which lists it again, does not count it again.
                    walk.open_seen.add(key)
                    seen.append((content, user, session.started, new))
                else:
                    if ended >= t0:
                        self._observe(content, session.started, ended)
                        if user and viewers:
                            viewed.append((content, user, ended, ended - session.started))
                    if new or ended >= t0:
                        self._set_session(key, (CLOSED, ended))
                    seen.append((content, user, ended, new))
                continue
            state = known[0]
            if ended is None:
                if state != CLOSED:
                    walk.open_seen.add(key)
            elif state != CLOSED:
                # Abandoned sessions keep no duration; the key now ages out like any closed one.
                if state == OPEN:
                    self._observe(content, session.started, ended)
                    if user and viewers:
                        viewed.append((content, user, ended, ended - session.started))
                self._set_session(key, (CLOSED, ended))
                seen.append((content, user, ended, False))
        self._seen(seen)
        self._viewed(viewed)
        for content, count in added.items():
            self._add(SESSIONS, content, count)
            walk.new_events += count

    def finish_shiny_walk(self, walk: WalkTally, now_us: int) -> int:
        """After a complete walk: open sessions past the age limit, or gone, close as abandoned.

        An abandoned session's key stays whether this walk listed it or not. Connect lists a
        running session on every call, however old, so one missing from a walk (a proxy that
        lost a page, a key that briefly saw less) may be listed again, running, at any later
        walk: without its key it would be counted a second time. The key goes once Connect lists
        the session ended, aging out like any closed one. Until then it costs what a stuck
        session that Connect keeps listing costs: one pinned key.
        """
        closed = 0
        limit = now_us - self.rules.max_session_age_us
        for key, (state, started) in list(self.sessions.items()):
            if state == OPEN and (started < limit or key not in walk.open_seen):
                self.abandon(key)
                closed += 1
        return closed

    def abandon(self, key: SessionKey) -> None:
        """Give up on an open session: counted as abandoned; no duration when it ends."""
        self._set_session(key, (ABANDONED, key[2]))
        self._add(ABANDONED_SESSIONS, key[0])

    def open_sessions(self) -> Iterator[SessionKey]:
        return (k for k, (state, _t) in self.sessions.items() if state == OPEN)

    # -- visits -----------------------------------------------------------------------------

    def apply_visits(self, visits: Sequence[Visit], walk: WalkTally, now_us: int = 0) -> None:
        """Apply one page of visits; identical visits count as often as Connect lists them."""
        t0 = self.counting_since
        assert t0 is not None, "start_counting() or a loaded state before applying records"
        from_us, fresh_after = walk.start_us, walk.fresh_after
        keys = self.visits
        tally = walk.visit_counts
        remember = walk.visit_order.append
        fresh = self._fresh.append
        noted = self._delta.keys.setdefault(VISITS_SPACE, {})
        prefixes = self.rules.exclude_user_agents
        viewers = self.viewers is not None
        viewed: list[ViewerEvent] = []
        added: dict[str, int] = {}
        seen: list[tuple[str, str | None, int, bool]] = []
        append = seen.append
        for visit in visits:
            when = visit.time
            if when < from_us:
                continue
            new = False
            if when > fresh_after:
                # Newer than every key there was when the walk began: no re-read, so each one
                # is new; keyed later (`_key_fresh`).
                fresh(visit)
                new = True
            elif when >= t0:
                key = visit[:-1]
                count = tally.get(key, 0) + 1
                if count == 1:
                    remember((when, key))
                tally[key] = count
                stored = keys.get(key)
                if stored is None and when <= self._legacy_until:
                    stored = self._legacy_seen(visit, key)
                if stored is None or count > stored[0]:
                    keys[key] = (count, when)
                    noted[key] = (count, when, False)
                    new = True
            agent = visit.user_agent
            content = visit.content_guid
            if agent and prefixes and agent.startswith(prefixes):
                if new:
                    self._add(EXCLUDED, "visits/synthetic")
                    walk.excluded += 1
                continue
            if new:
                added[content] = added.get(content, 0) + 1
                user = visit.user_guid
                if user and viewers:
                    viewed.append((content, user, when, VISITED))
            append((content, visit.user_guid, when, new))
        self._seen(seen)
        self._viewed(viewed)
        walk.records += len(visits)
        for content, count in added.items():  # one counter update per item, not per visit
            self._add(VISITS, content, count)
            walk.new_events += count

    def apply_hits(self, hits: Sequence[Hit], walk: WalkTally, now_us: int = 0) -> None:
        """Apply one page of hits, each counted once by its id. Hits repeat what the visits
        and sessions say (a Shiny session is a hit at its start), so they feed only their own
        counter: no last-seen time, no viewer, no active user."""
        t0 = self.counting_since
        assert t0 is not None, "start_counting() or a loaded state before applying records"
        keys = self.keys[HITS_SPACE]
        noted = self._delta.keys.setdefault(HITS_SPACE, {})
        prefixes = self.rules.exclude_user_agents
        added: dict[str, int] = {}
        for hit in hits:
            when = hit.timestamp
            if when < walk.start_us or when < t0:
                continue
            key = (hit.id,)
            if key in keys:
                continue
            keys[key] = (1, when)
            noted[key] = (1, when, False)
            agent = hit.user_agent
            if agent and prefixes and agent.startswith(prefixes):
                self._add(EXCLUDED, "hits/synthetic")
                walk.excluded += 1
                continue
            added[hit.content_guid] = added.get(hit.content_guid, 0) + 1
        walk.records += len(hits)
        for content, count in added.items():
            self._add(HITS, content, count)
            walk.new_events += count

    def _legacy_seen(self, visit: Visit, key: VisitKey) -> KeyValue | None:
        """A visit a schema-2 state file keyed by digest: its count, now under its own key."""
        digest = legacy_digest(visit)
        stored = self._legacy.pop((digest,), None)
        if stored is not None:
            self._note_key(LEGACY_SPACE, (digest,), None)
            self.visits[key] = stored
            self._note_key(VISITS_SPACE, key, stored)
        return stored

    def count_malformed(
        self,
        stream: str,
        raws: Iterable[bytes],
        anchor_us: int,
        walk: WalkTally,
        *,
        key_time_us: int | None = None,
        scope: int = 0,
    ) -> None:
        """Malformed records are counted once each, keyed by their raw bytes like visits.

        Their own time is unreadable, so `anchor_us` (the last good record before them) says
        whether they fall before the counting epoch, and the key is kept until `key_time_us`
        (the walk's now, which no record that existed then can be after) leaves the overlap.
        """
        keep_until = anchor_us if key_time_us is None else max(anchor_us, key_time_us)
        t0 = self.counting_since
        assert t0 is not None
        if anchor_us < t0:
            return
        space = f"{stream}:malformed"
        keys = self.keys[space]
        for raw in raws:
            digest = malformed_digest(stream, raw)
            seen = walk.malformed_counts.get((scope, digest), 0) + 1
            walk.malformed_counts[(scope, digest)] = seen
            stored = keys.get((digest,)) or self._legacy.get((digest,))
            if stored is None or seen > stored[0]:
                value = (seen, max(keep_until, stored[1] if stored else 0))
                keys[(digest,)] = value
                self._note_key(space, (digest,), value)
                self._add(EXCLUDED, f"{stream}/malformed")
                walk.malformed += 1

    # -- the view ---------------------------------------------------------------------------

    def view(self, now_s: float) -> UsageView:
        """Evaluate every gauge at one `now` (seconds), JupyterHub-style."""
        now_us = int(now_s * US)
        open_users: set[str] = set()
        open_pairs: set[PairKey] = set()
        active: dict[str, int] = {}
        for content, user, _started in self.open_sessions():
            active[content] = active.get(content, 0) + 1
            if user:
                open_users.add(user)
                open_pairs.add((content, user))
        user_last = self.user_last
        open_lasts = [t for u in open_users if (t := user_last.get(u)) is not None]
        thresholds = [now_us - WINDOW_SECONDS[window] * US for window in USER_WINDOWS]
        active_users = {}
        for window, threshold, recent in zip(
            USER_WINDOWS, thresholds, user_last.count_since(thresholds), strict=True
        ):
            # open sessions: their users are active now
            active_users[window] = recent + sum(1 for last in open_lasts if last < threshold)
        content_thresholds = [(w, now_us - WINDOW_SECONDS[w] * US) for w in CONTENT_WINDOWS]
        open_by_content: dict[str, list[str]] = {}
        for content, user in open_pairs:
            open_by_content.setdefault(content, []).append(user)
        content_active: dict[str, tuple[int, ...]] = {}
        # One sort per content and a bisection per window, not a loop per pair and window.
        pair_last = self.pair_last
        for content, times in pair_last.times():
            lasts = sorted(times)
            total = len(lasts)
            running = open_by_content.get(content, ())
            counts = []
            for _window, threshold in content_thresholds:
                count = total - bisect_left(lasts, threshold)
                for user in running:  # an open session makes its user active now
                    seen = pair_last.get(content, user)
                    if seen is not None and seen < threshold:
                        count += 1
                counts.append(count)
            if any(counts):
                content_active[content] = tuple(counts)
        last_activity = {c: t / US for c, t in self.content_last.items()}
        for content in active:
            last_activity[content] = now_s
        totals: dict[str, dict[str, int]] = {
            SESSIONS: {},
            VISITS: {},
            HITS: {},
            ABANDONED_SESSIONS: {},
        }
        excluded: dict[tuple[str, str], int] = {}
        for (name, label), value in self.counters.items():
            if name == EXCLUDED:
                stream, _, reason = label.partition("/")
                excluded[(stream, reason)] = value
            else:
                totals[name][label] = value
        histograms = self._histograms
        durations = {}
        for c, counts in self.duration_counts.items():
            shown = histograms.get(c)
            if shown is None:
                shown = histograms[c] = HistogramValue(tuple(counts), self.duration_sums[c] / US)
            durations[c] = shown
        viewers = (
            ViewerView()
            if self.viewers is None
            else self.viewers.view(now_us, self.rules.top_viewers, self.rules.top_users)
        )
        usage_content = frozenset(
            {
                *self.content_last,
                *totals[SESSIONS],
                *totals[VISITS],
                *totals[HITS],
                *durations,
                *active,
            }
        )
        return UsageView(
            shiny_sessions_total=totals[SESSIONS],
            shiny_session_duration=durations,
            shiny_sessions_active=active,
            shiny_sessions_abandoned_total=totals[ABANDONED_SESSIONS],
            content_visits_total=totals[VISITS],
            content_hits_total=totals[HITS],
            active_users=active_users,
            content_active_users=WindowCounts(CONTENT_WINDOWS, content_active),
            content_last_activity=last_activity,
            excluded_events_total=excluded,
            viewers=viewers,
            viewer_last_seen=last_seen(pair_last, viewers),
            usage_content=usage_content,
        )
