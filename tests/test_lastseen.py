"""The compact last-seen structures against plain dicts, and the rows a store loads them from."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from exporter.lastseen import GuidRows, PairLastSeen, PairTimes, UserIndex, UserLastSeen

CONTENT = ["c0", "c1", "c2"]
USERS = [f"u{i}" for i in range(7)]

steps = st.lists(
    st.one_of(
        st.tuples(
            st.just("seen"),
            st.sampled_from(CONTENT),
            st.sampled_from(USERS),
            st.integers(0, 50),
        ),
        st.tuples(
            st.just("prune"),
            st.integers(0, 50),
            st.frozensets(st.sampled_from(USERS), max_size=3),
        ),
    ),
    max_size=80,
)


@given(steps)
def test_pairs_hold_what_a_dict_of_dicts_holds(ops: list[tuple[object, ...]]) -> None:
    """And the users' last times what a dict does, on the index the pairs share."""
    people = UserIndex()
    pairs = PairLastSeen(users=people)
    last = UserLastSeen(people)
    want: dict[str, dict[str, int]] = {}
    want_users: dict[str, int] = {}
    for op in ops:
        if op[0] == "seen":
            _kind, content, user, when = op
            assert isinstance(content, str) and isinstance(user, str) and isinstance(when, int)
            users = want.setdefault(content, {})
            latest = users.get(user, -1) < when
            if latest:
                users[user] = when
            assert pairs.seen(content, user, when) == latest
            newest = want_users.get(user, -1) < when
            if newest:
                want_users[user] = when
            assert last.seen(user, when) == newest
        else:
            _kind, cutoff, keep = op
            assert isinstance(cutoff, int) and isinstance(keep, frozenset)
            gone = sorted(
                (c, u)
                for c, users in want.items()
                for u, t in users.items()
                if t < cutoff and u not in keep
            )
            for c, u in gone:
                del want[c][u]
            want = {c: users for c, users in want.items() if users}
            assert sorted(pairs.forget_before(cutoff, keep)) == gone
            old = sorted(u for u, t in want_users.items() if t < cutoff and u not in keep)
            want_users = {u: t for u, t in want_users.items() if u not in old}
            assert sorted(last.forget_before(cutoff, keep)) == old
        assert pairs.as_dict() == want
        assert last.as_dict() == want_users and len(last) == len(want_users)
        assert sorted(last.values()) == sorted(want_users.values())
        assert all(last.get(u) == want_users.get(u) for u in [*USERS, "never"])
        assert len(pairs) == sum(map(len, want.values()))
        assert bool(pairs) == bool(want)
        for content in CONTENT:
            assert sorted(dict(pairs.times()).get(content, [])) == sorted(
                want.get(content, {}).values()
            )
            for user in USERS:
                assert pairs.get(content, user) == want.get(content, {}).get(user)


def test_loaded_pairs_keep_the_latest_time() -> None:
    pairs = PairLastSeen([("c", "u", 5), ("c", "u", 3), ("d", "u", 1), ("c", "v", 9)])
    assert pairs.as_dict() == {"c": {"u": 5, "v": 9}, "d": {"u": 1}}
    assert pairs.users_of("c") == {"u": 5, "v": 9}
    assert pairs.users_of("nothing") == {}


def test_pair_times_are_a_mapping_of_pairs_to_seconds() -> None:
    times = PairTimes([("c", "u", 1.5), ("c", "v", 2.0), ("d", "u", 0.25)])
    want = {("c", "u"): 1.5, ("c", "v"): 2.0, ("d", "u"): 0.25}
    assert times == want and dict(times.items()) == want and len(times) == 3
    assert times[("d", "u")] == 0.25 and ("d", "v") not in times
    assert PairTimes() == {} and list(PairTimes().items()) == []


def test_guid_rows_give_back_the_rows_added_in_any_batches() -> None:
    names = {i: f"g{i}" for i in range(30)}
    rows = GuidRows(names, "iiq", guids=2)
    added = [(i % 30, (i * 7) % 30, i * 1_000_000_007) for i in range(25_001)]  # > 2 batches
    rows.extend(iter(added[:3]))
    rows.extend(iter(added[3:]))
    rows.extend(iter([]))
    assert len(rows) == len(added)
    assert list(rows) == [(f"g{c}", f"g{u}", t) for c, u, t in added]
    assert list(rows) == list(rows)  # iterable again


@given(
    st.dictionaries(st.sampled_from("abcdefgh"), st.integers(-(2**62), 2**62)),
    st.lists(st.integers(-(2**62), 2**62), min_size=1, max_size=5),
)
def test_users_counted_since_each_threshold_are_those_a_sorted_list_gives(
    last: dict[str, int], thresholds: list[int]
) -> None:
    users = UserLastSeen(UserIndex(), last.items())
    users.forget_before(thresholds[0] // 2)  # some slots made absent
    times = users.values()
    assert users.count_since(thresholds) == [sum(t >= th for t in times) for th in thresholds]
