"""The batch committer: the model, its store, and the one lock every change goes under.

Pages are applied to the model under `lock`; `commit()` hands the model's delta to the store in
one transaction. During a long walk a commit may be written in the background while the next
pages are applied; each waits for the one before, so they land in order. A failed commit sends
the model back to what the store holds, and every walk that applied pages to the old model
stops (`check`): its mark would pass pages that went with it.
"""

from __future__ import annotations

import logging
import time

import anyio
import anyio.abc

from exporter.health import Health
from exporter.model import Delta, UsageModel
from exporter.store import StateFileGoneError, Store

log = logging.getLogger("exporter.committer")


class CommitError(Exception):
    """A batch could not be committed; it was logged and counted where it failed."""


class WalkAbandonedError(Exception):
    """A failed commit reloaded the model from the store while this walk was applying pages:
    the pages it applied went with the old model, so it must not go on (its mark would pass
    them). The next walk reads again from the committed mark."""


class Committer:
    """Owns the model between commits; call every method but `check` with `lock` held."""

    def __init__(self, model: UsageModel, store: Store, health: Health) -> None:
        self.model = model
        self.store = store
        self.health = health
        self.lock = anyio.Lock()
        self.committed_at = 0.0  # time.monotonic() of the last commit begun
        self._new_events: dict[str, int] = {}  # applied, not yet committed, by stream
        self._writing: anyio.Event | None = None  # a write going on in the background
        self._write_error: CommitError | None = None
        # Why nothing can be committed any more (the state file left its path), once it is so.
        self.refused: str | None = None

    def count_new(self, stream: str, events: int) -> None:
        """New events applied to the model; the health counter takes them once committed."""
        self._new_events[stream] = self._new_events.get(stream, 0) + events

    def check(self, walk_model: UsageModel) -> UsageModel:
        """The model a walk applies to, unless a failed commit has replaced it since."""
        if self.model is not walk_model:
            raise WalkAbandonedError(
                "the state was reloaded from the state file after a failed commit; "
                "the next poll reads again from the committed mark"
            )
        return walk_model

    async def commit(self, behind: anyio.abc.TaskGroup | None = None) -> None:
        """Write the model's changes; on failure reload what is stored, so memory equals it.

        Applied but uncommitted pages are thrown away on failure: the mark in the store does
        not cover them, so the next walk reads them again. With `behind` (a walk's task group)
        the write goes on in the background while the walk applies more pages; the next
        commit or `settle` waits for it and raises its failure.
        """
        await self.settle()
        delta = self.model.take_delta()
        new_events, self._new_events = self._new_events, {}
        self.committed_at = time.monotonic()
        if behind is None:
            try:
                await self._write(delta, new_events)
            except CommitError:
                await self._reload()
                raise
            return
        done = anyio.Event()
        self._writing = done

        async def write() -> None:
            with anyio.CancelScope(shield=True):
                try:
                    await self._write(delta, new_events)
                except CommitError as exc:
                    self._write_error = exc
                finally:
                    done.set()

        behind.start_soon(write)

    async def commit_pending(self) -> None:
        """Commit what is applied and not yet committed: before any snapshot shows it."""
        await self.settle()
        if self.model.has_changes():
            await self.commit()

    async def settle(self) -> None:
        """Wait for a write in the background; if it failed, reload the model and raise."""
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

    def check_writable(self) -> None:
        """Raise CommitError if the store refuses every commit: a walk would read for nothing."""
        if self.refused is not None:
            raise CommitError(self.refused)

    async def _write(self, delta: Delta, new_events: dict[str, int]) -> None:
        try:
            await anyio.to_thread.run_sync(self.store.commit, delta)
        except StateFileGoneError as exc:
            # Said once, as a WARNING (the process goes on serving what was committed), and
            # shown for as long as it lasts by the health gauge and /readyz.
            self.health.state_error()
            if self.refused is None:
                log.warning("%s", exc)
            self.refused = str(exc)
            self.health.state_file_missing()
            raise CommitError(str(exc)) from exc
        except Exception as exc:
            self.health.state_error()
            log.error("cannot commit to the state file %s: %s", _where(self.store), exc)
            raise CommitError(str(exc)) from exc
        for stream, count in new_events.items():
            self.health.ingested(stream, count)

    async def _reload(self) -> None:
        state = await anyio.to_thread.run_sync(self.store.load)
        self.model = UsageModel(self.model.rules, state)


def _where(store: Store) -> str:
    return str(getattr(store, "path", type(store).__name__))
