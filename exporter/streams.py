"""The event streams the exporter reads, one object each: the poller never asks which is which.

A stream says how to fetch a time range of records from Connect, what its records are sorted
(and sliced) by, whether a range's first slice must reach back before it, how the model applies
a page of them, what a complete walk ends with, and whether the server has it at all.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from operator import attrgetter
from typing import Any, Generic, TypeVar

from exporter.client import ConnectClient, Page
from exporter.model import UsageModel, WalkTally

log = logging.getLogger("exporter.streams")

R = TypeVar("R")


@dataclass(frozen=True)
class Stream(Generic[R]):
    """One of Connect's instrumentation streams."""

    name: str
    # Pages of records whose sort time lies in [start, end) µs (end None: up to now), at least.
    fetch: Callable[[ConnectClient, int | None, int | None], AsyncIterator[Page[R]]]
    sort_key: Callable[[R], int]
    # The query's `from` selects on another time than the sort key, so the records of a walk's
    # first slice include some that sort before it (and belong to it).
    reaches_back: bool
    apply: Callable[[UsageModel, Sequence[R], WalkTally, int], None]  # (..., walk's now µs)
    finish: Callable[[UsageModel, WalkTally, int], None] = lambda _m, _w, _now: None
    # Why this server cannot serve the stream (None: it can); None here: every server can.
    unsupported: Callable[[ConnectClient], Awaitable[str | None]] | None = None


def _finish_shiny(model: UsageModel, walk: WalkTally, now_us: int) -> None:
    closed = model.finish_shiny_walk(walk, now_us)
    if closed:
        log.info("closed %d Shiny sessions as abandoned", closed)


SHINY: Stream[Any] = Stream(
    name="shiny",
    fetch=lambda client, start, end: client.shiny_usage_pages(start=start, end=end),
    sort_key=attrgetter("started"),
    reaches_back=True,  # `from` drops sessions that *ended* before it
    apply=lambda model, records, walk, now_us: model.apply_shiny(records, walk, now_us),
    finish=_finish_shiny,
)

VISITS: Stream[Any] = Stream(
    name="visits",
    fetch=lambda client, start, end: client.visit_pages(start=start, end=end),
    sort_key=attrgetter("time"),
    reaches_back=False,
    apply=lambda model, records, walk, now_us: model.apply_visits(records, walk, now_us),
)

HITS: Stream[Any] = Stream(
    name="hits",
    fetch=lambda client, start, end: client.hit_pages(start=start or 0, end=end),
    sort_key=attrgetter("timestamp"),
    reaches_back=False,
    apply=lambda model, records, walk, now_us: model.apply_hits(records, walk, now_us),
    unsupported=lambda client: client.hits_unsupported(),  # Connect before 2025.04.0
)

STREAMS: tuple[Stream[Any], ...] = (SHINY, VISITS, HITS)
