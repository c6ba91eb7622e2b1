"""The exactly-once rules of the usage model, record by record."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from exporter.model import ABANDONED, CLOSED, OPEN, US, UsageModel, WalkTally
from exporter.records import ShinySession, Visit
from exporter.state import StateStore

T0 = 1_700_000_000 * US
OVERLAP = 120 * US


def model(**kw: object) -> UsageModel:
    m = UsageModel(
        overlap_us=OVERLAP,
        max_session_age_us=24 * 3600 * US,
        exclude_user_agents=("ContentHealthMonitor/",),
        **kw,  # type: ignore[arg-type]
    )
    m.start_counting(T0, ("shiny", "visits"))
    return m


def session(content: str, user: str | None, started: int, ended: int | None) -> ShinySession:
    return ShinySession(content, user, started, ended, 1)


def visit(content: str, user: str | None, t: int, ua: str | None = "Mozilla/5.0") -> Visit:
    return Visit(content, user, t, None, None, "7", 3, "/", ua)


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
    assert m.shiny_keys[("a", "u1", T0 + 10 * US)] == (CLOSED, T0 + 100 * US)


def test_history_before_epoch_fills_windows_but_not_counters() -> None:
    m = model()
    old = session("a", "u1", T0 - 3600 * US, T0 - 3000 * US)
    running = session("a", "u2", T0 - 600 * US, None)
    w = WalkTally(start_us=T0 - 30 * 86400 * US)
    m.apply_shiny([old, running], w, T0)
    view = m.view(T0 / US)
    assert view.shiny_sessions_total == {}
    assert view.active_users == {"1h": 2, "24h": 2, "7d": 2, "30d": 2}
    assert ("a", "u1", T0 - 3600 * US) not in m.shiny_keys  # nothing to de-dup before T0
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


def test_records_before_walk_start_are_ignored_and_keys_prune() -> None:
    m = model()
    v = visit("doc", "u1", T0 + 5 * US)
    m.apply_visits([v], walk(m, "visits"))
    m.set_hwm("visits", T0 + 5 * US + OVERLAP + 10 * US)
    m.prune("visits")
    assert m.visit_keys == {}
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
    assert m.shiny_keys[("a", "u1", T0 + 1 * US)][0] == ABANDONED
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
        m.prune("shiny")
    view = m.view(later / US)
    assert view.shiny_sessions_total == {"a": 1}
    assert view.shiny_sessions_abandoned_total == {"a": 1}
    assert m.shiny_keys[("a", "u1", T0 + 1 * US)][0] == ABANDONED


def test_delta_holds_exactly_the_changes() -> None:
    m = model()
    m.take_delta()
    assert m.take_delta().is_empty()
    m.apply_shiny([session("a", "u1", T0 + 1 * US, None)], walk(m, "shiny"), T0 + 2 * US)
    delta = m.take_delta()
    assert delta.counters == [("shiny_sessions", "a", 1)]
    assert delta.shiny_upserts == [("a", "u1", T0 + 1 * US, OPEN, T0 + 1 * US)]
    assert delta.user_last == [("u1", T0 + 1 * US)]
    assert m.take_delta().is_empty()


def test_keys_below_the_committed_mark_minus_overlap_are_dropped_not_written() -> None:
    # A long walk meets most of its keys after the mark has passed them by more than the
    # overlap: no later walk can return those records, so they are not written at all.
    m = model()
    m.apply_shiny([session("app", "u3", T0 + 3 * US, None)], walk(m, "shiny"), T0 + 4 * US)
    assert m.take_delta().shiny_upserts  # written as open
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
    assert [row[2] for row in delta.visit_upserts] == [T0 + 500 * US]
    assert len(m.visit_keys) == 1
    assert [row[:3] for row in delta.shiny_upserts] == [("app", "u2", T0 + 2 * US)]  # open
    # Only the row that says "open" is deleted; the other dropped key never had a row.
    assert delta.shiny_deletes == [("app", "u3", T0 + 3 * US)]
    # The counts are all there, and a walk from the mark meets nothing it could count again.
    assert m.view((T0 + 600 * US) / US).content_visits_total == {"doc": 2}
    m.apply_visits([old, recent], walk(m, "visits"))
    m.apply_shiny([s_old, s_open, s_was_open], walk(m, "shiny"), T0 + 600 * US)
    view = m.view((T0 + 600 * US) / US)
    assert view.content_visits_total == {"doc": 2}
    assert view.shiny_sessions_total == {"app": 3}


def test_a_session_open_on_disk_that_closes_below_the_prune_bound_gets_its_row_deleted() -> None:
    # Found by the SIGKILL test: a session written as open, seen closed by a long catch-up whose
    # end prunes it in the same walk. The prune's range delete only removes closed rows, so the
    # row kept saying open; after the next restart the session showed as running, then as
    # abandoned.
    m = model()
    key = ("app", "u1", T0 + 1 * US)
    m.apply_shiny([session("app", "u1", T0 + 1 * US, None)], walk(m, "shiny"), T0 + 2 * US)
    assert m.take_delta().shiny_upserts == [(*key, OPEN, T0 + 1 * US)]
    w = walk(m, "shiny")
    m.apply_shiny([session("app", "u1", T0 + 1 * US, T0 + 60 * US)], w, T0 + 3 * 86400 * US)
    m.finish_shiny_walk(w, T0 + 3 * 86400 * US)
    m.set_hwm("shiny", T0 + 3 * 86400 * US)
    m.prune("shiny")
    delta = m.take_delta()
    assert key in delta.shiny_deletes
    assert key not in m.shiny_keys and key not in m.shiny_open_on_disk
    assert m.view(T0 / US + 3 * 86400).shiny_session_duration["app"].count == 1


def test_fresh_visits_get_keys_only_inside_the_overlap_with_their_multiplicity() -> None:
    m = model()
    w = walk(m, "visits")
    assert w.fresh_after == -1  # no key yet: every visit of this walk is fresh
    early, late = visit("doc", "u1", T0 + 10 * US), visit("doc", "u2", T0 + 500 * US)
    m.apply_visits([early, early, late], w)
    assert m.visit_keys == {}  # nothing hashed while applying
    m.set_hwm("visits", T0 + 500 * US)
    delta = m.take_delta()
    assert [(row[1], row[2]) for row in delta.visit_upserts] == [(1, T0 + 500 * US)]
    # The same walk meets an identical late visit after the commit: its key counts both.
    m.apply_visits([late], w)
    delta = m.take_delta()
    assert [(row[1], row[2]) for row in delta.visit_upserts] == [(2, T0 + 500 * US)]
    assert m.view((T0 + 600 * US) / US).content_visits_total == {"doc": 4}
    # The next walk re-reads the overlap: both late visits are known, nothing counts again.
    again = walk(m, "visits")
    assert again.fresh_after == T0 + 500 * US
    m.apply_visits([late, late], again)
    assert m.view((T0 + 600 * US) / US).content_visits_total == {"doc": 4}


def test_a_known_visit_on_a_page_with_fresh_ones_keeps_the_count_of_the_whole_walk() -> None:
    # Fresh visits are remembered by page: a page can also hold visits older than the newest
    # key (not fresh), whose keys already carry how often the whole walk met them. Keying them
    # again from that page alone would undercount twins split across pages, and count again.
    m = model()
    a = visit("doc", "u1", T0 + 10 * US)
    m.apply_visits([a], walk(m, "visits"))
    m.set_hwm("visits", T0 + 20 * US)
    m.take_delta()
    second = walk(m, "visits")
    assert second.fresh_after == T0 + 10 * US
    b = visit("doc", "u2", T0 + 30 * US)
    m.apply_visits([a], second)  # the known visit, then its twin (written late) with a fresh one
    m.apply_visits([a, b], second)
    m.set_hwm("visits", T0 + 40 * US)
    m.take_delta()
    assert m.view((T0 + 50 * US) / US).content_visits_total == {"doc": 3}
    third = walk(m, "visits")
    m.apply_visits([a, a, b], third)
    assert m.view((T0 + 50 * US) / US).content_visits_total == {"doc": 3}


def test_a_walk_without_a_delta_still_leaves_keys_for_the_next() -> None:
    m = model()
    v = visit("doc", "u1", T0 + 5 * US)
    m.apply_visits([v], walk(m, "visits"))
    second = walk(m, "visits")  # no take_delta between the walks
    assert second.fresh_after == T0 + 5 * US
    m.apply_visits([v], second)
    assert m.view((T0 + 10 * US) / US).content_visits_total == {"doc": 1}
    assert [row[1:] for row in m.take_delta().visit_upserts] == [(1, T0 + 5 * US)]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
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
    points and crash at others: every visit counts once, whatever was fresh or keyed."""
    times = [T0 + 5 * US + sum(gaps[: i + 1]) * US for i in range(len(gaps))]
    listed = [visit("doc", users[i], t) for i, t in enumerate(times)]
    store = StateStore(tmp_path_factory.mktemp("state") / "s.sqlite")
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
            m = model()  # a restart: what was not committed is gone
            assert store.restore(m)
            continue
        m.prune("visits")
        store.commit(m.take_delta())
        if walks >= 4:
            break
    assert m.view(times[-1] / US).content_visits_total == {"doc": len(listed)}
    store.close()
