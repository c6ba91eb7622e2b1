"""The poller: one loop per stream and one for metadata, each on its own cadence.

A walk reads a stream from `hwm - overlap` to the end, in time slices read concurrently and
applied in order. Pages are applied to the model under one lock shared by all streams; the
applied pages are committed together with the high-water mark they reach in one transaction, at
least every `COMMIT_EVERY` seconds and at the end of the walk. Between two pages the model is
always a valid state to commit (the mark follows the last applied record), so a batch may hold
one page or many. During a long walk a batch is written in the background while the next pages
are applied; each batch waits for the one before, and a failed one sends the model back to the
file and stops the walks in flight. A snapshot is only built right after a commit that was
waited for, so it never shows what a crash could take back. Cancellation (SIGTERM) cannot split
a batch: apply, commit and publish run shielded, and a cancelled walk commits what it applied.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Any

import anyio
import anyio.abc

from exporter import __version__
from exporter.client import MAX_PAGE_LIMIT, ConnectClient, ConnectError, NotFoundError, Page
from exporter.model import US, Delta, UsageModel, WalkTally
from exporter.records import ContentItem, MalformedRecord, ShinySession, User, Visit
from exporter.snapshot import (
    DELETED_APP_MODE,
    DELETED_NAME,
    POLL_BUCKETS,
    POLL_STREAMS,
    STREAMS,
    USER_WINDOWS,
    ContentInfo,
    HistogramValue,
    Snapshot,
)
from exporter.state import StateStore

log = logging.getLogger("exporter.poller")

# Seconds between snapshots during a long walk. Each walks every last-seen pair (58 ms at 370k
# pairs) and blocks the event loop the readers' responses wait on; scrapes come 15-60 s apart.
PUBLISH_EVERY = 5.0
# Seconds of applied pages per transaction during a long walk. One transaction per page cost ~20%
# of a catch-up's CPU (and held the GIL against the event loop); a crash loses at most this much
# reading, never a count: the mark on disk only covers committed pages.
COMMIT_EVERY = 0.5
SLICE_MIN_SPAN_US = 2 * 3600 * US  # shorter ranges are read in one sequential walk
SLICE_MIN_WIDTH_US = 60 * US
SLICE_RECORDS = 5000  # what a slice should hold (10 pages): the read-ahead stays small
PAGE_RECORDS = MAX_PAGE_LIMIT  # what a cursor page holds
SPLIT_MIN_RECORDS = 100  # a first page with fewer of the slice's own records says too little
# Pages a reader may hold ahead of the apply before it waits: bounds the read-ahead of a walk
# that is not sliced, and of a slice whose first page could not tell it was too large.
SLICE_BUFFER_PAGES = 64
# Slices read ahead of the one being applied, per reader: from 1 (+1) while the apply finds each
# slice read in full (Connect answers fast, the apply is the bottleneck: more read-ahead only
# costs memory and cache), up to 4 while it waits for the head slice's pages (a slice is read
# page by page, so a slow Connect holds up the in-order apply unless many slices read at once).
AHEAD_MAX_PER_READER = 4


@dataclass(eq=False)
class _Run:
    """One time slice of a walk, [lo, hi) by sort time (hi None: open-ended), and its pages."""

    lo: int
    hi: int | None
    first: bool  # the walk's first slice: Shiny sessions that started before it count here
    send: Any = None  # MemoryObjectSendStream of (page, own records, last sort time)
    receive: Any = None
    reading: bool = False
    read_done: bool = False  # every page is in the buffer (or the error is set)
    error: BaseException | None = None
    records: int = 0

    def __post_init__(self) -> None:
        self.send, self.receive = anyio.create_memory_object_stream[Any](SLICE_BUFFER_PAGES)


class _Plan:
    """The slices of one walk: read concurrently, applied in order.

    Applying in order keeps the mark on the last applied record, as in a sequential walk, so the
    keys of everything further back than the overlap need never be written. Slices are cut from
    the front of the range on demand, at most `ahead` beyond the one being applied, and sized by
    what earlier ones held; a reader whose first page shows its slice is far larger than that
    splits it, and the rest becomes the next slice; one that passes twice that is cut after the
    page in hand. Read-ahead is so about `ahead` slices of ~`SLICE_RECORDS` records each.
    """

    def __init__(
        self,
        model: UsageModel,
        start_us: int,
        now_us: int | None = None,
        width_us: int | None = None,
        ahead: int = 1,
        *,
        ahead_max: int | None = None,
    ):
        self.model = model  # the model this walk applies to: a reload ends the walk
        self.start = self.next_lo = start_us
        self.now_us = now_us  # None: the walk is one open-ended slice, its now from page one
        self.width = width_us  # None: no slicing
        self.ahead = ahead
        self.order: list[_Run] = []
        self.applied = 0  # index in `order` of the slice being applied
        self.cut_all = False
        self.finished = False
        self.changed = anyio.Condition()
        self.ahead_range = (ahead, ahead_max or ahead)  # `adapt` moves `ahead` within it
        self.idle_readers = 0  # readers waiting for a slice to read

    def extend(self) -> None:
        """Cut slices from the front of the unread range until `ahead` wait to be applied."""
        while not self.cut_all and len(self.order) - self.applied <= self.ahead:
            lo = self.next_lo
            hi: int | None = None
            if self.width is not None and self.now_us is not None and lo + self.width < self.now_us:
                hi = lo + self.width
            self.order.append(_Run(lo, hi, first=lo == self.start))
            if hi is None:
                self.cut_all = True
            else:
                self.next_lo = hi

    def take(self) -> _Run | None:
        """The earliest slice nobody reads yet, within `ahead` of the one being applied."""
        for run in self.order[self.applied : self.applied + self.ahead + 1]:
            if not run.reading:
                run.reading = True
                return run
        return None

    def split(self, run: _Run, first_page: list[Any], first: int, last: int) -> bool:
        """Cut `run` short if its first page shows it is far denser than planned.

        Density is measured from the page's first record, not the slice's start: a slice that
        begins in a quiet stretch (nights, or the days before the counting epoch) and runs into
        a busy one must still be cut.
        """
        if self.width is None or len(first_page) < SPLIT_MIN_RECORDS or last < first:
            return False
        end = run.hi if run.hi is not None else max(self.now_us or last, last + 1)
        span = last + 1 - first
        if (end - first) * len(first_page) <= 2 * SLICE_RECORDS * span:
            return False
        new_hi = max(last + 1, first + span * SLICE_RECORDS // len(first_page))
        if new_hi >= end:
            return False
        self.width = max(SLICE_MIN_WIDTH_US, new_hi - first)
        self._end_at(run, new_hi)
        return True

    def cut(self, run: _Run, last: int) -> bool:
        """Cut `run` after `last` once it holds twice what a slice should (a busy stretch its
        first page did not foresee); the reader reads one more page for ties at `last`."""
        if self.width is None or run.records < 2 * SLICE_RECORDS:
            return False
        if run.hi is not None and last + 1 >= run.hi:
            return False
        self._end_at(run, last + 1)
        return True

    def _end_at(self, run: _Run, hi: int) -> _Run:
        """End `run` at `hi`; the rest of its range becomes the very next slice, returned."""
        rest = _Run(hi, run.hi, first=False)
        run.hi = hi
        self.order.insert(self.order.index(run, self.applied) + 1, rest)
        return rest

    def share_head(self, run: _Run, last: int) -> bool:
        """Cut the slice being applied after `last` and deal its unread rest out to idle readers.

        A slice is read page by page; when the apply waits on it while readers have nothing to
        read, its rest is split by time into one piece per idle reader (each at least two
        pages by the density read so far). Like `cut`, the reader reads one more page for ties.
        """
        if (
            self.width is None
            or self.idle_readers == 0
            or self.applied >= len(self.order)
            or self.order[self.applied] is not run
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

    def adapt(self, head: _Run) -> None:
        """Read further ahead while the apply waits for the head slice, less when it does not."""
        low, high = self.ahead_range
        self.ahead = max(low, self.ahead - 1) if head.read_done else min(high, self.ahead * 2)

    def learn(self, run: _Run) -> None:
        """Resize the slices not yet cut by how full this one was."""
        if self.width is None or run.hi is None:
            return
        wanted = (run.hi - run.lo) * SLICE_RECORDS // max(run.records, 1)
        self.width = max(SLICE_MIN_WIDTH_US, min(2 * self.width, wanted))


class WalkAbandonedError(Exception):
    """A failed commit reloaded the model from the state file while this walk was applying
    pages: the pages it applied went with the old model, so it must not go on (its mark would
    pass them). The next walk reads again from the committed mark."""


def _sort_key(stream: str) -> Callable[[Any], int]:
    """What a stream's pages are sorted and sliced by: a session's start, a visit's time."""
    return attrgetter("started" if stream == "shiny" else "time")


def _first_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The first real error of a slice task group, so callers see a ConnectError, not a group."""
    for error in group.exceptions:
        if isinstance(error, BaseExceptionGroup):
            return _first_error(error)
        if not isinstance(error, anyio.get_cancelled_exc_class()):
            return error
    return group


@dataclass
class Health:
    """The exporter's own health, process-local: it restarts with the process, as counters may."""

    api_requests: dict[tuple[str, str], int] = field(default_factory=dict)
    poll_counts: dict[str, list[int]] = field(default_factory=dict)
    poll_sums: dict[str, float] = field(default_factory=dict)
    poll_errors: dict[str, int] = field(default_factory=lambda: dict.fromkeys(POLL_STREAMS, 0))
    last_success: dict[str, float] = field(default_factory=dict)
    last_ok: dict[str, bool] = field(default_factory=dict)
    ingested: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STREAMS, 0))
    state_errors: int = 0

    def observe_request(self, endpoint: str, outcome: str, _seconds: float) -> None:
        key = (endpoint, outcome)
        self.api_requests[key] = self.api_requests.get(key, 0) + 1

    def record_poll(self, stream: str, seconds: float, ok: bool, at: float) -> None:
        counts = self.poll_counts.setdefault(stream, [0] * (len(POLL_BUCKETS) + 1))
        index = next((i for i, b in enumerate(POLL_BUCKETS) if seconds <= b), len(POLL_BUCKETS))
        counts[index] += 1
        self.poll_sums[stream] = self.poll_sums.get(stream, 0.0) + seconds
        self.last_ok[stream] = ok
        if ok:
            self.last_success[stream] = at
        else:
            self.poll_errors[stream] = self.poll_errors.get(stream, 0) + 1

    @property
    def up(self) -> bool:
        return all(self.last_ok.get(stream, False) for stream in POLL_STREAMS)


@dataclass
class Metadata:
    """What the slower refresh knows about content, users and permissions."""

    content: dict[str, ContentItem] | None = None
    usernames: dict[str, str] = field(default_factory=dict)
    users: dict[tuple[str, str], int] = field(default_factory=dict)
    permissions: dict[tuple[str, str, str], int] = field(default_factory=dict)
    server_version: str | None = None


def user_state(user: User) -> str:
    if user.locked:
        return "locked"
    return "active" if user.confirmed else "unconfirmed"


def _raw_identity(error: MalformedRecord) -> bytes:
    raw = getattr(error, "raw", None)
    if raw is None:
        return str(error).encode()
    return json.dumps(raw, sort_keys=True, default=str).encode()


class Poller:
    """Owns the model; everything that changes it goes through `_apply`."""

    def __init__(
        self,
        client: ConnectClient,
        model: UsageModel,
        store: StateStore,
        *,
        poll_interval: float,
        metadata_interval: float,
        permissions_enabled: bool = True,
        permissions_concurrency: int = 4,
        catchup_concurrency: int = 4,
        top_users: int = 0,
        health: Health | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.client = client
        self.model = model
        self.store = store
        self.poll_interval = poll_interval
        self.metadata_interval = metadata_interval
        self.permissions_enabled = permissions_enabled
        self.permissions_concurrency = permissions_concurrency
        self.catchup_concurrency = catchup_concurrency
        self.top_users = top_users
        self.health = health or Health()
        self.metadata = Metadata()
        self.clock = clock
        self._lock = anyio.Lock()
        self._offset = 0.0  # Connect's clock minus ours, when they differ by more than Date's 1 s
        self._snapshot = Snapshot()
        self._published_at = 0.0
        self._committed_at = 0.0
        # The write going on in the background during a long walk, and its failure if it failed.
        self._writing: anyio.Event | None = None
        self._write_error: Exception | None = None
        self._clock_known = False  # whether a Date from Connect has been seen since the start
        self._pending_ingested = dict.fromkeys(STREAMS, 0)  # applied, not yet committed
        self._loaded = False
        self._dropped_users: dict[str, set[str]] = {w: set() for w in USER_WINDOWS}

    # -- the served view ----------------------------------------------------------------------

    @property
    def snapshot(self) -> Snapshot:
        return self._snapshot

    def readiness(self) -> tuple[bool, str]:
        if not self._loaded:
            return False, "state not loaded yet"
        missing = [s for s in POLL_STREAMS if s not in self.health.last_success]
        if missing:
            return False, "waiting for the first successful poll of: " + ", ".join(missing)
        return True, "ready"

    def connect_now(self) -> float:
        """Connect's present time as best known: our clock corrected by the last Date seen."""
        return self.clock() + self._offset

    def _note_server_time(self, server_time: float | None) -> None:
        if server_time is None:
            return
        self._clock_known = True
        offset = server_time - self.clock()
        self._offset = offset if abs(offset) > 2.0 else 0.0

    def publish(self) -> None:
        """Build and swap the snapshot; call only when the model equals the committed state."""
        now = self.connect_now()
        view = self.model.view(now)
        meta = self.metadata
        info: dict[str, ContentInfo] = {}
        if meta.content is not None:
            for guid, item in meta.content.items():
                info[guid] = ContentInfo(
                    name=item.name,
                    title=item.title or "",
                    app_mode=item.app_mode,
                    access_type=item.access_type,
                    owner=item.owner_username or item.owner_guid or "",
                )
            deleted = ContentInfo(DELETED_NAME, DELETED_NAME, DELETED_APP_MODE, "", "")
            for guid in view.usage_content:
                info.setdefault(guid, deleted)
        user_events: dict[tuple[str, str, str], int] = {}
        if self.top_users:
            by_window: dict[str, list[tuple[int, str]]] = {w: [] for w in USER_WINDOWS}
            for (user, window), count in view.user_events.items():
                by_window[window].append((count, user))
            for window, rows in by_window.items():
                rows.sort(key=lambda row: (-row[0], row[1]))
                for count, user in rows[: self.top_users]:
                    user_events[(user, meta.usernames.get(user, ""), window)] = count
                self._dropped_users[window].update(user for _c, user in rows[self.top_users :])
        health = self.health
        model = self.model
        self._snapshot = Snapshot(
            taken_at=now,
            counting_since=model.counting_since / US if model.counting_since is not None else None,
            windows_evaluated_at=now,
            shiny_sessions_total=view.shiny_sessions_total,
            shiny_session_duration=view.shiny_session_duration,
            shiny_sessions_active=view.shiny_sessions_active,
            shiny_sessions_abandoned_total=view.shiny_sessions_abandoned_total,
            content_visits_total=view.content_visits_total,
            active_users=view.active_users,
            content_active_users=view.content_active_users,
            content_last_activity=view.content_last_activity,
            content_info=info,
            content_items=_count_items(meta.content),
            users=dict(meta.users),
            content_permissions=dict(meta.permissions),
            excluded_events_total=view.excluded_events_total,
            user_events=user_events,
            user_series_dropped_total={w: len(s) for w, s in self._dropped_users.items()},
            up=health.up,
            last_successful_poll=dict(health.last_success),
            poll_duration={
                s: HistogramValue(tuple(c), health.poll_sums[s])
                for s, c in health.poll_counts.items()
            },
            poll_errors_total=dict(health.poll_errors),
            api_requests_total=dict(health.api_requests),
            events_ingested_total=dict(health.ingested),
            high_water_mark={s: v / US for s, v in model.hwm.items()},
            state_errors_total=health.state_errors,
            server_version=meta.server_version,
            exporter_version=__version__,
        )
        self._published_at = time.monotonic()

    # -- start --------------------------------------------------------------------------------

    async def load(self) -> None:
        """Restore committed state, or on first start fix the counting epoch at Connect's now."""
        restored = await anyio.to_thread.run_sync(self.store.restore, self.model)
        if not restored:
            server_time = await self.client.server_time()
            self._note_server_time(server_time)
            now_s = math.floor(server_time if server_time is not None else self.clock())
            async with self._lock:
                self.model.start_counting(now_s * US, STREAMS)
                await self._commit()
            log.info(
                "new state file: counting from %s, windows back-filled from 30 days before",
                time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now_s)),
            )
        else:
            log.info("restored state: counters continue from the state file")
        self._loaded = True
        self.publish()

    async def _commit(self, behind: anyio.abc.TaskGroup | None = None) -> None:
        """Write the model's changes; on failure reload what is on disk so memory equals disk.

        Call with the lock held. Applied but uncommitted pages are thrown away on failure: the
        mark on disk does not cover them, so the next walk reads them again. With `behind` (a
        walk's task group) the write goes on in the background while the walk applies more
        pages; it is waited for (and its failure raised) by the next commit or `_settle`.
        """
        await self._settle()
        delta = self.model.take_delta()
        pending = self._pending_ingested
        self._pending_ingested = dict.fromkeys(STREAMS, 0)
        self._committed_at = time.monotonic()
        if behind is None:
            try:
                await self._write(delta, pending)
            except Exception:
                await self._reload()
                raise
            return
        done = anyio.Event()
        self._writing = done

        async def write() -> None:
            with anyio.CancelScope(shield=True):
                try:
                    await self._write(delta, pending)
                except Exception as exc:
                    self._write_error = exc
                finally:
                    done.set()

        behind.start_soon(write)

    async def _write(self, delta: Delta, pending: dict[str, int]) -> None:
        """The write itself; its failure is counted and logged here, the reload is the caller's."""
        try:
            await anyio.to_thread.run_sync(self.store.commit, delta)
        except Exception as exc:
            self.health.state_errors += 1
            log.error("cannot commit to the state file %s: %s", self.store.path, exc)
            raise
        for stream, count in pending.items():
            self.health.ingested[stream] += count

    async def _reload(self) -> None:
        fresh = self.model.empty_like()
        await anyio.to_thread.run_sync(self.store.restore, fresh)
        self.model = fresh

    async def _settle(self) -> None:
        """Wait for a write in the background; if it failed, reload the model and raise.

        Call with the lock held. Pages applied since that write began go with the old model:
        the walks applying them stop (`_model_of`) and read them again from the mark on disk.
        """
        writing = self._writing
        if writing is None:
            return
        with anyio.CancelScope(shield=True):
            await writing.wait()
        self._writing = None
        error, self._write_error = self._write_error, None
        if error is not None:
            with anyio.CancelScope(shield=True):
                await self._reload()
            raise error

    def _model_of(self, plan: _Plan) -> UsageModel:
        """The model a walk applies to, unless a failed commit has replaced it since."""
        if self.model is not plan.model:
            raise WalkAbandonedError(
                "the state was reloaded from the state file after a failed commit; "
                "the next poll reads again from the committed mark"
            )
        return plan.model

    async def _commit_pending(self) -> None:
        """Commit what is applied and not yet committed (lock held): before any snapshot."""
        await self._settle()
        if self.model.has_changes():
            await self._commit()

    # -- streams ------------------------------------------------------------------------------

    async def poll_stream(self, stream: str) -> WalkTally:
        """One complete walk of a stream from its high-water mark minus the overlap.

        A long range (catch-up after a first start or downtime) is cut into time slices read
        concurrently: on a Connect far away, round trips, not records, bound a sequential walk.
        The slices partition the records by their sort time and are applied in order, so each
        record is applied exactly once and the mark follows the last one applied.
        """
        walk_model = self.model
        walk = walk_model.walk_tally(stream)
        begin_us = int(self.connect_now()) * US
        plan = _Plan(walk_model, walk.start_us)
        workers = 1
        long_walk = begin_us - walk.start_us > SLICE_MIN_SPAN_US
        if self.catchup_concurrency > 1 and (long_walk or not self._clock_known):
            # Slicing needs Connect's present time up front; our clock is only an estimate
            # (unknown skew right after a start), so ask: one cheap request per catch-up, and
            # one at the first walk after a start, when a skewed clock could hide a catch-up.
            server_time = await self.client.server_time()
            self._note_server_time(server_time)
            if server_time is not None:
                begin_us = int(server_time) * US
            span = begin_us - walk.start_us
            if span > SLICE_MIN_SPAN_US:
                width = max(SLICE_MIN_WIDTH_US, span // 256)  # small first: the plan learns
                workers = self.catchup_concurrency
                plan = _Plan(
                    walk_model,
                    walk.start_us,
                    begin_us,
                    width,
                    ahead=workers + 1,
                    ahead_max=AHEAD_MAX_PER_READER * workers,
                )
        await self._walk(stream, walk, plan, workers)
        walk_now_us = plan.now_us if plan.now_us is not None else begin_us
        with anyio.CancelScope(shield=True):
            async with self._lock:
                model = self._model_of(plan)
                if stream == "shiny":
                    abandoned = model.finish_shiny_walk(walk, walk_now_us)
                    if abandoned:
                        log.info("closed %d Shiny sessions as abandoned", abandoned)
                model.set_hwm(stream, walk_now_us - US)
                model.prune(stream)
                model.prune_windows(walk_now_us)
                await self._commit()
        return walk  # poll_once publishes, once the poll's health is recorded too

    async def _walk(self, stream: str, walk: WalkTally, plan: _Plan, workers: int) -> None:
        """`workers` readers fill the slices; this task applies them in order.

        A slice's failure surfaces when the apply reaches it, so the slices before it still
        count and move the mark.
        """

        async def reader() -> None:
            while True:
                async with plan.changed:
                    run = plan.take()
                    while run is None and not plan.finished:
                        plan.idle_readers += 1
                        try:
                            await plan.changed.wait()
                        finally:
                            plan.idle_readers -= 1
                        run = plan.take()
                if run is None:
                    return
                async with run.send:
                    try:
                        await self._read_slice(stream, walk, plan, run)
                    except Exception as exc:  # surfaces in order, from the apply side
                        run.error = exc
                    run.read_done = True

        async def changed() -> None:
            async with plan.changed:
                plan.changed.notify_all()

        try:
            async with anyio.create_task_group() as group:
                for _ in range(workers):
                    group.start_soon(reader)
                try:
                    plan.extend()
                    await changed()
                    while plan.applied < len(plan.order):
                        run = plan.order[plan.applied]
                        plan.adapt(run)
                        plan.extend()
                        await changed()
                        await self._apply_slice(stream, walk, plan, run, group)
                        plan.learn(run)
                        plan.applied += 1
                        plan.extend()
                        await changed()
                except BaseException:
                    # A failure or cancellation (SIGTERM) between pages: what was applied is a
                    # valid state (the mark covers only what was applied), so keep it.
                    with anyio.CancelScope(shield=True):
                        async with self._lock:
                            await self._commit_pending()
                    raise
                finally:
                    plan.finished = True
                    with anyio.CancelScope(shield=True):
                        await changed()
        except BaseExceptionGroup as group_error:
            raise _first_error(group_error) from None

    async def _read_slice(self, stream: str, walk: WalkTally, plan: _Plan, run: _Run) -> None:
        """Fetch one slice's pages into its buffer, keeping only the records it owns."""
        lo, first = run.lo, run.first
        key = _sort_key(stream)
        reach_back = first and stream == "shiny"
        # Shiny's `from` filters on the END: the first slice must reach back to the walk start
        # for sessions that started earlier; later slices only hold sessions started in them.
        start = walk.start_us if first else lo
        pages: AsyncIterator[Page[ShinySession]] | AsyncIterator[Page[Visit]]
        if stream == "shiny":
            pages = self.client.shiny_usage_pages(start=start, end=run.hi)
        else:
            pages = self.client.visit_pages(start=start, end=run.hi)
        first_page = True
        async with aclosing(pages) as page_iter:  # type: ignore[type-var]
            async for page in page_iter:
                records: list[Any] = page.records
                hi = run.hi  # a split may have moved it
                if (first and hi is None) or not records:
                    mine = records
                else:
                    # The keys in C, and the common whole page by its extremes: a filter in
                    # Python cost ~0.3 µs per record of a catch-up.
                    keys = list(map(key, records))
                    if (reach_back or min(keys) >= lo) and (hi is None or max(keys) < hi):
                        mine = records
                    else:
                        mine = [
                            r
                            for r, k in zip(records, keys, strict=True)
                            if (reach_back or k >= lo) and (hi is None or k < hi)
                        ]
                last = key(records[-1]) if records else None
                if first_page and mine and last is not None:
                    split = plan.split(run, mine, max(key(mine[0]), lo), last)
                else:
                    split = False
                first_page = False
                run.records += len(mine)
                if not split and last is not None and plan.cut(run, last):
                    split = True
                if not split and last is not None and plan.share_head(run, last):
                    split = True
                if split:
                    async with plan.changed:
                        plan.changed.notify_all()
                await run.send.send((page, mine, last))
                if run.hi is not None and last is not None and last >= run.hi:
                    return  # split: the rest of this cursor belongs to the next slice

    async def _apply_slice(
        self,
        stream: str,
        walk: WalkTally,
        plan: _Plan,
        run: _Run,
        group: anyio.abc.TaskGroup,
    ) -> None:
        """Apply one slice's pages as they arrive, committing every `COMMIT_EVERY` seconds.

        Those commits write in the background (in `group`) while the next pages are applied;
        before a snapshot the model is committed in full and waited for.
        """
        anchor = run.lo
        async with run.receive:
            async for page, mine, last in run.receive:
                self._note_server_time(page.server_time)
                if plan.now_us is None:
                    # Connect's own clock decides what "already happened" means for the mark.
                    now = page.server_time if page.server_time is not None else self.connect_now()
                    plan.now_us = int(now) * US
                walk_now_us = plan.now_us
                with anyio.CancelScope(shield=True):
                    async with self._lock:
                        model = self._model_of(plan)
                        before = walk.new_events
                        if stream == "shiny":
                            model.apply_shiny(mine, walk, walk_now_us)
                        else:
                            model.apply_visits(mine, walk)
                        if last is not None:
                            anchor = max(anchor, last if run.hi is None else min(last, run.hi))
                        if page.malformed:
                            model.count_malformed(
                                stream,
                                [_raw_identity(m) for m in page.malformed],
                                anchor,
                                walk,
                                key_time_us=walk_now_us,
                                scope=id(run),
                            )
                            for error in page.malformed:
                                log.warning("skipped a malformed record: %s", error)
                        # Every record sorting before `anchor` is applied: the slices before
                        # this one are complete, and this one is read in sort order.
                        model.set_hwm(stream, min(anchor, walk_now_us))
                        self._pending_ingested[stream] += walk.new_events - before
                        if time.monotonic() - self._committed_at >= COMMIT_EVERY:
                            if time.monotonic() - self._published_at >= PUBLISH_EVERY:
                                await self._commit()
                                self.publish()
                            else:
                                await self._commit(behind=group)
                            # The commit dropped the keys no later walk can meet; so goes
                            # this walk's tally of them.
                            walk.forget_before(model.walk_start(stream))
        if run.error is not None:
            raise run.error

    # -- metadata -----------------------------------------------------------------------------

    async def refresh_metadata(self) -> None:
        """Content, users and permissions: labels and inventory, not events."""
        settings = await self.client.server_settings()
        content_page = await self.client.content()
        users_page = await self.client.users()
        for error in (*content_page.malformed, *users_page.malformed):
            log.warning("skipped a malformed metadata record: %s", error)
        content = {item.guid: item for item in content_page.records}
        users: dict[tuple[str, str], int] = {}
        for user in users_page.records:
            key = (user.role, user_state(user))
            users[key] = users.get(key, 0) + 1
        permissions: dict[tuple[str, str, str], int] = {}
        if self.permissions_enabled:
            limiter = anyio.CapacityLimiter(self.permissions_concurrency)

            async def read(guid: str) -> None:
                async with limiter:
                    try:
                        page = await self.client.permissions(guid)
                    except NotFoundError:
                        return  # deleted since the content list was read
                for perm in page.records:
                    key = (perm.content_guid, perm.principal_type, perm.role)
                    permissions[key] = permissions.get(key, 0) + 1

            async with anyio.create_task_group() as group:
                for guid in content:
                    group.start_soon(read, guid)
        async with self._lock:
            self.metadata = Metadata(
                content=content,
                usernames={u.guid: u.username for u in users_page.records},
                users=users,
                permissions=permissions,
                server_version=settings.version,
            )

    # -- loops --------------------------------------------------------------------------------

    def _task(self, stream: str) -> Callable[[], Awaitable[object]]:
        if stream == "metadata":
            return self.refresh_metadata
        return lambda: self.poll_stream(stream)

    async def poll_once(self, stream: str) -> bool:
        """Run one poll of a stream, record its health, and say whether it succeeded."""
        started = time.monotonic()
        ok = False
        result: object = None
        try:
            result = await self._task(stream)()
            ok = True
        except ConnectError as exc:
            log.error("poll of %s failed: %s", stream, exc, extra={"stream": stream})
        except WalkAbandonedError as exc:
            log.warning("poll of %s abandoned: %s", stream, exc, extra={"stream": stream})
        except Exception:
            log.exception("poll of %s failed unexpectedly", stream, extra={"stream": stream})
        elapsed = time.monotonic() - started
        self.health.record_poll(stream, elapsed, ok, self.connect_now())
        if ok and isinstance(result, WalkTally):
            hwm = self.model.hwm.get(stream)
            lag = self.connect_now() - hwm / US if hwm is not None else float("nan")
            log.info(
                "polled %s: %d records, %d new, %d excluded, %d malformed, lag %.1fs, took %.2fs",
                stream,
                result.records,
                result.new_events,
                result.excluded,
                result.malformed,
                lag,
                elapsed,
                extra={
                    "stream": stream,
                    "records": result.records,
                    "events": result.new_events,
                    "excluded": result.excluded,
                    "malformed": result.malformed,
                    "lag_seconds": round(lag, 3),
                    "seconds": round(elapsed, 3),
                },
            )
        elif ok:
            log.info("refreshed metadata in %.2fs", elapsed, extra={"stream": stream})
        async with self._lock:
            # Another stream's walk may hold applied pages: commit them before they are shown.
            # If that fails, `_commit` has counted and logged it and reloaded the model from
            # the state file: what is published is then the committed state, as it must be.
            with contextlib.suppress(Exception):
                await self._commit_pending()
            self.publish()
        return ok

    async def poll_all_once(self) -> bool:
        """Every stream and the metadata once, concurrently (`run --once`, tests)."""
        results: dict[str, bool] = {}

        async def one(stream: str) -> None:
            results[stream] = await self.poll_once(stream)

        async with anyio.create_task_group() as group:
            for stream in POLL_STREAMS:
                group.start_soon(one, stream)
        return all(results.values())

    async def run(self) -> None:
        """Poll forever; a failing stream backs off alone and never stops the others."""

        async def loop(stream: str, interval: float) -> None:
            failures = 0
            while True:
                started = time.monotonic()
                ok = await self.poll_once(stream)
                failures = 0 if ok else failures + 1
                if ok:
                    delay = interval - (time.monotonic() - started)
                else:
                    delay = min(
                        interval * 2 ** (failures - 1), max(interval, min(300.0, interval * 16))
                    )
                await anyio.sleep(max(0.0, delay))

        async with anyio.create_task_group() as group:
            group.start_soon(loop, "shiny", self.poll_interval)
            group.start_soon(loop, "visits", self.poll_interval)
            group.start_soon(loop, "metadata", self.metadata_interval)


def _count_items(content: dict[str, ContentItem] | None) -> dict[tuple[str, str], int]:
    counts: dict[tuple[str, str], int] = {}
    for item in (content or {}).values():
        key = (item.app_mode, item.access_type)
        counts[key] = counts.get(key, 0) + 1
    return counts
