"""Who used what: each content item's events by known users over the largest window, and the
figures of its top viewers and of the server's top users per window.

An event is (time µs, user, value): a Shiny session's start (`STARTED`), its end (the value is
the whole session's duration in µs) or a visit (`VISITED`). The model adds each event once,
under the same exactly-once rules as the counters, and forgets those older than the largest
window. Figures per window: sessions started in it, the summed duration of sessions that ended
in it, visits in it; a viewer belongs to a window when its sessions plus visits there are above
zero. Ranked by sessions + visits, ties by user guid.

The figures are kept running: an event is added to each window's figures as it comes, and
taken out when `view` finds it has left the window (each item's events are kept in time order,
with the index of the first one still inside each window), so a view costs what changed since
the last one, not the whole month.
"""

from __future__ import annotations

import heapq
from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

STARTED = -1  # a session started (the value of its event)
VISITED = -2  # a visit; any value >= 0 is a session's end and its duration in µs
US = 1_000_000
# Running figures are packed in one int: sessions, visits (24 bits each), then µs above them.
# One int a (user, window) instead of a list of three: a third of the memory on a big server.
_BITS = 24
_MASK = (1 << _BITS) - 1
_VISIT = 1 << _BITS
_MICROS = 2 * _BITS
_COUNTS = (1 << _MICROS) - 1  # the sessions and visits of packed figures


def _packed(value: int) -> int:
    """An event's figures, packed."""
    return 1 if value == STARTED else _VISIT if value == VISITED else value << _MICROS


def _unpacked(figures: int) -> tuple[int, int, int]:
    return figures & _MASK, figures >> _MICROS, (figures >> _BITS) & _MASK


# (sessions started, µs of sessions ended, visits) in one window
Figures = tuple[int, int, int]
ViewerEvent = tuple[str, str, int, int]  # (content_guid, user_guid, time µs, value)


@dataclass(slots=True)
class _Item:
    """One content item's events in time order, and its running figures per window."""

    times: array[int] = field(default_factory=lambda: array("q"))
    users: array[int] = field(default_factory=lambda: array("i"))
    values: array[int] = field(default_factory=lambda: array("q"))
    # Per window: the index of the first event counted, and user index -> packed figures of
    # the events from there on.
    starts: dict[str, int] = field(default_factory=dict)
    figures: dict[str, dict[int, int]] = field(default_factory=dict)
    # Per window: its top viewers as last ranked and how many it left out; None: rank again.
    top: dict[str, tuple[list[tuple[int, Figures]], int]] | None = None


@dataclass(frozen=True, slots=True)
class ViewerView:
    """The top viewers of each item and the top users of the server, per window."""

    # (content_guid, user_guid, window) -> figures, for each item's top N
    viewers: Mapping[tuple[str, str, str], Figures] = field(default_factory=dict)
    viewers_dropped: Mapping[str, int] = field(default_factory=dict)  # window -> left out now
    # (user_guid, window) -> (sessions, visits), for the server's top N users
    users: Mapping[tuple[str, str], tuple[int, int]] = field(default_factory=dict)
    users_dropped: Mapping[str, int] = field(default_factory=dict)  # window -> left out now


class ViewerLog:
    """Events of known users per content item over the largest window."""

    def __init__(self, windows: Mapping[str, int], events: Iterable[ViewerEvent] = ()) -> None:
        self.windows = {w: s * US for w, s in windows.items()}  # window -> µs
        self._index: dict[str, int] = {}
        self._guids: list[str] = []
        self.items: dict[str, _Item] = {}
        # Per window: user index -> packed sessions and visits over every item's figures.
        self._totals: dict[str, dict[int, int]] = {w: {} for w in self.windows}
        self._now = -(2**63)  # the `now` of the last view
        self._thresholds = [(w, self._now - span) for w, span in self.windows.items()]
        for content, user, when, value in events:
            self.add(content, user, when, value)

    def __len__(self) -> int:
        return sum(len(item.times) for item in self.items.values())

    def _user(self, guid: str) -> int:
        index = self._index.get(guid)
        if index is None:
            index = self._index[guid] = len(self._guids)
            self._guids.append(guid)
        return index

    def add(self, content: str, user: str, when: int, value: int) -> None:
        item = self.items.get(content)
        if item is None:
            item = self.items[content] = _Item(
                starts=dict.fromkeys(self.windows, 0), figures={w: {} for w in self.windows}
            )
        times = item.times
        at = len(times) if not times or times[-1] <= when else bisect_right(times, when)
        times.insert(at, when)
        user_index = self._user(user)
        item.users.insert(at, user_index)
        item.values.insert(at, value)
        item.top = None
        starts = item.starts
        packed = _packed(value)
        for window, threshold in self._thresholds:
            start = starts[window]
            if at < start:  # before the window as last evaluated: outside it
                starts[window] = start + 1
            elif when >= threshold:
                self._count(window, item, user_index, packed)
            else:  # older than the window, yet no counted event is older: it starts after it
                starts[window] = at + 1

    def _count(self, window: str, item: _Item, user: int, packed: int, sign: int = 1) -> None:
        """Add (sign 1) or take out (-1) one event's packed figures for `user`."""
        figures = item.figures[window]
        row = figures.get(user, 0) + sign * packed
        if row:
            figures[user] = row
        else:  # all zero (a zero-long session's end adds nothing and may find no row)
            figures.pop(user, None)
        counted = sign * (packed & _COUNTS)
        if counted:  # a session's start or a visit: the server-wide totals move too
            totals = self._totals[window]
            total = totals.get(user, 0) + counted
            if total:
                totals[user] = total
            else:
                del totals[user]

    def _advance(self, item: _Item, now_us: int) -> None:
        """Take out of each window the events that have left it by `now_us`."""
        times, users, values = item.times, item.users, item.values
        for window, start in item.starts.items():
            threshold = now_us - self.windows[window]
            end = start
            while end < len(times) and times[end] < threshold:
                self._count(window, item, users[end], _packed(values[end]), -1)
                end += 1
            if end != start:
                item.starts[window] = end
                item.top = None

    def _recount(self) -> None:
        """Every window's figures from scratch, all events counted (before a first view, or
        when time went back)."""
        self._totals = {w: {} for w in self.windows}
        for item in self.items.values():
            item.starts = dict.fromkeys(self.windows, 0)
            item.figures = {w: {} for w in self.windows}
            item.top = None
            for user, value in zip(item.users, item.values, strict=True):
                for window in self.windows:
                    self._count(window, item, user, _packed(value))

    def prune(self, before_us: int) -> None:
        """Forget the events before `before_us` that every window has let go (a view has
        taken them out of its figures; the others go at a later prune)."""
        for content, item in list(self.items.items()):
            times = item.times
            cut = min(bisect_left(times, before_us), *item.starts.values())
            if cut == 0:
                continue
            del times[:cut], item.users[:cut], item.values[:cut]
            item.starts = {w: max(0, s - cut) for w, s in item.starts.items()}
            item.top = None
            if not times:
                del self.items[content]

    def events(self) -> Iterator[ViewerEvent]:
        guids = self._guids
        for content, item in self.items.items():
            for when, user, value in zip(item.times, item.users, item.values, strict=True):
                yield content, guids[user], when, value

    # -- the view ---------------------------------------------------------------------------

    def view(self, now_us: int, top_viewers: int, top_users: int) -> ViewerView:
        """Each item's top `top_viewers` per window and the server's top `top_users`."""
        if now_us < self._now:
            self._recount()
        self._now = now_us
        self._thresholds = [(w, now_us - span) for w, span in self.windows.items()]
        guids = self._guids

        def rank(rows: Iterable[tuple[int, int]], n: int) -> list[tuple[int, int]]:
            """(-weight, user index) pairs: the n heaviest, ties by user guid."""
            return heapq.nsmallest(n, rows, key=lambda r: (r[0], guids[r[1]]))

        viewers: dict[tuple[str, str, str], Figures] = {}
        dropped = dict.fromkeys(self.windows, 0)
        for content, item in self.items.items():
            self._advance(item, now_us)
            if top_viewers <= 0:
                continue
            if item.top is None:
                item.top = {}
                for window, figures in item.figures.items():
                    members = [
                        (-((f & _MASK) + (f >> _BITS & _MASK)), u)
                        for u, f in figures.items()
                        if f & _COUNTS
                    ]
                    top = [(u, _unpacked(figures[u])) for _w, u in rank(members, top_viewers)]
                    item.top[window] = (top, max(0, len(members) - top_viewers))
            for window, (top, left_out) in item.top.items():
                dropped[window] += left_out
                for user, figures_of in top:
                    viewers[content, guids[user], window] = figures_of
        users: dict[tuple[str, str], tuple[int, int]] = {}
        users_dropped = dict.fromkeys(self.windows, 0)
        if top_users > 0:
            for window, totals in self._totals.items():
                rows = [(-((t & _MASK) + (t >> _BITS)), u) for u, t in totals.items()]
                for _weight, user in rank(rows, top_users):
                    sessions, _micros, visits = _unpacked(totals[user])
                    users[guids[user], window] = (sessions, visits)
                users_dropped[window] = max(0, len(rows) - top_users)
        return ViewerView(viewers, dropped, users, users_dropped)


def top_pairs(view: ViewerView) -> set[tuple[str, str]]:
    """(content, user) of every viewer in some window's top N."""
    return {(content, user) for content, user, _window in view.viewers}
