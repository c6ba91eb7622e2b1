"""The poller: one loop per stream and one for metadata, each on its own cadence.

A walk reads a stream from `hwm - overlap` to the end. Pages are applied to the model under one
lock shared by all streams; the applied pages are committed together with the high-water mark
they reach in one transaction, at least every `COMMIT_EVERY` seconds and at the end of each
slice. Between two pages the model is always a valid state to commit (the mark covers only the
completed prefix), so a batch may hold one page or many. A snapshot is only built right after a
commit, so it never shows what a crash could take back. Cancellation (SIGTERM) cannot split a
batch: apply, commit and publish run shielded, and a cancelled walk commits what it applied.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

import anyio

from exporter import __version__
from exporter.client import ConnectClient, ConnectError, NotFoundError, Page
from exporter.model import US, UsageModel, WalkTally
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

PUBLISH_EVERY = 1.0  # seconds between snapshots during a long walk; each costs a pass over the maps
# Seconds of applied pages per transaction during a long walk. One transaction per page cost ~20%
# of a catch-up's CPU (and held the GIL against the event loop); a crash loses at most this much
# reading, never a count: the mark on disk only covers committed pages.
COMMIT_EVERY = 0.5
SLICE_MIN_SPAN_US = 2 * 3600 * US  # shorter ranges are read in one sequential walk
SLICE_MIN_WIDTH_US = 15 * 60 * US
SLICES_PER_WORKER = 4  # more slices than workers evens out uneven traffic


class _Slices:
    """Time slices of one walk: [bounds[i], bounds[i+1]), the last one open-ended."""

    def __init__(self, starts: list[int], walk_now_us: int | None) -> None:
        self.starts = starts
        self.progress = list(starts)
        self.done = [False] * len(starts)
        self.walk_now_us = walk_now_us

    def bounds(self, index: int) -> tuple[int, int | None]:
        end = self.starts[index + 1] if index + 1 < len(self.starts) else None
        return self.starts[index], end

    def mark(self) -> int | None:
        """Sort time below which every record has been applied: the completed prefix."""
        for index, done in enumerate(self.done):
            if not done:
                return self.progress[index]
        return None


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

    async def _commit(self) -> None:
        """Write the model's changes; on failure reload what is on disk so memory equals disk.

        Call with the lock held. Applied but uncommitted pages are thrown away on failure: the
        mark on disk does not cover them, so the next walk reads them again.
        """
        delta = self.model.take_delta()
        pending = self._pending_ingested
        self._pending_ingested = dict.fromkeys(STREAMS, 0)
        self._committed_at = time.monotonic()
        try:
            await anyio.to_thread.run_sync(self.store.commit, delta)
        except Exception as exc:
            self.health.state_errors += 1
            log.error("cannot commit to the state file %s: %s", self.store.path, exc)
            fresh = self.model.empty_like()
            await anyio.to_thread.run_sync(self.store.restore, fresh)
            self.model = fresh
            raise
        for stream, count in pending.items():
            self.health.ingested[stream] += count

    async def _commit_pending(self) -> None:
        """Commit what is applied and not yet committed (lock held): before any snapshot."""
        if self.model.has_changes():
            await self._commit()

    # -- streams ------------------------------------------------------------------------------

    async def poll_stream(self, stream: str) -> WalkTally:
        """One complete walk of a stream from its high-water mark minus the overlap.

        A long range (catch-up after a first start or downtime) is cut into time slices read
        concurrently: on a Connect far away, round trips, not records, bound a sequential walk.
        The slices partition the records by their sort time, so each is applied exactly once;
        the mark only advances over the completed prefix of slices.
        """
        walk = WalkTally(start_us=self.model.walk_start(stream))
        begin_us = int(self.connect_now()) * US
        if self.catchup_concurrency > 1 and begin_us - walk.start_us > SLICE_MIN_SPAN_US:
            # Slicing needs Connect's present time up front; our clock is only an estimate
            # (unknown skew right after a start), so ask: one cheap request per catch-up.
            server_time = await self.client.server_time()
            self._note_server_time(server_time)
            if server_time is not None:
                begin_us = int(server_time) * US
        span = begin_us - walk.start_us
        if self.catchup_concurrency > 1 and span > SLICE_MIN_SPAN_US:
            count = min(self.catchup_concurrency * SLICES_PER_WORKER, span // SLICE_MIN_WIDTH_US)
            width = span // count
            bounds = [walk.start_us + i * width for i in range(count)]
            slices = _Slices(bounds, begin_us)
            limiter = anyio.CapacityLimiter(self.catchup_concurrency)

            async def read(index: int) -> None:
                async with limiter:
                    await self._walk_slice(stream, walk, slices, index)

            try:
                async with anyio.create_task_group() as group:
                    for index in range(count):
                        group.start_soon(read, index)
            except BaseExceptionGroup as group_error:
                raise _first_error(group_error) from None
        else:
            slices = _Slices([walk.start_us], None)
            await self._walk_slice(stream, walk, slices, 0)
        walk_now_us = slices.walk_now_us if slices.walk_now_us is not None else begin_us
        with anyio.CancelScope(shield=True):
            async with self._lock:
                model = self.model
                if stream == "shiny":
                    abandoned = model.finish_shiny_walk(walk, walk_now_us)
                    if abandoned:
                        log.info("closed %d Shiny sessions as abandoned", abandoned)
                model.set_hwm(stream, walk_now_us - US)
                model.prune(stream)
                model.prune_windows(walk_now_us)
                await self._commit()
        return walk  # poll_once publishes, once the poll's health is recorded too

    async def _walk_slice(self, stream: str, walk: WalkTally, slices: _Slices, index: int) -> None:
        """Read one slice's pages in order, committing every `COMMIT_EVERY` seconds."""
        lo, hi = slices.bounds(index)
        first = index == 0
        # Shiny's `from` filters on the END: the first slice must reach back to the walk start
        # for sessions that started earlier; later slices only hold sessions started in them.
        start = walk.start_us if first else lo
        pages: AsyncIterator[Page[ShinySession]] | AsyncIterator[Page[Visit]]
        if stream == "shiny":
            pages = self.client.shiny_usage_pages(start=start, end=hi)
        else:
            pages = self.client.visit_pages(start=start, end=hi)
        try:
            await self._read_pages(stream, walk, slices, index, pages, first, lo, hi)
        except BaseException:
            # A failure or cancellation (SIGTERM) between pages: what was applied is a valid
            # state (the mark covers the completed prefix only), so keep it.
            with anyio.CancelScope(shield=True):
                async with self._lock:
                    await self._commit_pending()
            raise
        slices.done[index] = True  # committed with the next batch, or at the walk's end

    async def _read_pages(  # noqa: PLR0917 - one slice's loop, split out for the finally
        self,
        stream: str,
        walk: WalkTally,
        slices: _Slices,
        index: int,
        pages: AsyncIterator[Page[ShinySession]] | AsyncIterator[Page[Visit]],
        first: bool,
        lo: int,
        hi: int | None,
    ) -> None:
        anchor = lo
        async with aclosing(pages) as page_iter:  # type: ignore[type-var]
            async for page in page_iter:
                self._note_server_time(page.server_time)
                if slices.walk_now_us is None:
                    # Connect's own clock decides what "already happened" means for the mark.
                    now = page.server_time if page.server_time is not None else self.connect_now()
                    slices.walk_now_us = int(now) * US
                walk_now_us = slices.walk_now_us
                records: list[Any] = page.records
                if stream == "shiny":
                    mine = [
                        r
                        for r in records
                        if (first or r.started >= lo) and (hi is None or r.started < hi)
                    ]
                else:
                    mine = [r for r in records if r.time >= lo and (hi is None or r.time < hi)]
                if len(mine) == len(records):
                    mine = records
                with anyio.CancelScope(shield=True):
                    async with self._lock:
                        model = self.model
                        before = walk.new_events
                        if stream == "shiny":
                            model.apply_shiny(mine, walk, walk_now_us)
                            last = records[-1].started if records else None
                        else:
                            model.apply_visits(mine, walk)
                            last = records[-1].time if records else None
                        if last is not None:
                            anchor = max(anchor, last)
                            slices.progress[index] = max(slices.progress[index], last)
                        if page.malformed:
                            model.count_malformed(
                                stream,
                                [_raw_identity(m) for m in page.malformed],
                                anchor,
                                walk,
                                key_time_us=walk_now_us,
                            )
                            for error in page.malformed:
                                log.warning("skipped a malformed record: %s", error)
                        mark = slices.mark()
                        if mark is not None:
                            model.set_hwm(stream, min(mark, walk_now_us))
                        self._pending_ingested[stream] += walk.new_events - before
                        if time.monotonic() - self._committed_at >= COMMIT_EVERY:
                            await self._commit()
                            if time.monotonic() - self._published_at >= PUBLISH_EVERY:
                                self.publish()

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
