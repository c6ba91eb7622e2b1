"""Who used what: each content item's events by known users over the largest window, and the
figures of its top viewers and of the server's top users per window.

An event is (time µs, user, value): a Shiny session's start (`STARTED`), its end (the value is
the whole session's duration in µs) or a visit (`VISITED`). The model adds each event once,
under the same exactly-once rules as the counters, and forgets those older than the largest
window. Figures per window: sessions started in it, the summed duration of sessions that ended
in it, visits in it; a viewer belongs to a window when its sessions plus visits there are above
zero. Ranked by sessions + visits, ties by user guid.
"""

from __future__ import annotations

import heapq
from array import array
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

STARTED = -1  # a session started (the value of its event)
VISITED = -2  # a visit; any value >= 0 is a session's end and its duration in µs
US = 1_000_000

# (sessions started, µs of sessions ended, visits) in one window
Figures = tuple[int, int, int]
ViewerEvent = tuple[str, str, int, int]  # (content_guid, user_guid, time µs, value)


@dataclass(slots=True)
class _Item:
    """One content item's events (in arrival order) and its figures as last evaluated."""

    times: array[int] = field(default_factory=lambda: array("q"))
    users: array[int] = field(default_factory=lambda: array("l"))
    values: array[int] = field(default_factory=lambda: array("q"))
    changed: bool = True
    # Per window: user index -> figures, as evaluated at `evaluated` (µs); valid until a
    # change, until `expires` (when an event leaves a window), or if asked for an earlier now.
    figures: dict[str, dict[int, Figures]] = field(default_factory=dict)
    evaluated: int = -1
    expires: int = -1


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
        self.windows = dict(windows)  # window -> seconds
        self._largest_us = max(self.windows.values(), default=0) * US
        self._index: dict[str, int] = {}
        self._guids: list[str] = []
        self.items: dict[str, _Item] = {}
        # Per window: user index -> [sessions, visits] summed over every item's figures.
        self._totals: dict[str, dict[int, list[int]]] = {w: {} for w in self.windows}
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
            item = self.items[content] = _Item()
        item.times.append(when)
        item.users.append(self._user(user))
        item.values.append(value)
        item.changed = True

    def prune(self, before_us: int) -> None:
        """Forget the events before `before_us` (older than every window)."""
        for content, item in list(self.items.items()):
            times = item.times
            if not times or min(times) >= before_us:
                continue
            keep = [i for i, t in enumerate(times) if t >= before_us]
            item.times = array("q", (times[i] for i in keep))
            item.users = array("l", (item.users[i] for i in keep))
            item.values = array("q", (item.values[i] for i in keep))
            item.changed = True
            if not keep:
                self._retally(item, {})
                del self.items[content]

    def events(self) -> Iterator[ViewerEvent]:
        guids = self._guids
        for content, item in self.items.items():
            for when, user, value in zip(item.times, item.users, item.values, strict=True):
                yield content, guids[user], when, value

    # -- figures ----------------------------------------------------------------------------

    def _evaluate(self, item: _Item, now_us: int) -> None:
        """The item's figures per window at `now_us`, and until when they hold."""
        thresholds = [(w, now_us - s * US) for w, s in self.windows.items()]
        figures: dict[str, dict[int, list[int]]] = {w: {} for w in self.windows}
        expires = 2**63
        for when, user, value in zip(item.times, item.users, item.values, strict=True):
            for window, threshold in thresholds:
                if when < threshold:
                    continue
                expires = min(expires, when + self.windows[window] * US)
                row = figures[window].get(user)
                if row is None:
                    row = figures[window][user] = [0, 0, 0]
                if value == STARTED:
                    row[0] += 1
                elif value == VISITED:
                    row[2] += 1
                else:
                    row[1] += value
        self._retally(
            item,
            {
                w: {u: (r[0], r[1], r[2]) for u, r in f.items() if r[0] + r[2] > 0}
                for w, f in figures.items()
            },
        )
        item.changed = False
        item.evaluated = now_us
        item.expires = expires

    def _retally(self, item: _Item, figures: dict[str, dict[int, Figures]]) -> None:
        """Swap the item's figures, moving the server-wide totals with them."""
        for window, old in item.figures.items():
            totals = self._totals[window]
            for user, (sessions, _seconds, visits) in old.items():
                row = totals[user]
                row[0] -= sessions
                row[1] -= visits
                if row[0] == 0 and row[1] == 0:
                    del totals[user]
        for window, new in figures.items():
            totals = self._totals[window]
            for user, (sessions, _seconds, visits) in new.items():
                total = totals.get(user)
                if total is None:
                    totals[user] = [sessions, visits]
                else:
                    total[0] += sessions
                    total[1] += visits
        item.figures = figures

    def view(self, now_us: int, top_viewers: int, top_users: int) -> ViewerView:
        """Each item's top `top_viewers` per window and the server's top `top_users`."""
        for item in self.items.values():
            if item.changed or not item.evaluated <= now_us < item.expires:
                self._evaluate(item, now_us)
        guids = self._guids

        def rank(rows: Iterable[tuple[int, int]], n: int) -> list[tuple[int, int]]:
            """(-weight, user index) pairs: the n heaviest, ties by user guid."""
            return heapq.nsmallest(n, rows, key=lambda r: (r[0], guids[r[1]]))

        viewers: dict[tuple[str, str, str], Figures] = {}
        dropped = dict.fromkeys(self.windows, 0)
        if top_viewers > 0:
            for content, item in self.items.items():
                for window, figures in item.figures.items():
                    members = [(-(f[0] + f[2]), u) for u, f in figures.items()]
                    dropped[window] += max(0, len(members) - top_viewers)
                    for _weight, user in rank(members, top_viewers):
                        viewers[content, guids[user], window] = figures[user]
        users: dict[tuple[str, str], tuple[int, int]] = {}
        users_dropped = dict.fromkeys(self.windows, 0)
        if top_users > 0:
            for window, totals in self._totals.items():
                rows = [(-(t[0] + t[1]), u) for u, t in totals.items()]
                for _weight, user in rank(rows, top_users):
                    sessions, visits = totals[user]
                    users[guids[user], window] = (sessions, visits)
                users_dropped[window] = max(0, len(rows) - top_users)
        return ViewerView(viewers, dropped, users, users_dropped)


def top_pairs(view: ViewerView) -> set[tuple[str, str]]:
    """(content, user) of every viewer in some window's top N."""
    return {(content, user) for content, user, _window in view.viewers}
