"""Columnar, sorted event storage for the two usage streams.

Each stream is a set of parallel ``array('q')`` columns sorted by the key ``(t, seq)``: ``t`` is
the sort time in microseconds (Shiny: ``started``; visits: ``time``) and ``seq`` a unique,
ever-increasing insertion number that breaks ties. Cursors encode that key, so they stay valid
when records are inserted anywhere. Strings (guids, paths, user agents) are interned ints.
"""

from __future__ import annotations

import bisect
from array import array
from collections.abc import Iterable, Sequence

NO_END = 1 << 62  # "ended" of a session whose end was never recorded


class Stream:
    """Parallel sorted columns; subclasses name the extra columns."""

    extra: tuple[str, ...] = ()

    def __init__(self) -> None:
        self.t = array("q")
        self.seq = array("q")
        self.written = array("q")
        self.content = array("q")
        self.user = array("q")
        self.dver = array("q")
        self._cols: list[array[int]] = [
            self.t,
            self.seq,
            self.written,
            self.content,
            self.user,
            self.dver,
        ]
        for name in self.extra:
            col = array("q")
            setattr(self, name, col)
            self._cols.append(col)

    def __len__(self) -> int:
        return len(self.t)

    def insert(self, row: Sequence[int]) -> int:
        """Insert one row (values in column order, seq included); returns its position."""
        n = len(self.t)
        t = row[0]
        if n == 0 or t >= self.t[n - 1]:
            for col, v in zip(self._cols, row, strict=True):
                col.append(v)
            return n
        pos = bisect.bisect_right(self.t, t)
        for col, v in zip(self._cols, row, strict=True):
            col.insert(pos, v)
        return pos

    def extend(self, rows: Iterable[Sequence[int]]) -> None:
        for row in rows:
            self.insert(row)

    def position_after(self, t: int, seq: int) -> int:
        """First position whose key is greater than ``(t, seq)``."""
        i = bisect.bisect_left(self.t, t)
        n = len(self.t)
        while i < n and self.t[i] == t and self.seq[i] <= seq:
            i += 1
        return i

    def position_of(self, t: int, seq: int) -> int:
        """First position whose key is greater than or equal to ``(t, seq)``."""
        i = bisect.bisect_left(self.t, t)
        n = len(self.t)
        while i < n and self.t[i] == t and self.seq[i] < seq:
            i += 1
        return i


class ShinyStream(Stream):
    """Shiny sessions sorted by ``started``; ``ended`` is ``NO_END`` when never recorded."""

    extra = ("ended",)
    ended: array[int]

    def __init__(self) -> None:
        super().__init__()
        # Keys of sessions longer than the generator's cap (or without an end): the only ones
        # that a ``from`` filter cannot bound by ``started >= from - max_duration``.
        self.long_keys: list[tuple[int, int]] = []

    def exists(self, content: int, user: int, started: int) -> bool:
        i = bisect.bisect_left(self.t, started)
        n = len(self.t)
        while i < n and self.t[i] == started:
            if self.content[i] == content and self.user[i] == user:
                return True
            i += 1
        return False


class VisitStream(Stream):
    """Content visits sorted by ``time``."""

    extra = ("variant", "rendering", "bundle", "path", "ua", "synthetic")
    variant: array[int]
    rendering: array[int]
    bundle: array[int]
    path: array[int]
    ua: array[int]
    synthetic: array[int]
