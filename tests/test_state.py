"""The SQLite state: round trips, atomic batches, and clear errors for files it cannot use."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from exporter.model import US, UsageModel, WalkTally
from exporter.records import ShinySession, Visit
from exporter.state import StateError, StateStore

T0 = 1_700_000_000 * US


def fresh() -> UsageModel:
    return UsageModel(overlap_us=120 * US, max_session_age_us=86400 * US, track_user_hours=True)


def populated() -> UsageModel:
    m = fresh()
    m.start_counting(T0, ("shiny", "visits"))
    w = WalkTally(start_us=m.walk_start("shiny"))
    m.apply_shiny(
        [
            ShinySession("a", "u1", T0 + 1 * US, T0 + 61 * US, 1),
            ShinySession("a", None, T0 + 2 * US, None, 1),
        ],
        w,
        T0 + 100 * US,
    )
    m.apply_visits(
        [Visit("d", "u2", T0 + 3 * US, None, None, "1", 3, "/", "x")],
        WalkTally(start_us=m.walk_start("visits")),
    )
    m.set_hwm("shiny", T0 + 50 * US)
    return m


def comparable(m: UsageModel) -> tuple[object, ...]:
    return (
        m.counting_since,
        m.hwm,
        m.counters,
        m.duration_counts,
        m.duration_sums,
        m.shiny_keys,
        m.visit_keys,
        m.user_last,
        m.pair_last,
        m.content_last,
        m.user_hours,
    )


def test_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite"
    store = StateStore(path)
    m = populated()
    store.commit(m.take_delta())
    store.close()
    again = fresh()
    store = StateStore(path)
    assert store.restore(again) is True
    assert comparable(again) == comparable(m)
    assert again.take_delta().is_empty()
    store.close()


def test_empty_file_has_no_epoch(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "s.sqlite")
    assert store.restore(fresh()) is False
    store.close()


def test_failed_batch_leaves_nothing(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    store = StateStore(path)
    m = populated()
    delta = m.take_delta()
    delta.counters.append(("broken", None, 1))  # type: ignore[arg-type]  # NOT NULL violation
    with pytest.raises(sqlite3.IntegrityError):
        store.commit(delta)
    assert store.restore(fresh()) is False  # not even the epoch of the same batch
    store.close()


def test_corrupt_file_names_the_file_and_the_way_out(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StateError) as info:
        StateStore(path)
    assert str(path) in str(info.value)
    assert "Move the file away" in str(info.value)


def test_incompatible_schema_is_refused_not_reset(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite"
    StateStore(path).close()
    db = sqlite3.connect(path)
    db.execute("UPDATE meta SET value='999' WHERE key='schema_version'")
    db.commit()
    db.close()
    with pytest.raises(StateError, match="schema version 999"):
        StateStore(path)
    db = sqlite3.connect(path)
    assert db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone() == ("999",)
    db.close()


def test_foreign_database_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "other.sqlite"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE notes (x)")
    db.commit()
    db.close()
    with pytest.raises(StateError, match="not an exporter state file"):
        StateStore(path)
