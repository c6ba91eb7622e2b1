"""The poller: one loop per event stream and one for metadata, each on its own cadence.

A walk reads a stream from `hwm - overlap` to Connect's now. A long one (a first start, an
outage) is cut into time slices (`planner`) that several readers fetch at once while one task
applies them in order; a short one is one slice. Pages are applied to the model under the
committer's lock, and the applied pages are committed with the mark they reach at least every
`COMMIT_EVERY` seconds and at the walk's end. Between two pages the model is always a valid
state to commit (the mark follows the last applied record). A snapshot is built only right
after a commit that was waited for, so it never shows what a crash could take back.
Cancellation (SIGTERM) cannot split a batch: apply, commit and publish run shielded, and a
cancelled walk commits what it applied.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import aclosing
from functools import partial
from typing import Any

import anyio
import anyio.abc

from exporter.client import ConnectClient, ConnectError, first_error
from exporter.committer import CommitError, Committer, WalkAbandonedError
from exporter.health import METADATA, Health
from exporter.metadata import read_metadata
from exporter.model import US, UsageModel, UsageView, WalkTally
from exporter.planner import SLICE_MIN_SPAN_US, Plan, Slice
from exporter.snapshot import DELETED, ContentInfo, MetadataView, Snapshot
from exporter.store import Store
from exporter.streams import STREAMS, Stream

__all__ = ["Poller", "WalkAbandonedError"]

log = logging.getLogger("exporter.poller")

# Seconds between snapshots during a long walk: each evaluates every window over the whole
# model, holding the event loop the readers' responses wait on; scrapes come 15-60 s apart.
PUBLISH_EVERY = 5.0
STEP_BACK = 60.0  # seconds Connect's now may seem to go back between snapshots: held still
# Seconds of applied pages per transaction during a long walk; a crash loses at most this much
# reading, never a count: the stored mark only covers committed pages.
COMMIT_EVERY = 0.5
# Pages a reader may hold ahead of the apply before it waits: bounds the read-ahead of a walk
# that is not sliced, and of a slice whose first page could not tell it was too large.
SLICE_BUFFER_PAGES = 64
# Records a walk's readers may hold in the slices after the one being applied, the nearest slices
# first (see `_Walk._full`). A catch-up's transient memory is mostly this read-ahead (~200 B a
# record, for each stream walked at once); 40 pages keep the readers ahead of the apply against a
# Connect 20 ms away.
READ_AHEAD_RECORDS = 20_000
# The first metadata read waits for the streams' first polls at most this long (s): a catch-up
# of months must not leave the items without names (nor deleted ones unmarked) all that time.
FIRST_METADATA_WAIT = 300.0


def _when(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


class Poller:
    """Walks the streams into the model, refreshes metadata, and publishes snapshots."""

    def __init__(
        self,
        client: ConnectClient,
        model: UsageModel,
        store: Store,
        *,
        poll_interval: float,
        metadata_interval: float,
        streams: Sequence[Stream[Any]] = STREAMS,
        permissions_enabled: bool = True,
        permissions_concurrency: int = 4,
        group_members: int = 0,
        catchup_concurrency: int = 4,
        health: Health | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.client = client
        self.streams = tuple(streams)
        self.health = health or Health(s.name for s in self.streams)
        self.committer = Committer(model, store, self.health)
        self.poll_interval = poll_interval
        self.metadata_interval = metadata_interval
        self.permissions_enabled = permissions_enabled
        self.permissions_concurrency = permissions_concurrency
        self.group_members = group_members
        self.catchup_concurrency = catchup_concurrency
        self.metadata = MetadataView()
        self.clock = clock
        self._offset = 0.0  # Connect's clock minus ours, when they differ by more than Date's 1 s
        self._clock_known = False  # whether a Date from Connect has been seen since the start
        # Nothing usage-wise until the state is loaded: zeros now would read as a dip (a reset,
        # for the counters) on a restart.
        self._snapshot = Snapshot(streams=tuple(s.name for s in self.streams), counters_shown=False)
        self.published_at = 0.0
        self._published_now = -math.inf  # Connect's now of the last snapshot
        self._loaded = False
        self._polls: dict[str, Callable[[], Awaitable[object]]] = {
            s.name: partial(self.poll_stream, s) for s in self.streams
        }
        self._polls[METADATA] = self.refresh_metadata
        # The counters are whole once these have been walked: a stream some servers lack (hits)
        # is not waited for, nor is its failure left to hide the others.
        self._stream_names = {s.name for s in self.streams if s.unsupported is None}
        # Streams known to be readable on this server; one with an `unsupported` check joins
        # once it passes (a Connect without hits never shows their families).
        self._readable = {s.name for s in self.streams if s.unsupported is None}
        self._unsupported: dict[str, str] = {}  # stream -> why, as last logged

    @property
    def model(self) -> UsageModel:
        return self.committer.model

    @property
    def store(self) -> Store:
        return self.committer.store

    # -- the served view ----------------------------------------------------------------------

    @property
    def snapshot(self) -> Snapshot:
        return self._snapshot

    def readiness(self) -> tuple[bool, str]:
        if not self._loaded:
            return False, "state not loaded yet"
        if self.committer.refused is not None:
            # Short, without the path: the probes answer anyone who can reach the port.
            return False, "the state file left its path: nothing is committed (see the log)"
        missing = [p for p in self._polls if p not in self.health.last_success]
        if missing:
            return False, "waiting for the first successful poll of: " + ", ".join(missing)
        return True, "ready"

    def connect_now(self) -> float:
        """Connect's present time as best known: our clock corrected by the last Date seen."""
        return self.clock() + self._offset

    def note_server_time(self, server_time: float | None) -> None:
        if server_time is None:
            return
        self._clock_known = True
        offset = server_time - self.clock()
        self.health.clock_offset(offset)
        self._offset = offset if abs(offset) > 2.0 else 0.0

    def publish(self) -> None:
        """Build and swap the snapshot; call only when the model equals the committed state."""
        now = self.connect_now()
        if self._published_now - STEP_BACK < now < self._published_now:
            # Connect's now is re-read from whole-second Date headers and may step back a
            # little: the windows hold still instead (a real step back is taken as it is).
            now = self._published_now
        self._published_now = now
        model = self.model
        # Until a first start's replay of the history is complete its windows hold part of it,
        # and the usage families show nothing (`metrics._whole`): nothing is evaluated.
        view = model.view(now) if model.counters_shown else UsageView()
        meta = self.metadata
        # A stream some servers lack shows once walked to the end since the start: its first
        # walk after an upgrade counts from the origin, and partial totals must not be seen.
        shown = tuple(
            s.name
            for s in self.streams
            if s.name in self._readable
            and (s.unsupported is None or s.name in model.complete_walks)
        )
        info: dict[str, ContentInfo] = {}
        if meta.content is not None:
            info.update(meta.content)
            for guid in view.usage_content:
                info.setdefault(guid, DELETED)
        self._snapshot = Snapshot(
            counters_shown=model.counters_shown,
            usage=view,
            metadata=meta,
            content_info=info,
            counting_since=None if model.counting_since is None else model.counting_since / US,
            windows_evaluated_at=now if model.counters_shown else None,
            high_water_mark={s: v / US for s, v in model.hwm.items() if s in shown},
            streams=shown,
            taken_at=now,
        )
        self.published_at = time.monotonic()

    # -- start --------------------------------------------------------------------------------

    async def load(self) -> None:
        """Restore committed state, or on first start fix the counting epoch at Connect's now."""
        committer = self.committer
        state = await anyio.to_thread.run_sync(committer.store.load)
        if state is not None:
            committer.model = UsageModel(committer.model.rules, state)
            committer.model.add_streams(s.name for s in self.streams)
            log.info("restored state: counters continue from the state file")
        else:
            server_time = await self.client.server_time()
            self.note_server_time(server_time)
            now_s = math.floor(server_time if server_time is not None else self.clock())
            model = committer.model
            async with committer.lock:
                model.start_counting(
                    now_s * US, (s.name for s in self.streams), server=self.client.server
                )
                await committer.commit()
            origin = (model.counting_since or 0) // US
            log.info(
                "new state file: counting from %s (%s), windows back-filled from 30 days before",
                _when(origin),
                "the first start" if origin == now_s else f"{(now_s - origin) / 86400:g} days back",
            )
        self._loaded = True
        self.publish()

    # -- streams ------------------------------------------------------------------------------

    def _stream(self, stream: Stream[Any] | str) -> Stream[Any]:
        if isinstance(stream, Stream):
            return stream
        return next(s for s in self.streams if s.name == stream)

    async def poll_stream(self, stream: Stream[Any] | str) -> WalkTally | None:
        """One complete walk of a stream from its high-water mark minus the overlap.

        A long range is cut into time slices read concurrently: on a Connect far away, round
        trips, not records, bound a sequential walk. The slices partition the records by their
        sort time and are applied in order, so each record is applied exactly once and the mark
        follows the last one applied.
        """
        stream = self._stream(stream)
        committer = self.committer
        committer.check_writable()
        if stream.unsupported is not None and not await self._readable_now(stream):
            async with committer.lock:
                self._walked(committer.model, stream)  # nothing to count: it is complete
                await committer.commit()
            return None
        async with committer.lock:  # the tally keys the visits a walk can meet: a change
            walk_model = committer.model
            walk = walk_model.walk_tally(stream.name)
        begin_us = int(self.connect_now()) * US
        plan = Plan(walk.start_us)
        readers = 1
        long_walk = begin_us - walk.start_us > SLICE_MIN_SPAN_US
        if self.catchup_concurrency > 1 and (long_walk or not self._clock_known):
            # Slicing needs Connect's present time up front; our clock is only an estimate
            # (unknown skew right after a start), so ask: one cheap request per catch-up, and
            # one at the first walk after a start, when a skewed clock could hide a catch-up.
            server_time = await self.client.server_time()
            self.note_server_time(server_time)
            if server_time is not None:
                begin_us = int(server_time) * US
            if begin_us - walk.start_us > SLICE_MIN_SPAN_US:
                readers = self.catchup_concurrency
                plan = Plan.for_walk(walk.start_us, begin_us, readers)
        await self._walk(stream, walk, plan, walk_model, readers)
        walk_now_us = plan.now_us if plan.now_us is not None else begin_us
        with anyio.CancelScope(shield=True):
            async with committer.lock:
                model = committer.check(walk_model)
                stream.finish(model, walk, walk_now_us)
                model.set_hwm(stream.name, walk_now_us - US)
                model.prune_windows(walk_now_us)
                self._walked(model, stream)
                await committer.commit()
        return walk  # poll_once publishes, once the poll's health is recorded too

    def _walked(self, model: UsageModel, stream: Stream[Any]) -> None:
        model.complete_walks.add(stream.name)
        if not model.counters_shown and model.complete_walks >= self._stream_names:
            model.take_baseline()  # the history is counted: the counters are whole

    async def _readable_now(self, stream: Stream[Any]) -> bool:
        """Whether this server serves `stream`, logged when that changes."""
        assert stream.unsupported is not None
        why = await stream.unsupported(self.client)
        if why is None:
            if stream.name in self._unsupported:
                log.info("%s: the server now serves them; reading", stream.name)
                del self._unsupported[stream.name]
            self._readable.add(stream.name)
            return True
        if self._unsupported.get(stream.name) != why:
            log.info("%s: not read: %s", stream.name, why, extra={"stream": stream.name})
            self._unsupported[stream.name] = why
        self._readable.discard(stream.name)
        return False

    async def _walk(
        self,
        stream: Stream[Any],
        walk: WalkTally,
        plan: Plan,
        walk_model: UsageModel,
        readers: int,
    ) -> None:
        """`readers` tasks fill the slices; this one applies them in order.

        A slice's failure surfaces when the apply reaches it, so the slices before it still
        count and move the mark.
        """
        run_walk = _Walk(self, stream, walk, plan, walk_model)
        try:
            async with anyio.create_task_group() as group:
                for _ in range(readers):
                    group.start_soon(run_walk.reader)
                try:
                    await run_walk.apply_in_order(group)
                except BaseException:
                    # A failure or cancellation (SIGTERM) between pages: what was applied is a
                    # valid state (the mark covers only what was applied), so keep it.
                    with anyio.CancelScope(shield=True):
                        async with self.committer.lock:
                            if self.committer.model is walk_model:
                                await self.committer.commit_pending()
                    raise
                finally:
                    plan.finished = True
                    with anyio.CancelScope(shield=True):
                        await run_walk.notify()
        except BaseExceptionGroup as group_error:
            raise first_error(group_error) from None

    # -- metadata -----------------------------------------------------------------------------

    async def refresh_metadata(self) -> None:
        """Content, users and permissions: labels and inventory, not events."""
        metadata = await read_metadata(
            self.client,
            permissions=self.permissions_enabled,
            concurrency=self.permissions_concurrency,
            group_members=self.group_members,
        )
        async with self.committer.lock:
            self.metadata = metadata

    # -- loops --------------------------------------------------------------------------------

    async def poll_once(self, name: str) -> bool:
        """Run one poll (a stream's walk, or the metadata), record its health, say if it
        succeeded."""
        started = time.monotonic()
        ok = False
        result: object = None
        try:
            result = await self._polls[name]()
            ok = True
        except ConnectError as exc:
            log.error("poll of %s failed: %s", name, exc, extra={"stream": name})
        except WalkAbandonedError as exc:
            if self.committer.refused is None:  # else the one line about the file says why
                log.warning("poll of %s abandoned: %s", name, exc, extra={"stream": name})
        except CommitError:
            pass  # logged once, as the commit failed
        except Exception:
            log.exception("poll of %s failed unexpectedly", name, extra={"stream": name})
        elapsed = time.monotonic() - started
        self.health.record_poll(name, elapsed, ok, self.clock())
        if ok and isinstance(result, WalkTally):
            hwm = self.model.hwm.get(name)
            lag = self.connect_now() - hwm / US if hwm is not None else float("nan")
            if hwm is not None:
                self.health.lag(name, lag)
            log.info(
                "polled %s: %d records, %d new, %d excluded, %d malformed, lag %.1fs, took %.2fs",
                name,
                result.records,
                result.new_events,
                result.excluded,
                result.malformed,
                lag,
                elapsed,
                extra={
                    "stream": name,
                    "records": result.records,
                    "events": result.new_events,
                    "excluded": result.excluded,
                    "malformed": result.malformed,
                    "lag_seconds": round(lag, 3),
                    "seconds": round(elapsed, 3),
                },
            )
        elif ok and name == METADATA:
            log.info("refreshed metadata in %.2fs", elapsed, extra={"stream": name})
        async with self.committer.lock:
            # Another stream's walk may hold applied pages: commit them before they are shown.
            # If that fails, the committer has counted and logged it and reloaded the model
            # from the store: what is published is then the committed state, as it must be.
            with contextlib.suppress(CommitError):
                await self.committer.commit_pending()
            self.publish()
        return ok

    async def poll_all_once(self) -> bool:
        """Every stream and the metadata once, concurrently (`run --once`, tests)."""
        results: dict[str, bool] = {}

        async def one(name: str) -> None:
            results[name] = await self.poll_once(name)

        async with anyio.create_task_group() as group:
            for name in self._polls:
                group.start_soon(one, name)
        return all(results.values())

    async def run(self) -> None:
        """Poll forever; a failing stream backs off alone and never stops the others.

        The metadata is first read once every stream's first poll has ended (succeeded or
        failed), or after FIRST_METADATA_WAIT: on a first start or after a long downtime that
        poll is the catch-up, and the two side by side would hold both at their largest at
        once (the counters are shown no later for it, the catch-up having the connections to
        itself)."""
        first_polls = {name: anyio.Event() for name in self._polls if name != METADATA}

        async def loop(name: str, interval: float) -> None:
            failures = 0
            if name == METADATA:
                with anyio.move_on_after(FIRST_METADATA_WAIT):
                    for ended in first_polls.values():
                        await ended.wait()
            while True:
                started = time.monotonic()
                ok = await self.poll_once(name)
                if name in first_polls:
                    first_polls[name].set()
                failures = 0 if ok else failures + 1
                if ok:
                    delay = interval - (time.monotonic() - started)
                else:
                    delay = min(
                        interval * 2 ** (failures - 1), max(interval, min(300.0, interval * 16))
                    )
                await anyio.sleep(max(0.0, delay))

        async with anyio.create_task_group() as group:
            for name in self._polls:
                interval = self.metadata_interval if name == METADATA else self.poll_interval
                group.start_soon(loop, name, interval)


class _Walk:
    """One walk in progress: its readers fill the plan's slices, its apply takes them in order."""

    def __init__(
        self,
        poller: Poller,
        stream: Stream[Any],
        walk: WalkTally,
        plan: Plan,
        model: UsageModel,
    ) -> None:
        self.poller = poller
        self.stream = stream
        self.walk = walk
        self.plan = plan
        self.model = model  # the model this walk applies to: a reload ends the walk
        self.changed = anyio.Condition()
        self._buffers: dict[Slice, tuple[Any, Any]] = {}

    def _full(self, run: Slice) -> bool:
        """Whether `run`'s reader must wait: the slices between the head and `run` hold half
        the read-ahead, or all the slices after the head hold all of it. The slice after the
        head never waits (nor the head: the apply waits for it), so the slices the apply needs
        first are read first."""
        plan = self.plan
        order = plan.order
        if len(order) <= plan.applied + 1 or order[plan.applied + 1] is run or plan.head() is run:
            return False
        before = total = 0
        for ahead in order[plan.applied + 1 :]:
            if ahead is run:
                before = total
            total += ahead.held
        return before >= READ_AHEAD_RECORDS // 2 or total >= READ_AHEAD_RECORDS

    async def room(self, run: Slice) -> None:
        """Wait while the read-ahead before `run` is full (woken when the head moves on)."""
        if not self._full(run):
            return
        async with self.changed:
            while self._full(run):
                await self.changed.wait()

    def taken(self, run: Slice, records: int) -> None:
        """The apply has taken `records` of `run`'s."""
        run.held -= records

    def buffer(self, run: Slice) -> tuple[Any, Any]:
        """A slice's pages between its reader and the apply, made on first use."""
        pair = self._buffers.get(run)
        if pair is None:
            pair = self._buffers[run] = anyio.create_memory_object_stream[Any](SLICE_BUFFER_PAGES)
        return pair

    async def notify(self) -> None:
        async with self.changed:
            self.changed.notify_all()

    async def reader(self) -> None:
        plan = self.plan
        while True:
            async with self.changed:
                run = plan.take()
                while run is None and not plan.finished:
                    plan.idle_readers += 1
                    try:
                        await self.changed.wait()
                    finally:
                        plan.idle_readers -= 1
                    run = plan.take()
            if run is None:
                return
            send, _ = self.buffer(run)
            async with send:
                try:
                    await self.read_slice(run, send)
                except Exception as exc:  # surfaces in order, from the apply side
                    run.error = exc
                run.read_done = True

    async def apply_in_order(self, group: anyio.abc.TaskGroup) -> None:
        plan = self.plan
        plan.extend()
        await self.notify()
        while (run := plan.head()) is not None:
            plan.adapt(run)
            plan.extend()
            await self.notify()
            await self.apply_slice(run, group)
            plan.learn(run)
            plan.applied += 1
            plan.extend()
            await self.notify()

    async def read_slice(self, run: Slice, send: Any) -> None:
        """Fetch one slice's pages into its buffer, keeping only the records it owns."""
        stream, plan = self.stream, self.plan
        # A stream that reaches back: its first slice asks from the walk's start for records
        # that sort earlier; later slices only hold records that sort inside them.
        start = self.walk.start_us if run.first else run.lo
        key = stream.sort_key
        first_page = True
        await self.room(run)
        pages = stream.fetch(self.poller.client, start, run.hi)
        async with aclosing(pages) as page_iter:  # type: ignore[type-var]
            async for page in page_iter:
                records: list[Any] = page.records
                keys = list(map(key, records))
                mine = plan.owned(run, records, keys, stream.reaches_back)
                last = keys[-1] if keys else None
                split = False
                if first_page and mine and last is not None:
                    split = plan.split(run, len(mine), max(key(mine[0]), run.lo), last)
                first_page = False
                run.records += len(mine)
                if last is not None and not split:
                    split = plan.cut(run, last) or plan.share_head(run, last)
                if split:
                    await self.notify()
                run.held += len(mine)
                await send.send((page, mine, last))
                if run.hi is not None and last is not None and last >= run.hi:
                    return  # split: the rest of this cursor belongs to the next slice
                await self.room(run)

    async def apply_slice(self, run: Slice, group: anyio.abc.TaskGroup) -> None:
        """Apply one slice's pages as they arrive, committing every `COMMIT_EVERY` seconds.

        Those commits write in the background (in `group`) while the next pages are applied;
        before a snapshot the model is committed in full and waited for.
        """
        poller, stream, walk, plan = self.poller, self.stream, self.walk, self.plan
        committer = poller.committer
        anchor = run.lo
        _, receive = self.buffer(run)
        async with receive:
            async for page, mine, last in receive:
                poller.note_server_time(page.server_time)
                if plan.now_us is None:
                    # Connect's own clock decides what "already happened" means for the mark.
                    server = page.server_time
                    plan.now_us = int(server if server is not None else poller.connect_now()) * US
                walk_now_us = plan.now_us
                with anyio.CancelScope(shield=True):
                    async with committer.lock:
                        model = committer.check(self.model)
                        before = walk.new_events
                        stream.apply(model, mine, walk, walk_now_us)
                        if last is not None:
                            anchor = max(anchor, last if run.hi is None else min(last, run.hi))
                        if page.malformed:
                            model.count_malformed(
                                stream.name,
                                [m.identity() for m in page.malformed],
                                anchor,
                                walk,
                                key_time_us=walk_now_us,
                                scope=id(run),
                            )
                            for error in page.malformed:
                                log.warning("skipped a malformed record: %s", error)
                        # Every record sorting before `anchor` is applied: the slices before
                        # this one are complete, and this one is read in sort order.
                        model.set_hwm(stream.name, min(anchor, walk_now_us))
                        committer.count_new(stream.name, walk.new_events - before)
                        if time.monotonic() - committer.committed_at >= COMMIT_EVERY:
                            if time.monotonic() - poller.published_at >= PUBLISH_EVERY:
                                await committer.commit()
                                poller.publish()
                            else:
                                await committer.commit(behind=group)
                            # The commit dropped the keys no later walk can meet; so goes
                            # this walk's tally of them.
                            walk.forget_before(model.walk_start(stream.name))
                self.taken(run, len(mine))
        if run.error is not None:
            raise run.error
