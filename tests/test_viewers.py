"""ViewerLog's figures against a brute-force count over the same events."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from exporter.lastseen import UserIndex
from exporter.viewers import STARTED, US, VISITED, ViewerLog

WINDOWS = {"24h": 86400, "7d": 7 * 86400}
HOUR = 3600 * US
ITEMS = ("a", "b")
USERS = ("u1", "u2", "u3", "u4")


def brute(
    events: list[tuple[str, str, int, int]], now: int, top_viewers: int, top_users: int
) -> tuple[
    dict[tuple[str, str, str], tuple[int, int, int]], dict[tuple[str, str], tuple[int, int]]
]:
    viewers: dict[tuple[str, str, str], tuple[int, int, int]] = {}
    users: dict[tuple[str, str], tuple[int, int]] = {}
    for window, seconds in WINDOWS.items():
        figures: dict[tuple[str, str], list[int]] = {}
        for content, user, when, value in events:
            if when < now - seconds * US:
                continue
            row = figures.setdefault((content, user), [0, 0, 0])
            if value == STARTED:
                row[0] += 1
            elif value == VISITED:
                row[2] += 1
            else:
                row[1] += value
        totals: dict[str, list[int]] = {}
        for content in ITEMS:
            members = sorted(
                (-(f[0] + f[2]), u) for (c, u), f in figures.items() if c == content and f[0] + f[2]
            )
            for _w, user in members[:top_viewers]:
                f = figures[content, user]
                viewers[content, user, window] = (f[0], f[1], f[2])
        for (_c, user), f in figures.items():
            total = totals.setdefault(user, [0, 0])
            total[0] += f[0]
            total[1] += f[2]
        ranked = sorted((-(t[0] + t[1]), u) for u, t in totals.items() if t[0] + t[1])
        for _w, user in ranked[:top_users]:
            users[user, window] = (totals[user][0], totals[user][1])
    return viewers, users


event = st.tuples(
    st.sampled_from(ITEMS),
    st.sampled_from(USERS),
    st.integers(0, 8 * 24).map(lambda h: h * HOUR),  # over 8 days, whole hours: on the edges
    st.one_of(st.just(STARTED), st.just(VISITED), st.integers(0, 2 * HOUR)),
)


@given(
    batches=st.lists(st.tuples(st.lists(event, max_size=8), st.integers(0, 10 * 24)), max_size=8),
    top_viewers=st.integers(1, 3),
    top_users=st.integers(1, 3),
    shared=st.booleans(),
)
def test_figures_equal_a_brute_force_count_as_events_come_and_time_moves(
    batches: list[tuple[list[tuple[str, str, int, int]], int]],
    top_viewers: int,
    top_users: int,
    shared: bool,
) -> None:
    """Events in any order, views at times going forward and back, prunes between them; with
    a user index shared with others (as the model's last-seen pairs share it), which give
    users indexes before and between the log's own."""
    people = UserIndex()
    log = ViewerLog(WINDOWS, users=people if shared else None)
    kept: list[tuple[str, str, int, int]] = []
    for n, (added, hour) in enumerate(batches):
        people.of(f"elsewhere{n}")
        for e in added:
            log.add(*e)
            kept.append(e)
        now = hour * HOUR
        view = log.view(now, top_viewers, top_users)
        viewers, users = brute(kept, now, top_viewers, top_users)
        assert dict(view.viewers) == viewers
        assert dict(view.users) == users
        bound = now - 7 * 86400 * US - HOUR  # before every window of this view
        log.prune(bound)
        left = sorted(log.events())
        gone = sorted(kept)
        for e in left:
            gone.remove(e)
        assert all(e[2] < bound for e in gone)
        kept = left
    again = ViewerLog(WINDOWS, log.events())  # as a store would give them back
    if batches:
        now = batches[-1][1] * HOUR
        assert again.view(now, top_viewers, top_users) == log.view(now, top_viewers, top_users)


@given(
    events=st.lists(event, max_size=30),
    cut_hours=st.integers(0, 8 * 24),
    later_hours=st.integers(0, 3 * 24),
    viewed_first=st.booleans(),
)
def test_a_prune_forgets_the_events_before_it_with_or_without_a_view_made(
    events: list[tuple[str, str, int, int]], cut_hours: int, later_hours: int, viewed_first: bool
) -> None:
    # A first start's catch-up makes no views (nothing windowed is shown until it is complete),
    # yet its walks prune: the events before the cut go, and the figures stay right.
    log = ViewerLog(WINDOWS)
    for e in events:
        log.add(*e)
    cut = cut_hours * HOUR
    if viewed_first:
        log.view(cut, 3, 3)
    log.prune(cut)
    kept = [e for e in events if e[2] >= cut]
    assert len(log) == len(kept)
    # Any later view (the largest window from the cut on, as the model prunes) sees what a log
    # of only the kept events sees.
    now = cut + max(WINDOWS.values()) * US + later_hours * HOUR
    fresh = ViewerLog(WINDOWS)
    for e in kept:
        fresh.add(*e)
    got, want = log.view(now, 3, 3), fresh.view(now, 3, 3)
    assert dict(got.viewers) == dict(want.viewers) and got.users == want.users


def test_a_window_reaching_back_past_a_prune_floor_counts_each_end_for_its_own_session() -> None:
    # A prune's floor stands above the next view's window start: events added in between are
    # inside again, and each session's end keeps its own duration (found by the ends' times).
    log = ViewerLog({"w": 10})
    log.view(100 * US, 5, 5)
    log.prune(95 * US)
    log.add("c", "a", 92 * US, 500)
    log.view(101 * US, 5, 5)
    log.add("c", "b", 92 * US, STARTED)
    log.add("c", "b", 95 * US, 700)
    view = log.view(102 * US, 5, 5)
    assert dict(view.viewers) == {("c", "b", "w"): (1, 700, 0)}  # a's end alone: no viewer
