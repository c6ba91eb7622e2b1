"""Who used what: each content item's events by known users over the largest window, and the
figures of its top viewers and of the server's top users per window.

An event is (time µs, user, value): a Shiny session's start (`STARTED`), its end (the value is
the whole session's duration in µs) or a visit (`VISITED`). The model adds each event once,
under the same exactly-once rules as the counters, and forgets those older than the largest
window. Figures per window: sessions started in it, the summed duration of sessions that ended
in it, visits in it; a viewer belongs to a window when its sessions plus visits there are above
zero. Ranked by sessions + visits, ties by user guid.

Only the events are kept (in time order per item, ~12 B each and 16 B more for a session's
end: its user and kind in one 32-bit code, the ends' durations and times in arrays of their
own, in the same order), not figures per (item, user): an
item's top viewers are counted again from its events when it has changed (an event added, or
one that has left a window), and kept until it changes again. The server-wide totals per user
are kept running in arrays indexed by user: an event is added as it comes and taken out when a
view finds it has left the window (each item keeps the index of the first event inside each
window).
"""

from __future__ import annotations

import heapq
from array import array
from bisect import bisect_left, bisect_right
from collections.abc import ItemsView, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import islice
from typing import TypeAlias

from exporter.lastseen import UserIndex

STARTED = -1  # a session started (the value of its event)
VISITED = -2  # a visit; any value >= 0 is a session's end and its duration in µs
US = 1_000_000
# An event's code: its user's index shifted left, its kind in the low bits.
_KIND_BITS = 2
_KIND = (1 << _KIND_BITS) - 1
_STARTED, _VISITED, _ENDED = 0, 1, 2
_MAX_USERS = 1 << (31 - _KIND_BITS)  # user indexes a code can hold (an `i` array's 31 bits)
# An item's figures while they are counted, packed in one int: sessions, visits (24 bits each),
# then µs above them.
_BITS = 24
_MASK = (1 << _BITS) - 1
_VISIT = 1 << _BITS
_MICROS = 2 * _BITS
_COUNTS = (1 << _MICROS) - 1  # the sessions and visits of packed figures
# A user's server-wide totals in one 64-bit slot: sessions above, visits below.
_TOTAL_BITS = 32
_TOTAL_MASK = (1 << _TOTAL_BITS) - 1


def _unpacked(figures: int) -> tuple[int, int, int]:
    return figures & _MASK, figures >> _MICROS, (figures >> _BITS) & _MASK


def _total(value: int) -> int:
    """An event's share of a user's totals (a session's end has none)."""
    return 1 << _TOTAL_BITS if value == STARTED else 1 if value == VISITED else 0


# By kind: an event's share of a user's totals, and its packed figures (a start, a visit).
_KIND_TOTAL = (1 << _TOTAL_BITS, 1, 0, 0)
_KIND_PACKED = (1, _VISIT, 0, 0)
_KIND_VALUE = (STARTED, VISITED)  # an event's value from its kind, a session's end excepted


def _kind(value: int) -> int:
    return _STARTED if value == STARTED else _VISITED if value == VISITED else _ENDED


def _ends_before(item: _Item, at: int) -> int:
    """How many session ends come before event `at`: events before a window's start or a
    prune's cut are all older than those after it, so the ends' times tell."""
    times = item.times
    return len(item.end_times) if at >= len(times) else bisect_left(item.end_times, times[at])


# (sessions started, µs of sessions ended, visits) in one window
Figures = tuple[int, int, int]
ViewerEvent = tuple[str, str, int, int]  # (content_guid, user_guid, time µs, value)
ViewerKey = tuple[str, str, str]  # (content_guid, user_guid, window)
# An item's top N in every window, in one array (the same object from one view to the next
# while the item does not change): per window its row count and how many the cap left out, then
# each window's rows in rank order, a row being user index, sessions, µs and visits.
Top: TypeAlias = "array[int]"
_ROW = 4  # numbers a row of a `Top`


def _windows_of(top: Top, windows: int) -> Iterator[tuple[int, int, int]]:
    """Each window's rows in `top` as (first number, end, how many the cap left out)."""
    at = 2 * windows
    for w in range(windows):
        end = at + top[2 * w] * _ROW
        yield at, end, top[2 * w + 1]
        at = end


@dataclass(slots=True)
class _Item:
    """One content item's events in time order, and its top viewers as last counted."""

    times: array[int] = field(default_factory=lambda: array("q"))
    codes: array[int] = field(default_factory=lambda: array("i"))  # user << 2 | kind
    # The session ends among them, in the same order: their durations and their times (the
    # times find a new end's place, and how many ends come before an event, by bisection).
    ends: array[int] = field(default_factory=lambda: array("q"))
    end_times: array[int] = field(default_factory=lambda: array("q"))
    # Per window (in the log's order): the index of its first event in the totals.
    starts: list[int] = field(default_factory=list)
    # Its top viewers per window as last counted; None: count again.
    top: Top | None = None


class TopViewers(Mapping[ViewerKey, Figures]):
    """Every item's top viewers per window, as the log counted them for one view: the items'
    rows are shared with the log (an item counted again gets new ones), read as a mapping."""

    def __init__(
        self, windows: Sequence[str], guids: Sequence[str], tops: list[tuple[str, Top]]
    ) -> None:
        self._windows = windows
        self._guids = guids  # the log's user index: only ever appended to
        self._tops = tops
        self._index: dict[ViewerKey, Figures] | None = None

    def items(self) -> ItemsView[ViewerKey, Figures]:
        return _TopItems(self)

    def rows(self) -> Iterator[tuple[ViewerKey, Figures]]:
        """Each row, made as it is read."""
        guids, windows = self._guids, self._windows
        for content, top in self._tops:
            spans = _windows_of(top, len(windows))
            for window, (at, end, _left_out) in zip(windows, spans, strict=True):
                for i in range(at, end, _ROW):
                    user, sessions, micros, visits = top[i : i + _ROW]
                    yield (content, guids[user], window), (sessions, micros, visits)

    def __iter__(self) -> Iterator[ViewerKey]:
        return (key for key, _figures in self.rows())

    def pairs(self) -> Iterator[tuple[str, str]]:
        """Each item and user in some window's top N, once."""
        guids, windows = self._guids, len(self._windows)
        for content, top in self._tops:
            for user in {top[i] for i in range(2 * windows, len(top), _ROW)}:
                yield content, guids[user]

    def __len__(self) -> int:
        header = 2 * len(self._windows)
        return sum(len(top) - header for _content, top in self._tops) // _ROW

    def __getitem__(self, key: ViewerKey) -> Figures:
        if self._index is None:
            self._index = dict(self.rows())
        return self._index[key]


class _TopItems(ItemsView[ViewerKey, Figures]):
    """`TopViewers.items()`: its rows, not a lookup per key."""

    def __init__(self, view: TopViewers) -> None:
        super().__init__(view)
        self._view = view

    def __iter__(self) -> Iterator[tuple[ViewerKey, Figures]]:
        return self._view.rows()


@dataclass(frozen=True, slots=True)
class ViewerView:
    """The top viewers of each item and the top users of the server, per window."""

    # (content_guid, user_guid, window) -> figures, for each item's top N
    viewers: Mapping[ViewerKey, Figures] = field(default_factory=dict)
    viewers_dropped: Mapping[str, int] = field(default_factory=dict)  # window -> left out now
    # (user_guid, window) -> (sessions, visits), for the server's top N users
    users: Mapping[tuple[str, str], tuple[int, int]] = field(default_factory=dict)
    users_dropped: Mapping[str, int] = field(default_factory=dict)  # window -> left out now


class ViewerLog:
    """Events of known users per content item over the largest window."""

    def __init__(
        self,
        windows: Mapping[str, int],
        events: Iterable[ViewerEvent] = (),
        users: UserIndex | None = None,
    ) -> None:
        self.windows = {w: s * US for w, s in windows.items()}  # window -> µs
        self._spans = list(self.windows.values())
        self._users = UserIndex() if users is None else users
        self.items: dict[str, _Item] = {}
        # Per window: user index -> packed sessions and visits over every item's events.
        self._totals: list[array[int]] = [array("q") for _ in self.windows]
        self._width = 0  # the totals' length: the users they hold
        self._now = -(2**63)  # the `now` of the last view
        self._thresholds = [self._now - span for span in self._spans]
        for content, user, when, value in events:
            self.add(content, user, when, value)

    def __len__(self) -> int:
        return sum(len(item.times) for item in self.items.values())

    def _user(self, guid: str) -> int:
        """`guid`'s index, the totals widened to hold it (for a user new here or where the
        index is shared)."""
        index = self._users.of(guid)
        if (missing := index + 1 - self._width) > 0:
            for totals in self._totals:
                totals.frombytes(bytes(8 * missing))
            self._width = index + 1
        return index

    def add(self, content: str, user: str, when: int, value: int) -> None:
        item = self.items.get(content)
        if item is None:
            item = self.items[content] = _Item(starts=[0] * len(self._spans))
        times = item.times
        at = len(times) if not times or times[-1] <= when else bisect_right(times, when)
        user_index = self._users.ids.get(user, self._width)
        if user_index >= self._width:
            user_index = self._user(user)
        if user_index >= _MAX_USERS:
            raise OverflowError(f"more than {_MAX_USERS:,} users")
        kind = _kind(value)
        if kind == _ENDED:  # after the ends of its time, as the event after the events of its time
            rank = bisect_right(item.end_times, when)
            item.ends.insert(rank, value)
            item.end_times.insert(rank, when)
        times.insert(at, when)
        item.codes.insert(at, user_index << _KIND_BITS | kind)
        item.top = None
        starts = item.starts
        share = _total(value)
        for w, threshold in enumerate(self._thresholds):
            start = starts[w]
            if at < start:  # before the window as last evaluated: outside it
                starts[w] = start + 1
            elif when >= threshold:
                self._totals[w][user_index] += share
            else:  # older than the window, yet no counted event is older: it starts after it
                starts[w] = at + 1

    def _advance(self, item: _Item, thresholds: list[int]) -> None:
        """Take out of each window's totals the events that have left it."""
        times, codes, starts = item.times, item.codes, item.starts
        for w, threshold in enumerate(thresholds):
            end = starts[w]
            if end < len(times) and times[end] < threshold:
                totals = self._totals[w]
                while end < len(times) and times[end] < threshold:
                    code = codes[end]
                    totals[code >> _KIND_BITS] -= _KIND_TOTAL[code & _KIND]
                    end += 1
                starts[w] = end
                item.top = None

    def _recount(self) -> None:
        """Every window's totals from scratch, all events counted (before a first view, or
        when time went back)."""
        self._width = len(self._users)
        self._totals = [array("q", bytes(8 * self._width)) for _ in self._spans]
        for item in self.items.values():
            item.starts = [0] * len(self._spans)
            item.top = None
            for code in item.codes:
                share = _KIND_TOTAL[code & _KIND]
                if share:
                    for totals in self._totals:
                        totals[code >> _KIND_BITS] += share

    def _rank(self, item: _Item, n: int) -> Top:
        """Each window's top `n` viewers of `item`, counted from its events in the window."""
        guids = self._users.guids
        header = array("q")
        rows = array("q")
        codes, ends = item.codes, item.ends
        for start in item.starts:
            figures: dict[int, int] = {}
            get = figures.get
            durations = iter(ends[_ends_before(item, start) :])
            for code in islice(codes, start, None):
                user, kind = code >> _KIND_BITS, code & _KIND
                packed = next(durations) << _MICROS if kind == _ENDED else _KIND_PACKED[kind]
                figures[user] = get(user, 0) + packed
            # The members stream through the ranking, which holds only the top `n`.
            members = sum(1 for f in figures.values() if f & _COUNTS)
            top = heapq.nsmallest(
                n, (u for u, f in figures.items() if f & _COUNTS), key=_ViewerRank(figures, guids)
            )
            header.extend((len(top), max(0, members - n)))
            for u in top:
                rows.append(u)
                rows.extend(_unpacked(figures[u]))
        header.extend(rows)
        return header

    def prune(self, before_us: int) -> None:
        """Forget the events before `before_us`, taken out of every window's totals first: they
        lie before every window from now on, whether or not a view has been made since."""
        self._thresholds = floor = [max(t, before_us) for t in self._thresholds]
        for content, item in list(self.items.items()):
            self._advance(item, floor)
            times = item.times
            cut = min(bisect_left(times, before_us), *item.starts)
            if cut == 0:
                continue
            ended = _ends_before(item, cut)
            del item.ends[:ended], item.end_times[:ended]
            del times[:cut], item.codes[:cut]
            item.starts = [max(0, s - cut) for s in item.starts]
            if not times:
                del self.items[content]

    def events(self) -> Iterator[ViewerEvent]:
        guids = self._users.guids
        for content, item in self.items.items():
            durations = iter(item.ends)
            for when, code in zip(item.times, item.codes, strict=True):
                kind = code & _KIND
                value = next(durations) if kind == _ENDED else _KIND_VALUE[kind]
                yield content, guids[code >> _KIND_BITS], when, value

    # -- the view ---------------------------------------------------------------------------

    def view(self, now_us: int, top_viewers: int, top_users: int) -> ViewerView:
        """Each item's top `top_viewers` per window and the server's top `top_users`."""
        thresholds = [now_us - span for span in self._spans]
        # Time went back, or a prune's floor stands above a window's new start (the events it
        # passed over may be inside again): count from scratch.
        held = self._thresholds
        if now_us < self._now or any(t < h for t, h in zip(thresholds, held, strict=True)):
            self._recount()
        self._now = now_us
        self._thresholds = thresholds
        guids = self._users.guids
        windows = list(self.windows)
        tops: list[tuple[str, Top]] = []
        dropped = dict.fromkeys(windows, 0)
        for content, item in self.items.items():
            self._advance(item, thresholds)
            if top_viewers <= 0:
                continue
            if item.top is None:
                item.top = self._rank(item, top_viewers)
            tops.append((content, item.top))
            for window, (_at, _end, left_out) in zip(
                windows, _windows_of(item.top, len(windows)), strict=True
            ):
                dropped[window] += left_out
        users: dict[tuple[str, str], tuple[int, int]] = {}
        users_dropped = dict.fromkeys(windows, 0)
        if top_users > 0:
            for window, totals in zip(windows, self._totals, strict=True):
                # The users with any stream through the ranking, which holds only the top N.
                ranked = heapq.nsmallest(
                    top_users, (u for u, t in enumerate(totals) if t), key=_UserRank(totals, guids)
                )
                for user in ranked:
                    total = totals[user]
                    users[guids[user], window] = (total >> _TOTAL_BITS, total & _TOTAL_MASK)
                users_dropped[window] = max(0, len(totals) - totals.count(0) - top_users)
        return ViewerView(TopViewers(windows, guids, tops), dropped, users, users_dropped)


class _ViewerRank:
    """A viewer's rank key among an item's packed figures: most sessions + visits, then guid."""

    __slots__ = ("_figures", "_guids")

    def __init__(self, figures: dict[int, int], guids: Sequence[str]) -> None:
        self._figures, self._guids = figures, guids

    def __call__(self, user: int) -> tuple[int, str]:
        f = self._figures[user]
        return -((f & _MASK) + (f >> _BITS & _MASK)), self._guids[user]


class _UserRank:
    """A user's rank key in one window's totals: most sessions + visits first, then guid."""

    __slots__ = ("_guids", "_totals")

    def __init__(self, totals: array[int], guids: Sequence[str]) -> None:
        self._totals, self._guids = totals, guids

    def __call__(self, user: int) -> tuple[int, str]:
        total = self._totals[user]
        return -((total >> _TOTAL_BITS) + (total & _TOTAL_MASK)), self._guids[user]


def top_pairs(view: ViewerView) -> Iterator[tuple[str, str]]:
    """(content, user) of every viewer in some window's top N, each once (from the log's view,
    made one item at a time)."""
    viewers = view.viewers
    if isinstance(viewers, TopViewers):
        return viewers.pairs()
    return iter({(content, user) for content, user, _window in viewers})
