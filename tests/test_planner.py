"""The catch-up planner, alone: slices cut, split, shared and resized, with no I/O."""

from __future__ import annotations

import pytest

from exporter.planner import (
    AHEAD_MAX_PER_READER,
    FIRST_SLICES,
    SLICE_MIN_WIDTH_US,
    SLICE_RECORDS,
    Plan,
    Slice,
)

US = 1_000_000


def test_an_unsliced_plan_is_one_open_slice() -> None:
    plan = Plan(5)
    plan.extend()
    assert [(r.lo, r.hi, r.first) for r in plan.order] == [(5, None, True)]
    run = plan.take()
    assert run is plan.order[0] and run.reading
    assert plan.take() is None  # nobody else may read it


def test_a_catchup_is_cut_in_small_first_slices_up_to_the_read_ahead() -> None:
    span = 30 * 86400 * US
    plan = Plan.for_walk(0, span, readers=4)
    assert plan.width == span // FIRST_SLICES
    assert plan.ahead_range == (5, AHEAD_MAX_PER_READER * 4)
    plan.extend()
    assert len(plan.order) == plan.ahead + 1  # the head and `ahead` slices after it
    assert [r.first for r in plan.order] == [True] + [False] * plan.ahead
    assert all(a.hi == b.lo for a, b in zip(plan.order, plan.order[1:], strict=False))  # tiled
    taken = [plan.take() for _ in range(plan.ahead + 2)]
    assert taken[-1] is None  # no slice beyond the read-ahead
    assert taken[:-1] == plan.order


def test_the_last_slice_runs_open_to_now() -> None:
    plan = Plan(0, now_us=10 * 60 * US, width_us=4 * 60 * US, ahead=10)
    plan.extend()
    assert [(r.lo, r.hi) for r in plan.order] == [
        (0, 240 * US),
        (240 * US, 480 * US),
        (480 * US, None),
    ]
    assert plan.cut_all


def test_a_dense_first_page_splits_its_slice() -> None:
    plan = Plan(0, now_us=100 * 3600 * US, width_us=3600 * US, ahead=2)
    plan.extend()
    head = plan.order[0]
    # 500 records within the first 10 s of an hour-wide slice: ~180,000 in the slice.
    assert plan.split(head, 500, 0, 10 * US)
    expected = 10 * (10 * US + 1)  # SLICE_RECORDS at that density: 10 times the page's span
    assert head.hi == expected
    assert plan.width == expected
    assert (plan.order[1].lo, plan.order[1].hi) == (expected, 3600 * US)  # the rest, next
    # A sparse first page, or too few records to tell, splits nothing.
    other = plan.order[2]
    assert not plan.split(other, 500, other.lo, other.lo + 3000 * US)
    assert not plan.split(other, 50, other.lo, other.lo + US)


def test_a_slice_past_twice_the_target_is_cut_after_the_page_in_hand() -> None:
    plan = Plan(0, now_us=100 * 3600 * US, width_us=3600 * US, ahead=1)
    plan.extend()
    head = plan.order[0]
    head.records = 2 * SLICE_RECORDS - 1
    assert not plan.cut(head, 60 * US)
    head.records += 1
    assert plan.cut(head, 60 * US)
    assert (head.lo, head.hi) == (0, 60 * US + 1)
    assert (plan.order[1].lo, plan.order[1].hi) == (60 * US + 1, 3600 * US)


def test_learn_resizes_the_next_slices_by_how_full_this_one_was() -> None:
    plan = Plan(0, now_us=100 * 3600 * US, width_us=3600 * US)
    full = Slice(0, 3600 * US, first=True, records=4 * SLICE_RECORDS)
    plan.learn(full)
    assert plan.width == 900 * US
    sparse = Slice(0, 3600 * US, first=True, records=1)
    plan.learn(sparse)
    assert plan.width == 1800 * US  # grows at most twofold a slice
    empty = Slice(0, 10 * US, first=True, records=10**9)
    plan.learn(empty)
    assert plan.width == SLICE_MIN_WIDTH_US


def test_share_head_partitions_the_unread_rest_of_the_head_only() -> None:
    plan = Plan(0, now_us=10_000_000, width_us=1_000_000, ahead=4)
    plan.extend()
    head, after = plan.order[0], plan.order[1]
    head.records = 1000  # 1000 records in [0, 100_000): 10 per µs-per-thousand
    plan.idle_readers = 3
    assert not plan.share_head(after, 50)  # not the head
    assert plan.share_head(head, 99_999)
    # Cut after the last record read; the rest [100_000, 1_000_000) in idle + 1 = 4 pieces.
    bounds = [(r.lo, r.hi) for r in plan.order[:6]]
    assert bounds == [
        (0, 100_000),
        (100_000, 325_000),
        (325_000, 550_000),
        (550_000, 775_000),
        (775_000, 1_000_000),
        (after.lo, after.hi),
    ]
    plan.idle_readers = 0
    assert not plan.share_head(plan.order[0], 50_000)  # nobody idle to take pieces
    plan.idle_readers = 2
    head.records = 10  # sparse: the rest holds less than two pages per piece
    head.hi = 200_000
    assert not plan.share_head(head, 100_000)


def test_read_ahead_grows_while_the_apply_waits_and_shrinks_when_it_does_not() -> None:
    plan = Plan(0, now_us=10_000_000, width_us=1_000_000, ahead=5, ahead_max=16)
    waiting, read = Slice(0, 1, first=False), Slice(0, 1, first=False)
    read.read_done = True
    seen = []
    for head in (waiting, waiting, waiting, read, read, waiting, *[read] * 20):
        plan.adapt(head)
        seen.append(plan.ahead)
    assert seen[:6] == [10, 16, 16, 15, 14, 16]
    assert seen[-1] == 5


@pytest.mark.parametrize(
    ("times", "owned"),
    [
        ([100, 150, 199], [100, 150, 199]),  # the whole page: taken as is
        ([100, 150, 200], [100, 150]),  # a record at `hi` belongs to the next slice
        ([99, 100, 199], [100, 199]),  # and one before `lo` to the slice before
        ([99, 150, 200], [150]),
    ],
)
def test_a_slice_owns_exactly_the_records_in_lo_hi(times: list[int], owned: list[int]) -> None:
    # Slices partition the records by sort time, [lo, hi): a record on a bound in two slices
    # would count twice, in none not at all. A page wholly inside is taken as it is.
    records = [f"r{t}" for t in times]
    run = Slice(100, 200, first=False)
    mine = Plan.owned(run, records, times, reaches_back=False)
    assert mine == [f"r{t}" for t in owned]
    if owned == times:
        assert mine is records
    # The walk's first slice of a stream that reaches back owns what sorts before it too.
    first = Slice(100, 200, first=True)
    assert Plan.owned(first, records, times, reaches_back=True) == [
        f"r{t}" for t in times if t < 200
    ]
