"""The exactly-once rules of the usage model, record by record."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from exporter.model import ABANDONED, CLOSED, OPEN, US, Rules, UsageModel, WalkTally
from exporter.records import Hit, ShinySession, Visit
from exporter.store import SqliteStore

T0 = 1_700_000_000 * US
OVERLAP = 120 * US


def rules() -> Rules:
    return Rules(
        overlap_us=OVERLAP,
        max_session_age_us=24 * 3600 * US,
        exclude_user_agents=("ContentHealthMonitor/",),
    )


def model() -> UsageModel:
    m = UsageModel(rules())
    m.start_counting(T0, ("shiny", "visits"))
    return m


def session(content: str, user: str | None, started: int, ended: int | None) -> ShinySession:
    return ShinySession(content, user, started, ended, 1)


def visit(content: str, user: str | None, t: int, ua: str | None = "Mozilla/5.0") -> Visit:
    return Visit(content, user, t, None, None, "7", "/", ua, 3)


def walk(m: UsageModel, stream: str) -> WalkTally:
    return m.walk_tally(stream)


def test_session_counted_once_across_overlapping_walks_and_duration_on_end() -> None:
    m = model()
    s_open = session("a", "u1", T0 + 10 * US, None)
    m.apply_shiny([s_open], walk(m, "shiny"), T0 + 20 * US)
    m.apply_shiny([s_open], walk(m, "shiny"), T0 + 30 * US)
    view = m.view((T0 + 30 * US) / US)
    assert view.shiny_sessions_total == {"a": 1}
    assert view.shiny_sessions_active == {"a": 1}
    assert view.shiny_session_duration == {}
    s_closed = session("a", "u1", T0 + 10 * US, T0 + 100 * US)
    for _ in range(2):
        m.apply_shiny([s_closed], walk(m, "shiny"), T0 + 200 * US)
    view = m.view((T0 + 200 * US) / US)
    assert view.shiny_sessions_total == {"a": 1}
    assert view.shiny_sessions_active == {}
    hist = view.shiny_session_duration["a"]
    assert hist.count == 1
    assert hist.sum == 90.0
    assert m.sessions[("a", "u1", T0 + 10 * US)] == (CLOSED, T0 + 100 * US)


def test_history_before_epoch_fills_windows_but_not_counters() -> None:
    m = model()
    old = session("a", "u1", T0 - 3600 * US, T0 - 3000 * US)
    running = session("a", "u2", T0 - 600 * US, None)
    w = WalkTally(start_us=T0 - 30 * 86400 * US)
    m.apply_shiny([old, running], w, T0)
    view = m.view(T0 / US)
    assert view.shiny_sessions_total == {}
    assert view.active_users == {"1h": 2, "24h": 2, "7d": 2, "30d": 2}
    assert ("a", "u1", T0 - 3600 * US) not in m.sessions  # nothing to de-dup before T0
    # The running session started before T0 is not counted, but its duration is once it ends.
    m.apply_shiny([session("a", "u2", T0 - 600 * US, T0 + 60 * US)], walk(m, "shiny"), T0 + 90 * US)
    view = m.view((T0 + 90 * US) / US)
    assert view.shiny_sessions_total == {}
    assert view.shiny_session_duration["a"].count == 1
    assert view.shiny_session_duration["a"].sum == 660.0


def test_identical_visits_count_as_a_multiset() -> None:
    m = model()
    v = visit("doc", "u1", T0 + 5 * US)
    m.apply_visits([v, v], walk(m, "visits"))
    m.apply_visits([v, v], walk(m, "visits"))  # the overlap re-reads both: no new count
    assert m.view((T0 + 10 * US) / US).content_visits_total == {"doc": 2}
    m.apply_visits([v, v, v], walk(m, "visits"))  # a third, identical, late-written visit
    assert m.view((T0 + 10 * US) / US).content_visits_total == {"doc": 3}


def test_multiset_spans_pages_of_one_walk() -> None:
    m = model()
    v = visit("doc", "u1", T0 + 5 * US)
    w = walk(m, "visits")
    m.apply_visits([v], w)
    m.apply_visits([v], w)  # same walk, next page: a second identical visit
    assert m.view((T0 + 10 * US) / US).content_visits_total == {"doc": 2}


def test_synthetic_and_anonymous_visits() -> None:
    m = model()
    w = walk(m, "visits")
    m.apply_visits(
        [
            visit("doc", None, T0 + 1 * US),
            visit("doc", "u1", T0 + 2 * US),
            visit("doc", "svc", T0 + 3 * US, ua="ContentHealthMonitor/2024.09.0"),
        ],
        w,
    )
    m.apply_visits(
        [visit("doc", "svc", T0 + 3 * US, ua="ContentHealthMonitor/2024.09.0")], walk(m, "visits")
    )
    view = m.view((T0 + 10 * US) / US)
    assert view.content_visits_total == {"doc": 2}
    assert view.excluded_events_total == {("visits", "synthetic"): 1}
    assert view.active_users["1h"] == 1
    assert view.content_active_users == {("doc", "24h"): 1, ("doc", "7d"): 1, ("doc", "30d"): 1}


def test_views_share_an_items_histogram_until_a_session_of_it_ends() -> None:
    m = model()
    m.apply_shiny(
        [session("app", "u1", T0, T0 + 30 * US), session("other", "u1", T0, T0 + 5 * US)],
        walk(m, "shiny"),
        T0 + 60 * US,
    )
    first = m.view((T0 + 60 * US) / US).shiny_session_duration
    m.apply_shiny(
        [session("app", "u2", T0 + 40 * US, T0 + 50 * US)], walk(m, "shiny"), T0 + 60 * US
    )
    second = m.view((T0 + 61 * US) / US).shiny_session_duration
    assert second["other"] is first["other"]  # unchanged: one object for both snapshots
    assert second["app"] is not first["app"]
    assert (first["app"].count, first["app"].sum) == (1, 30.0)
    assert (second["app"].count, second["app"].sum) == (2, 40.0)


def test_content_active_users_are_a_mapping_of_the_windows_above_zero() -> None:
    m = model()
    m.apply_visits([visit("doc", "u1", T0 - 2 * 86400 * US)], walk(m, "visits"))
    active = m.view((T0 + 10 * US) / US).content_active_users
    assert dict(active) == {("doc", "7d"): 1, ("doc", "30d"): 1}
    assert len(active) == 2 and ("doc", "24h") not in active
    assert active.get(("doc", "24h"), 0) == 0 and active[("doc", "7d")] == 1
    with pytest.raises(KeyError):
        active[("doc", "90d")]


def test_records_before_walk_start_are_ignored_and_keys_prune() -> None:
    m = model()
    v = visit("doc", "u1", T0 + 5 * US)
    m.apply_visits([v], walk(m, "visits"))
    m.set_hwm("visits", T0 + 5 * US + OVERLAP + 10 * US)
    m.take_delta()
    assert m.visits == {}
    # A floor-to-the-second query may return it again: the walk start filters it exactly.
    m.apply_visits([v], walk(m, "visits"))
    assert m.view((T0 + 10 * US) / US).content_visits_total == {"doc": 1}


def test_open_session_past_max_age_or_vanished_is_abandoned() -> None:
    m = model()
    s = session("a", "u1", T0 + 1 * US, None)
    gone = session("a", "u2", T0 + 2 * US, None)
    m.apply_shiny([s, gone], walk(m, "shiny"), T0 + 10 * US)
    w = walk(m, "shiny")
    later = T0 + 25 * 3600 * US
    m.apply_shiny([s], w, later)
    assert m.finish_shiny_walk(w, later) == 2
    view = m.view(later / US)
    assert view.shiny_sessions_abandoned_total == {"a": 2}
    assert view.shiny_sessions_active == {}
    assert m.sessions[("a", "u1", T0 + 1 * US)][0] == ABANDONED
    # When it finally ends, it is not counted again and no duration is observed.
    m.apply_shiny([session("a", "u1", T0 + 1 * US, later + US)], walk(m, "shiny"), later)
    view = m.view(later / US)
    assert view.shiny_sessions_total == {"a": 2}
    assert view.shiny_session_duration == {}


def test_session_first_seen_past_max_age_is_counted_once_across_walks() -> None:
    # Connect lists a session without an end on every call. Met for the first time when already
    # past the age limit (the exporter was down for longer), it is counted and abandoned once,
    # and its key must survive the walk's end, or the next walk counts it again.
    m = model()
    stuck = session("a", "u1", T0 + 1 * US, None)
    later = T0 + 25 * 3600 * US
    for step in range(3):
        w = walk(m, "shiny")
        m.apply_shiny([stuck], w, later + step * US)
        m.finish_shiny_walk(w, later + step * US)
        m.set_hwm("shiny", later + step * US)
        m.take_delta()
    view = m.view(later / US)
    assert view.shiny_sessions_total == {"a": 1}
    assert view.shiny_sessions_abandoned_total == {"a": 1}
    assert m.sessions[("a", "u1", T0 + 1 * US)][0] == ABANDONED


def test_a_session_missing_from_walks_and_listed_again_counts_once(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    # Connect lists a running session on every call; missing from two walks in a row (a proxy
    # that emptied the pages), it was abandoned, its key dropped at the second, and counted again
    # when listed again. Its key now stays, through a restart, until Connect lists it ended.
    store = SqliteStore(tmp_path_factory.mktemp("state") / "s.sqlite")
    m = model()
    running = session("a", "u1", T0 + 1 * US, None)
    key = ("a", "u1", T0 + 1 * US)

    def poll(sessions: list[ShinySession], at: int) -> UsageModel:
        w = walk(m, "shiny")
        m.apply_shiny(sessions, w, at)
        m.finish_shiny_walk(w, at)
        m.set_hwm("shiny", at - US)
        store.commit(m.take_delta())
        return UsageModel(rules(), store.load())  # what a restart would hold

    poll([running], T0 + 10 * US)
    for step in (1, 2, 3):  # missing, long enough for any overlap to pass it by
        restarted = poll([], T0 + step * 3600 * US)
    assert restarted.sessions[key] == (ABANDONED, T0 + 1 * US)
    m = restarted
    poll([running], T0 + 4 * 3600 * US)
    ended = session("a", "u1", T0 + 1 * US, T0 + 5 * 3600 * US)
    poll([ended], T0 + 5 * 3600 * US + US)
    view = m.view(T0 / US + 6 * 3600)
    assert view.shiny_sessions_total == {"a": 1}
    assert view.shiny_sessions_abandoned_total == {"a": 1}
    assert view.shiny_session_duration == {}  # abandoned sessions keep no duration
    assert m.sessions[key] == (CLOSED, T0 + 5 * 3600 * US)
    m = poll([], T0 + 6 * 3600 * US)  # listed ended: the key ages out like any closed one
    assert key not in m.sessions
    store.close()


def test_delta_holds_exactly_the_changes() -> None:
    m = model()
    m.take_delta()
    assert m.take_delta().is_empty()
    m.apply_shiny([session("a", "u1", T0 + 1 * US, None)], walk(m, "shiny"), T0 + 2 * US)
    delta = m.take_delta()
    assert delta.counters == {("shiny_sessions", "a"): 1}
    assert delta.keys == {"shiny": {("a", "u1", T0 + 1 * US): (OPEN, T0 + 1 * US, True)}}
    assert delta.user_last == {"u1": T0 + 1 * US}
    assert delta.pair_last == {("a", "u1"): T0 + 1 * US}
    assert m.take_delta().is_empty()


def test_keys_below_the_committed_mark_minus_overlap_are_dropped_and_the_horizon_said() -> None:
    # A long walk meets most of its keys after the mark has passed them by more than the
    # overlap: no later walk can return those records, so they go at once, and the delta's
    # horizon tells the store it need not write them.
    m = model()
    m.apply_shiny([session("app", "u3", T0 + 3 * US, None)], walk(m, "shiny"), T0 + 4 * US)
    assert m.take_delta().keys["shiny"]  # noted as open (pinned)
    w = walk(m, "visits")
    old, recent = visit("doc", "u1", T0 + 10 * US), visit("doc", "u2", T0 + 500 * US)
    m.apply_visits([old, recent], w)
    s_old = session("app", "u1", T0 + 1 * US, T0 + 20 * US)
    s_open = session("app", "u2", T0 + 2 * US, None)
    s_was_open = session("app", "u3", T0 + 3 * US, T0 + 30 * US)
    ws = walk(m, "shiny")
    m.apply_shiny([s_old, s_open, s_was_open], ws, T0 + 600 * US)
    m.set_hwm("visits", T0 + 500 * US)  # bound: 500 s - 120 s overlap
    m.set_hwm("shiny", T0 + 500 * US)
    delta = m.take_delta()
    bound = T0 + 380 * US
    assert delta.horizons == {space: bound for space in delta.horizons}
    assert set(delta.horizons) >= {"shiny", "visits"}
    written = {k: v for k, v in delta.keys["visits"].items() if v is not None and v[1] >= bound}
    assert list(written) == [recent[:-1]]
    assert list(m.visits) == [recent[:-1]]
    # The open session stays (pinned); the closed ones are below the horizon, unpinned: the
    # store writes none of them and deletes the row of the one it held as open.
    shiny = delta.keys["shiny"]
    assert shiny[("app", "u2", T0 + 2 * US)] == (OPEN, T0 + 2 * US, True)
    assert shiny[("app", "u3", T0 + 3 * US)] == (CLOSED, T0 + 30 * US, False)
    assert set(m.sessions) == {("app", "u2", T0 + 2 * US)}
    # The counts are all there, and a walk from the mark meets nothing it could count again.
    assert m.view((T0 + 600 * US) / US).content_visits_total == {"doc": 2}
    m.apply_visits([old, recent], walk(m, "visits"))
    m.apply_shiny([s_old, s_open, s_was_open], walk(m, "shiny"), T0 + 600 * US)
    view = m.view((T0 + 600 * US) / US)
    assert view.content_visits_total == {"doc": 2}
    assert view.shiny_sessions_total == {"app": 3}


def test_a_session_open_on_disk_that_closes_below_the_horizon_gets_its_row_deleted(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    # Found by the SIGKILL test: a session written as open, seen closed by a long catch-up whose
    # end prunes it in the same walk. Its row kept saying open; after the next restart the
    # session showed as running, then as abandoned.
    store = SqliteStore(tmp_path_factory.mktemp("state") / "s.sqlite")
    m = model()
    key = ("app", "u1", T0 + 1 * US)
    m.apply_shiny([session("app", "u1", T0 + 1 * US, None)], walk(m, "shiny"), T0 + 2 * US)
    store.commit(m.take_delta())
    loaded = store.load()
    assert loaded is not None and loaded.keys["shiny"] == {key: (OPEN, T0 + 1 * US)}
    w = walk(m, "shiny")
    m.apply_shiny([session("app", "u1", T0 + 1 * US, T0 + 60 * US)], w, T0 + 3 * 86400 * US)
    m.finish_shiny_walk(w, T0 + 3 * 86400 * US)
    m.set_hwm("shiny", T0 + 3 * 86400 * US)
    store.commit(m.take_delta())
    assert key not in m.sessions
    loaded = store.load()
    assert loaded is not None and loaded.keys.get("shiny", {}) == {}
    again = UsageModel(rules(), loaded)
    assert again.view(T0 / US + 3 * 86400).shiny_sessions_active == {}
    assert m.view(T0 / US + 3 * 86400).shiny_session_duration["app"].count == 1
    store.close()


def test_identical_visits_split_across_commits_keep_the_count_of_the_whole_walk() -> None:
    m = model()
    late = visit("doc", "u2", T0 + 500 * US)
    w = walk(m, "visits")
    m.apply_visits([late], w)
    m.set_hwm("visits", T0 + 500 * US)
    assert m.take_delta().keys["visits"] == {late[:-1]: (1, T0 + 500 * US, False)}
    m.apply_visits([late], w)  # the same walk meets its identical twin after the commit
    assert m.take_delta().keys["visits"] == {late[:-1]: (2, T0 + 500 * US, False)}
    assert m.view((T0 + 600 * US) / US).content_visits_total == {"doc": 2}
    again = walk(m, "visits")  # the next walk re-reads the overlap: both known
    m.apply_visits([late, late], again)
    assert m.view((T0 + 600 * US) / US).content_visits_total == {"doc": 2}


def test_fresh_visits_are_keyed_only_where_a_later_walk_can_meet_them() -> None:
    # A catch-up's visits are fresh (newer than every key): counted as they come, keyed at the
    # delta only from the next walk's start on; the rest never cost a key.
    m = model()
    w = walk(m, "visits")
    early, late = visit("doc", "u1", T0 + 10 * US), visit("doc", "u2", T0 + 500 * US)
    m.apply_visits([early, late, late], w)
    m.set_hwm("visits", T0 + 500 * US)  # the next walk starts at 380 s
    assert m.take_delta().keys["visits"] == {late[:-1]: (2, T0 + 500 * US, False)}
    assert list(m.visits) == [late[:-1]]
    assert m.view((T0 + 600 * US) / US).content_visits_total == {"doc": 3}
    again = walk(m, "visits")
    m.apply_visits([late, late], again)  # the overlap re-reads the twins: known
    assert m.view((T0 + 600 * US) / US).content_visits_total == {"doc": 3}


def test_a_walk_without_a_delta_still_leaves_keys_for_the_next() -> None:
    m = model()
    v = visit("doc", "u1", T0 + 5 * US)
    m.apply_visits([v], walk(m, "visits"))
    second = walk(m, "visits")  # no take_delta between the walks
    m.apply_visits([v], second)
    assert m.view((T0 + 10 * US) / US).content_visits_total == {"doc": 1}
    assert m.take_delta().keys["visits"] == {v[:-1]: (1, T0 + 5 * US, False)}


def test_visits_keyed_by_a_schema_2_digest_count_once_and_take_their_own_keys() -> None:
    # A state file from before visits were keyed by their fields holds digests: a visit as old
    # as them is looked up by its digest, and the key moves to the visit's own.
    from exporter.model import LEGACY_SPACE, ModelState, legacy_digest

    v = visit("doc", "u1", T0 + 5 * US)
    state = ModelState(
        counting_since=T0,
        marks={"shiny": T0 + 10 * US, "visits": T0 + 10 * US},
        counters={("content_visits", "doc"): 2},
        keys={LEGACY_SPACE: {(legacy_digest(v),): (2, T0 + 5 * US)}},
    )
    m = UsageModel(rules(), state)
    m.apply_visits([v, v, v], walk(m, "visits"))  # the two counted before, and a third
    assert m.view((T0 + 10 * US) / US).content_visits_total == {"doc": 3}
    delta = m.take_delta()
    assert delta.keys[LEGACY_SPACE] == {(legacy_digest(v),): None}
    assert delta.keys["visits"] == {v[:-1]: (3, T0 + 5 * US, False)}


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    gaps=st.lists(st.sampled_from([0, 0, 1, 30, 90, 200]), min_size=1, max_size=40),
    users=st.lists(st.sampled_from(["u1", "u2"]), min_size=40, max_size=40),
    cuts=st.lists(st.integers(0, 40), max_size=6),
    crashes=st.sets(st.integers(0, 40), max_size=3),
)
def test_visits_count_exactly_once_across_commits_and_crashes(
    tmp_path_factory: pytest.TempPathFactory,
    gaps: list[int],
    users: list[str],
    cuts: list[int],
    crashes: set[int],
) -> None:
    """A Connect listing visits (identical ones too) read by walks that commit at random
    points and crash at others: every visit counts once."""
    times = [T0 + 5 * US + sum(gaps[: i + 1]) * US for i in range(len(gaps))]
    listed = [visit("doc", users[i], t) for i, t in enumerate(times)]
    store = SqliteStore(tmp_path_factory.mktemp("state") / "s.sqlite")
    m = model()
    store.commit(m.take_delta())
    walks = 0
    while True:
        walks += 1
        w = walk(m, "visits")
        todo = [v for v in listed if v.time >= w.start_us]
        crashed = False
        for i, v in enumerate(todo):
            m.apply_visits([v], w)
            m.set_hwm("visits", v.time)
            if i in cuts:
                store.commit(m.take_delta())
            if i in crashes and walks <= 3:
                crashed = True
                break
        if crashed:
            loaded = store.load()  # a restart: what was not committed is gone
            assert loaded is not None
            m = UsageModel(rules(), loaded)
            continue
        store.commit(m.take_delta())
        if walks >= 4:
            break
    assert m.view(times[-1] / US).content_visits_total == {"doc": len(listed)}
    store.close()


def hit(hit_id: str, content: str, t: int, ua: str | None = "Mozilla/5.0") -> Hit:
    return Hit(hit_id, content, "u1", t, "/", ua)


def test_hits_count_once_by_id_across_walks_and_a_restore_and_feed_nothing_else(
    tmp_path: Path,
) -> None:
    store = SqliteStore(tmp_path / "s.sqlite")
    m = UsageModel(rules())
    m.start_counting(T0, ("shiny", "visits", "hits"))
    page = [
        hit("7", "a", T0 - 1 * US),  # before the origin: never counted
        hit("8", "a", T0 + 5 * US),
        hit("9", "a", T0 + 5 * US),  # same time, same fields, another id: another hit
        hit("10", "b", T0 + 6 * US, ua="ContentHealthMonitor/2025.04.0"),
    ]
    for _ in range(2):  # the overlap reads a page again
        w = walk(m, "hits")
        m.apply_hits(page, w, T0 + 10 * US)
    m.set_hwm("hits", T0 + 7 * US)
    store.commit(m.take_delta())
    view = m.view(T0 / US + 10)
    assert dict(view.content_hits_total) == {"a": 2}
    assert dict(view.excluded_events_total) == {("hits", "synthetic"): 1}
    # Hits repeat the visits and sessions: no activity, users or viewers of their own.
    assert view.content_last_activity == {} and view.active_users["24h"] == 0
    loaded = store.load()
    store.close()
    assert loaded is not None
    again = UsageModel(rules(), loaded)
    w = again.walk_tally("hits")
    again.apply_hits([*page, hit("11", "b", T0 + 8 * US)], w, T0 + 20 * US)
    assert (w.new_events, w.excluded) == (1, 0)
    assert dict(again.view(T0 / US + 20).content_hits_total) == {"a": 2, "b": 1}


def test_a_stream_the_first_start_did_not_read_starts_at_the_origin() -> None:
    m = UsageModel(replace(rules(), history_us=86400 * US))
    m.start_counting(T0, ("shiny", "visits"))
    assert "hits" not in m.hwm
    m.add_streams(("shiny", "visits", "hits"))
    assert m.walk_start("hits") == m.counting_since == T0 - 86400 * US
    assert m.hwm["shiny"] == T0 - 30 * 86400 * US + OVERLAP  # the others keep their marks
