"""Each content item's users and the latest time each was seen there, held compactly.

The model keeps a (content, user) pair for every user an item has seen over the largest window
plus an hour: half a million pairs on a 100,000-user server. A dict per item keyed by guid with
an int per value costs ~90 B a pair and leaves the allocator fragmented as the dicts grow; here
each item has two arrays, its users' indexes in ascending order and their times (12 B a pair),
and a user's guid is kept once for every item (in a `UserIndex` the viewer log shares).
"""

from __future__ import annotations

from array import array
from bisect import bisect_left, bisect_right
from collections import deque
from collections.abc import ItemsView, Iterable, Iterator, Mapping, Sequence
from typing import Any

# (content, user or None, µs, ...): what the model saw; any fields after the third are carried.
Sighting = tuple[Any, ...]
_DISCARDED: deque[Sighting] = deque(maxlen=0)  # a sink for sightings nobody collects


class GuidRows:
    """Rows of guids and integers as a store reads them, held as columns: the guids as their
    integer ids (resolved through `names` as the rows are iterated), 4 or 8 B a cell instead of
    a tuple and an int object a row. Iterating yields the rows as tuples, guids first."""

    __slots__ = ("_columns", "_guids", "_names")

    def __init__(self, names: Mapping[int, str], typecodes: str, guids: int) -> None:
        self._names = names
        self._columns = [array(code) for code in typecodes]
        self._guids = guids  # how many leading columns are guid ids

    def extend(self, rows: Iterable[tuple[int, ...]]) -> None:
        """Add rows of (guid ids..., integers...), as many cells as typecodes."""
        batch: list[tuple[int, ...]] = []
        for row in rows:
            batch.append(row)
            if len(batch) == 10_000:
                self._add(batch)
                batch = []
        self._add(batch)

    def _add(self, batch: list[tuple[int, ...]]) -> None:
        if batch:
            # Each column made whole before any is extended: a bad cell leaves none longer.
            made = [
                array(column.typecode, cells)
                for column, cells in zip(self._columns, zip(*batch, strict=True), strict=True)
            ]
            for column, cells in zip(self._columns, made, strict=True):
                column.extend(cells)

    def __iter__(self) -> Iterator[tuple[Any, ...]]:
        names, n = self._names, self._guids
        for row in zip(*self._columns, strict=True):
            yield tuple(names[i] for i in row[:n]) + row[n:]

    def __len__(self) -> int:
        return len(self._columns[0])


class UserIndex:
    """Each user guid's index, in the order first met; only ever added to. One for the model's
    last-seen pairs and its viewer log, so a guid and its index are kept once."""

    __slots__ = ("guids", "ids")

    def __init__(self) -> None:
        self.ids: dict[str, int] = {}
        self.guids: list[str] = []

    def of(self, guid: str) -> int:
        """`guid`'s index, a new one if it has none yet."""
        index = self.ids.get(guid)
        if index is None:
            index = self.ids[guid] = len(self.guids)
            self.guids.append(guid)
        return index

    def __len__(self) -> int:
        return len(self.guids)


_ABSENT = -(2**63)  # a user's slot in `UserLastSeen` while it has no time
_ABSENT_SLOT = array("q", [_ABSENT]).tobytes()


class UserLastSeen:
    """user guid -> latest µs, one 8-byte slot a user of the shared index (~90 B less a user
    than a dict keyed by guid)."""

    def __init__(self, users: UserIndex, last: Iterable[tuple[str, int]] = ()) -> None:
        self.users = users
        self._times = array("q")
        self._count = 0
        self.seen_all(((None, user, when) for user, when in last), collect=False)

    def seen(self, user: str, when: int) -> bool:
        """Note `user` at `when`; whether that is its latest time now."""
        return bool(self.seen_all([(None, user, when)]))

    def seen_all(self, sightings: Iterable[Sighting], *, collect: bool = True) -> list[Sighting]:
        """`seen` of the user and µs of each (content, user, µs, ...) whose user is not None;
        those that are now their user's latest (none kept unless `collect`)."""
        ids, times, of = self.users.ids, self._times, self.users.of
        latest: list[Sighting] = []
        note = latest.append if collect else _DISCARDED.append
        for sighting in sightings:
            user, when = sighting[1], sighting[2]
            if user is None:
                continue
            index = ids.get(user)
            if index is None:
                index = of(user)
            if index >= len(times):
                times.frombytes(_ABSENT_SLOT * (index + 1 - len(times)))
            last = times[index]
            if last < when:
                if last == _ABSENT:
                    self._count += 1
                times[index] = when
                note(sighting)
        return latest

    def get(self, user: str) -> int | None:
        index = self.users.ids.get(user)
        if index is None or index >= len(self._times):
            return None
        last = self._times[index]
        return None if last == _ABSENT else last

    def values(self) -> list[int]:
        """Every user's latest time."""
        return [t for t in self._times if t != _ABSENT]

    def count_since(self, thresholds: Sequence[int]) -> list[int]:
        """How many users have a time at or after each threshold, in one pass and without a list
        of the times (100,000 users: ~4 MB of ints and lists a view would hold at once)."""
        ascending = sorted(thresholds)
        # below[k]: the users with exactly k thresholds at or below their time (none: absent)
        below = [0] * (len(ascending) + 1)
        for when in self._times:
            below[bisect_right(ascending, when)] += 1
        at_or_after = {th: sum(below[i + 1 :]) for i, th in enumerate(ascending)}
        return [at_or_after[th] for th in thresholds]

    def forget_before(self, cutoff: int, keep: Iterable[str] = ()) -> list[str]:
        """Drop the users last seen before `cutoff`, except those in `keep`; the users dropped."""
        ids, guids, times = self.users.ids, self.users.guids, self._times
        kept = {ids[u] for u in keep if u in ids}
        dropped = [i for i, t in enumerate(times) if t != _ABSENT and t < cutoff and i not in kept]
        for i in dropped:
            times[i] = _ABSENT
        self._count -= len(dropped)
        return [guids[i] for i in dropped]

    def as_dict(self) -> dict[str, int]:
        guids = self.users.guids
        return {guids[i]: t for i, t in enumerate(self._times) if t != _ABSENT}

    def __len__(self) -> int:
        return self._count


class _Users:
    """One item's users (indexes, ascending) and the latest time of each, in µs."""

    __slots__ = ("times", "users")

    def __init__(self) -> None:
        self.users = array("i")
        self.times = array("q")


class PairLastSeen:
    """content guid -> user guid -> latest µs, for the model's windowed per-item gauges."""

    def __init__(
        self, pairs: Iterable[tuple[str, str, int]] = (), users: UserIndex | None = None
    ) -> None:
        self.users = UserIndex() if users is None else users
        self._items: dict[str, _Users] = {}
        self.seen_all(pairs, collect=False)

    def seen(self, content: str, user: str, when: int) -> bool:
        """Note `user` on `content` at `when`; whether that is its latest time now."""
        return bool(self.seen_all([(content, user, when)]))

    def seen_all(self, sightings: Iterable[Sighting], *, collect: bool = True) -> list[Sighting]:
        """`seen` of each (content, user, µs, ...) whose user is not None; those that are now
        their pair's latest (none kept unless `collect`)."""
        items, index, guids, find = self._items, self.users.ids, self.users.guids, bisect_left
        latest: list[Sighting] = []
        note = latest.append if collect else _DISCARDED.append
        for sighting in sightings:
            content, user, when = sighting[0], sighting[1], sighting[2]
            if user is None:
                continue
            item = items.get(content)
            if item is None:
                item = items[content] = _Users()
            i = index.get(user)
            if i is None:
                i = index[user] = len(guids)
                guids.append(user)
            users = item.users
            if not users or users[-1] < i:  # a user new to the item, after all of its users
                users.append(i)
                item.times.append(when)
                note(sighting)
                continue
            at = find(users, i)
            if users[at] == i:
                times = item.times
                if times[at] < when:
                    times[at] = when
                    note(sighting)
            else:
                users.insert(at, i)
                item.times.insert(at, when)
                note(sighting)
        return latest

    def get(self, content: str, user: str) -> int | None:
        """The latest time of `user` on `content`, or None."""
        item = self._items.get(content)
        index = self.users.ids.get(user)
        if item is None or index is None:
            return None
        at = bisect_left(item.users, index)
        if at < len(item.users) and item.users[at] == index:
            return item.times[at]
        return None

    def times(self) -> Iterator[tuple[str, array[int]]]:
        """Each item and its users' latest times (in the order of the users' indexes)."""
        for content, item in self._items.items():
            yield content, item.times

    def users_of(self, content: str) -> dict[str, int]:
        """`content`'s users and their latest times."""
        item = self._items.get(content)
        if item is None:
            return {}
        guids = self.users.guids
        return {guids[u]: t for u, t in zip(item.users, item.times, strict=True)}

    def forget_before(self, cutoff: int, keep: Iterable[str] = ()) -> list[tuple[str, str]]:
        """Drop the pairs last seen before `cutoff`, except those of the users in `keep`;
        the (content, user) pairs dropped."""
        ids, guids = self.users.ids, self.users.guids
        kept = {ids[u] for u in keep if u in ids}
        dropped: list[tuple[str, str]] = []
        for content, item in list(self._items.items()):
            users, times = item.users, item.times
            if min(times) >= cutoff:
                continue
            stay = [i for i, t in enumerate(times) if t >= cutoff or users[i] in kept]
            dropped.extend(
                (content, guids[users[i]])
                for i, t in enumerate(times)
                if t < cutoff and users[i] not in kept
            )
            if not stay:
                del self._items[content]
                continue
            item.users = array("i", [users[i] for i in stay])
            item.times = array("q", [times[i] for i in stay])
        return dropped

    def as_dict(self) -> dict[str, dict[str, int]]:
        """Every pair, as content -> user -> µs."""
        return {content: self.users_of(content) for content in self._items}

    def __len__(self) -> int:
        """How many pairs."""
        return sum(len(item.users) for item in self._items.values())

    def __bool__(self) -> bool:
        return bool(self._items)


class PairTimes(Mapping[tuple[str, str], float]):
    """(content, user) -> seconds for a view, as two lists of guids and an array of floats:
    ~24 B a pair, where a dict of tuples to floats costs ~150 B (a view has tens of thousands,
    and two views live while one replaces the other)."""

    def __init__(self, rows: Iterable[tuple[str, str, float]] = ()) -> None:
        self._contents: list[str] = []
        self._users: list[str] = []
        self._seconds = array("d")
        for content, user, seconds in rows:
            self._contents.append(content)
            self._users.append(user)
            self._seconds.append(seconds)
        self._index: dict[tuple[str, str], float] | None = None  # made on the first lookup

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return zip(self._contents, self._users, strict=True)

    def __len__(self) -> int:
        return len(self._seconds)

    def rows(self) -> Iterator[tuple[tuple[str, str], float]]:
        """Each pair and its seconds."""
        return zip(self, self._seconds, strict=True)

    def __getitem__(self, pair: tuple[str, str]) -> float:
        if self._index is None:
            self._index = dict(self.rows())
        return self._index[pair]

    def items(self) -> ItemsView[tuple[str, str], float]:
        return _PairItems(self)


class _PairItems(ItemsView[tuple[str, str], float]):
    """`PairTimes.items()`: each pair with its seconds, no lookup per pair."""

    def __init__(self, pairs: PairTimes) -> None:
        super().__init__(pairs)
        self._pairs = pairs

    def __iter__(self) -> Iterator[tuple[tuple[str, str], float]]:
        return self._pairs.rows()
