"""The batch committer against a store of the tests' own: the `Store` interface is all it needs."""

from __future__ import annotations

import copy

import anyio
import pytest

from exporter.committer import CommitError, Committer, WalkAbandonedError
from exporter.health import Health
from exporter.model import US, Delta, ModelState, Rules, UsageModel
from exporter.records import Visit

pytestmark = pytest.mark.anyio

T0 = 1_700_000_000 * US
RULES = Rules(overlap_us=60 * US, max_session_age_us=3600 * US)


class MemoryStore:
    """A store in memory: what another `Store` would implement, and a switch to fail commits."""

    def __init__(self) -> None:
        self.state: ModelState | None = None
        self.fail = False
        self.commits = 0

    def load(self) -> ModelState | None:
        return copy.deepcopy(self.state)

    def commit(self, delta: Delta) -> None:
        if self.fail:
            raise OSError("disk full")
        self.commits += 1
        state = self.state or ModelState()
        if delta.counting_since is not None:
            state.counting_since = delta.counting_since
        state.marks.update(delta.marks)
        state.counters.update(delta.counters)
        for guid, (counts, total) in delta.durations.items():
            state.durations[guid] = (list(counts), total)
        for space, changes in delta.keys.items():
            keys = state.keys.setdefault(space, {})
            for key, change in changes.items():
                if change is None:
                    keys.pop(key, None)
                else:
                    keys[key] = change[:2]
        for space, horizon in delta.horizons.items():
            keys = state.keys.get(space, {})
            for key in [k for k, (v, t) in keys.items() if t < horizon and space != "shiny"]:
                del keys[key]
        user_last: dict[str, int] = {}
        for user, last in state.user_last:  # the greatest time of a user's rows
            user_last[user] = max(last, user_last.get(user, last))
        for user, last in delta.user_last.items():
            if last is None:
                user_last.pop(user, None)
            else:
                user_last[user] = last
        state.user_last = list(user_last.items())
        pair_last: dict[tuple[str, str], int] = {}
        for c, u, t in state.pair_last:
            pair_last[c, u] = max(t, pair_last.get((c, u), t))
        for pair, last in delta.pair_last.items():
            if last is not None:
                pair_last[pair] = last
        state.pair_last = [(c, u, t) for (c, u), t in pair_last.items()]
        state.content_last.update(delta.content_last)
        self.state = state

    def close(self) -> None:
        pass


def visit(t: int) -> Visit:
    return Visit("doc", "u1", t, None, None, None, None, None, 1)


async def fresh() -> tuple[Committer, MemoryStore]:
    store = MemoryStore()
    model = UsageModel(RULES)
    committer = Committer(model, store, Health(("shiny", "visits")))
    async with committer.lock:
        model.start_counting(T0, ("shiny", "visits"))
        await committer.commit()
    return committer, store


async def test_a_commit_hands_the_store_the_model_and_counts_new_events_once_durable() -> None:
    committer, store = await fresh()
    model = committer.model
    model.apply_visits([visit(T0 + US)], model.walk_tally("visits"))
    committer.count_new("visits", 1)
    assert committer.health.ingested_total("visits") == 0  # applied, not yet committed
    async with committer.lock:
        await committer.commit_pending()
    assert committer.health.ingested_total("visits") == 1
    again = UsageModel(RULES, store.load())
    assert again.view(T0 / US).content_visits_total == {"doc": 1}
    async with committer.lock:
        await committer.commit_pending()  # nothing changed: nothing written
    assert store.commits == 2


async def test_a_failed_commit_reloads_what_is_stored_and_ends_the_walks_on_the_old_model() -> None:
    committer, store = await fresh()
    walk_model = committer.model
    walk_model.apply_visits([visit(T0 + US)], walk_model.walk_tally("visits"))
    committer.count_new("visits", 1)
    store.fail = True
    async with committer.lock:
        with pytest.raises(CommitError, match="disk full"):
            await committer.commit()
    assert committer.health.state_errors == 1
    assert committer.health.ingested_total("visits") == 0
    assert committer.model is not walk_model
    assert committer.model.view(T0 / US).content_visits_total == {}  # what the store holds
    with pytest.raises(WalkAbandonedError):
        committer.check(walk_model)
    assert committer.check(committer.model) is committer.model


async def test_a_write_behind_that_fails_is_raised_by_the_next_commit() -> None:
    committer, store = await fresh()
    model = committer.model
    async with anyio.create_task_group() as group:
        model.apply_visits([visit(T0 + US)], model.walk_tally("visits"))
        store.fail = True
        async with committer.lock:
            await committer.commit(behind=group)  # returns at once; the write runs beside
        model.apply_visits([visit(T0 + 2 * US)], model.walk_tally("visits"))
        async with committer.lock:
            with pytest.raises(CommitError):
                await committer.settle()
    assert committer.model is not model
    assert committer.health.state_errors == 1
