"""The catch-up planner: how a long walk is cut into time slices read at once, applied in order.

Pure bookkeeping, no I/O: the poller's readers ask it for slices and report what they read, and
it decides where slices begin and end. Applying in order keeps the mark on the last applied
record, as in a sequential walk. Slices are cut from the front of the range on demand, at most
`ahead` beyond the one being applied, and sized by what earlier ones held (~`SLICE_RECORDS`
each); a reader whose first page shows its slice is far denser splits it, one that passes twice
the target is cut after the page in hand, and the slice the apply waits for is dealt out to idle
readers. The read-ahead adapts: from readers + 1 slices while the apply finds each slice read in
full (a fast Connect), up to `AHEAD_MAX_PER_READER` per reader while it waits (a slow one).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

R = TypeVar("R")

US = 1_000_000
SLICE_MIN_SPAN_US = 2 * 3600 * US  # shorter ranges are read in one sequential walk
SLICE_MIN_WIDTH_US = 60 * US
SLICE_RECORDS = 5000  # what a slice should hold (10 pages): the read-ahead stays small
PAGE_RECORDS = 500  # what a cursor page holds
SPLIT_MIN_RECORDS = 100  # a first page with fewer of the slice's own records says too little
AHEAD_MAX_PER_READER = 4
FIRST_SLICES = 256  # a catch-up's first slices are this fraction of it: the plan then learns


@dataclass(eq=False)
class Slice:
    """One time slice of a walk, [lo, hi) by sort time (hi None: open-ended)."""

    lo: int
    hi: int | None
    first: bool  # the walk's first slice: records that sort before it but reach into it count
    reading: bool = False
    read_done: bool = False  # every page is read (or the error is set)
    error: BaseException | None = None
    records: int = 0  # records of its own read so far
    held: int = 0  # of those, read and not yet applied


class Plan:
    """The slices of one walk. Without `now_us` and `width_us`, one open-ended slice."""

    def __init__(
        self,
        start_us: int,
        now_us: int | None = None,
        width_us: int | None = None,
        *,
        ahead: int = 1,
        ahead_max: int | None = None,
    ) -> None:
        self.start = self.next_lo = start_us
        self.now_us = now_us  # None: the walk's now comes from its first page
        self.width = width_us  # None: no slicing
        self.ahead = ahead
        self.ahead_range = (ahead, ahead_max or ahead)  # `adapt` moves `ahead` within it
        self.order: list[Slice] = []
        self.applied = 0  # index in `order` of the slice being applied
        self.cut_all = False
        self.finished = False
        self.idle_readers = 0  # readers waiting for a slice to read

    @classmethod
    def for_walk(cls, start_us: int, now_us: int, readers: int) -> Plan:
        """A sliced plan for a catch-up from `start_us` to `now_us` with `readers` readers."""
        return cls(
            start_us,
            now_us,
            max(SLICE_MIN_WIDTH_US, (now_us - start_us) // FIRST_SLICES),
            ahead=readers + 1,
            ahead_max=AHEAD_MAX_PER_READER * readers,
        )

    def extend(self) -> None:
        """Cut slices from the front of the unread range until `ahead` wait to be applied."""
        while not self.cut_all and len(self.order) - self.applied <= self.ahead:
            lo = self.next_lo
            hi: int | None = None
            if self.width is not None and self.now_us is not None and lo + self.width < self.now_us:
                hi = lo + self.width
            self.order.append(Slice(lo, hi, first=lo == self.start))
            if hi is None:
                self.cut_all = True
            else:
                self.next_lo = hi

    def take(self) -> Slice | None:
        """The earliest slice nobody reads yet, within `ahead` of the one being applied."""
        for run in self.order[self.applied : self.applied + self.ahead + 1]:
            if not run.reading:
                run.reading = True
                return run
        return None

    def head(self) -> Slice | None:
        """The slice being applied, if any is left."""
        return self.order[self.applied] if self.applied < len(self.order) else None

    def split(self, run: Slice, records: int, first: int, last: int) -> bool:
        """Cut `run` short if its first page (`records` of its own from sort time `first`, the
        page ending at `last`) shows it is far denser than planned.

        Density is measured from the page's first record, not the slice's start: a slice that
        begins in a quiet stretch (nights, or the days before the counting epoch) and runs into
        a busy one must still be cut.
        """
        if self.width is None or records < SPLIT_MIN_RECORDS or last < first:
            return False
        end = run.hi if run.hi is not None else max(self.now_us or last, last + 1)
        span = last + 1 - first
        if (end - first) * records <= 2 * SLICE_RECORDS * span:
            return False
        new_hi = max(last + 1, first + span * SLICE_RECORDS // records)
        if new_hi >= end:
            return False
        self.width = max(SLICE_MIN_WIDTH_US, new_hi - first)
        self._end_at(run, new_hi)
        return True

    def cut(self, run: Slice, last: int) -> bool:
        """Cut `run` after `last` once it holds twice what a slice should (a busy stretch its
        first page did not foresee); the reader reads one more page for ties at `last`."""
        if self.width is None or run.records < 2 * SLICE_RECORDS:
            return False
        if run.hi is not None and last + 1 >= run.hi:
            return False
        self._end_at(run, last + 1)
        return True

    def _end_at(self, run: Slice, hi: int) -> Slice:
        """End `run` at `hi`; the rest of its range becomes the very next slice, returned."""
        rest = Slice(hi, run.hi, first=False)
        run.hi = hi
        self.order.insert(self.order.index(run, self.applied) + 1, rest)
        return rest

    def share_head(self, run: Slice, last: int) -> bool:
        """Cut the slice being applied after `last` and deal its unread rest out to idle readers.

        A slice is read page by page; when the apply waits on it while readers have nothing to
        read, its rest is split by time into one piece per idle reader (each at least two
        pages by the density read so far). Like `cut`, the reader reads one more page for ties.
        """
        if (
            self.width is None
            or self.idle_readers == 0
            or self.head() is not run
            or run.hi is None
            or last + 1 >= run.hi
            or last <= run.lo
        ):
            return False
        per_us = run.records / (last - run.lo)
        pieces = min(self.idle_readers + 1, int((run.hi - last) * per_us) // (2 * PAGE_RECORDS))
        if pieces < 2:
            return False
        lo, hi = last + 1, run.hi
        rest = self._end_at(run, lo)
        for i in range(1, pieces):
            rest = self._end_at(rest, lo + (hi - lo) * i // pieces)
        return True

    def adapt(self, head: Slice) -> None:
        """Read further ahead while the apply waits for the head slice, less when it does not."""
        low, high = self.ahead_range
        self.ahead = max(low, self.ahead - 1) if head.read_done else min(high, self.ahead * 2)

    def learn(self, run: Slice) -> None:
        """Resize the slices not yet cut by how full this one was."""
        if self.width is None or run.hi is None:
            return
        wanted = (run.hi - run.lo) * SLICE_RECORDS // max(run.records, 1)
        self.width = max(SLICE_MIN_WIDTH_US, min(2 * self.width, wanted))

    @staticmethod
    def owned(run: Slice, records: list[R], keys: Sequence[int], reaches_back: bool) -> list[R]:
        """The records of a page (with their sort keys) that belong to `run`. The first slice
        of a stream that `reaches_back` also owns the records that sort before it (Shiny's
        `from` filters on a session's end, not its start)."""
        lo, hi = run.lo, run.hi
        low_open = reaches_back and run.first
        if not keys or ((low_open or min(keys) >= lo) and (hi is None or max(keys) < hi)):
            return records
        return [
            r
            for r, k in zip(records, keys, strict=True)
            if (low_open or k >= lo) and (hi is None or k < hi)
        ]
