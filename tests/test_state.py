"""The SQLite state: round trips, atomic batches, and clear errors for files it cannot use."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from exporter import state as state_module
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


def reopened_equals(path: Path, m: UsageModel) -> UsageModel:
    """Open the file afresh, restore, and check it holds `m`; the restored model."""
    again = fresh()
    store = StateStore(path)
    assert store.restore(again) is True
    assert comparable(again) == comparable(m)
    store.close()
    return again


def test_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite"
    store = StateStore(path)
    m = populated()
    store.commit(m.take_delta())
    store.close()
    assert reopened_equals(path, m).take_delta().is_empty()


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


def _downgrade_to_v1(path: Path) -> None:
    """Rewrite a file's last-seen tables the way schema 1 kept them: guid text, no ids."""
    db = sqlite3.connect(path)
    g = "(SELECT guid FROM guids WHERE id = {})"
    for table in ("user_last", "user_last_log"):
        db.execute(f"CREATE TABLE {table}_x (user_guid TEXT NOT NULL, last INTEGER NOT NULL)")
        db.execute(f"INSERT INTO {table}_x SELECT {g.format('user_id')}, last FROM {table}")
    for table in ("pair_last", "pair_last_log"):
        db.execute(
            f"CREATE TABLE {table}_x (content_guid TEXT NOT NULL, user_guid TEXT NOT NULL, "
            "last INTEGER NOT NULL)"
        )
        db.execute(
            f"INSERT INTO {table}_x SELECT {g.format('content_id')}, {g.format('user_id')}, "
            f"last FROM {table}"
        )
    for table in ("user_last", "user_last_log", "pair_last", "pair_last_log", "guids"):
        db.execute(f"DROP TABLE {table}")
    for table in ("user_last", "user_last_log", "pair_last", "pair_last_log"):
        db.execute(f"ALTER TABLE {table}_x RENAME TO {table}")
    db.execute("UPDATE meta SET value='1' WHERE key='schema_version'")
    db.commit()
    db.close()


def test_schema_1_file_is_migrated_in_place(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite"
    store = StateStore(path)
    m = populated()
    store.commit(m.take_delta())  # pair rows in the log
    m.apply_visits(
        [Visit("e", "u3", T0 + 70 * US, None, None, "1", 3, "/", "x")],
        WalkTally(start_us=m.walk_start("visits")),
    )
    store.commit(m.take_delta())
    store.close()
    _downgrade_to_v1(path)
    store = StateStore(path)
    again = fresh()
    assert store.restore(again) is True
    assert comparable(again) == comparable(m)
    # Ids assigned after the migration do not collide with the migrated ones.
    again.apply_visits(
        [Visit("f", "u4", T0 + 80 * US, None, None, "1", 3, "/", "x")],
        WalkTally(start_us=again.walk_start("visits")),
    )
    store.commit(again.take_delta())
    store.close()
    third = fresh()
    store = StateStore(path)
    assert store.restore(third) is True
    assert comparable(third) == comparable(again)
    assert third.pair_last["f"] == {"u4": T0 + 80 * US}
    store.close()
    db = sqlite3.connect(path)
    assert db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone() == ("2",)
    assert db.execute("SELECT count(*) FROM guids").fetchone() == (8,)  # a d e f, u1..u4
    db.close()


def test_a_failed_batch_gives_back_the_ids_it_took(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    store = StateStore(path)
    m = populated()
    store.commit(m.take_delta())
    m.apply_visits(
        [Visit("e", "u9", T0 + 70 * US, None, None, "1", 3, "/", "x")],
        WalkTally(start_us=m.walk_start("visits")),
    )
    delta = m.take_delta()
    # Written after the last-seen rows, so the ids are taken before the batch fails.
    delta.content_last.append(("broken", None))  # type: ignore[arg-type]  # NOT NULL violation
    with pytest.raises(sqlite3.IntegrityError):
        store.commit(delta)
    delta.content_last.pop()
    store.commit(delta)  # the same guids again: same fresh ids, no UNIQUE clash
    store.close()
    reopened_equals(path, m)


def _tables(path: Path) -> dict[str, list[tuple[object, ...]]]:
    """Every row of every table, with SQLite's storage class of each value."""
    db = sqlite3.connect(path)
    names = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")]
    out: dict[str, list[tuple[object, ...]]] = {}
    for name in sorted(names):
        columns = [r[1] for r in db.execute(f"PRAGMA table_info({name})")]
        select = ", ".join(f"{c}, typeof({c})" for c in columns)
        out[name] = sorted(db.execute(f"SELECT {select} FROM {name}"), key=repr)
    db.close()
    return out


def test_rows_written_from_json_equal_rows_written_one_by_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Commits hand SQLite each table's rows as JSON texts; builds without JSON (or older than
    # 3.38) bind them row by row. Both must leave the same file, value for value and type for
    # type, with text JSON must escape, and rows split over several texts.
    monkeypatch.setattr(state_module, "_JSON_ROWS", 2)
    odd = ['q"uo\\te', "ünï\u00e9cödé ✓", "tab\there", "line\nbreak", "😀"]
    files = []
    for use_json in (True, False):
        path = tmp_path / f"json-{use_json}.sqlite"
        store = StateStore(path)
        store._json = use_json
        m = populated()
        store.commit(m.take_delta())
        walk = WalkTally(start_us=m.walk_start("visits"))
        m.apply_visits(
            [
                Visit(c, u, T0 + (10 + i) * US, None, None, None, None, None, None)
                for i, (c, u) in enumerate(zip(odd, reversed(odd), strict=True))
            ],
            walk,
        )
        m.apply_shiny(
            [ShinySession(odd[0], odd[1], T0 + 20 * US, None, 1)],
            WalkTally(start_us=m.walk_start("shiny")),
            T0 + 100 * US,
        )
        store.commit(m.take_delta())
        store.close()
        reopened_equals(path, m)
        files.append(_tables(path))
    assert files[0] == files[1]
    assert any("😀" in row for row in files[0]["guids"])


def test_this_sqlite_takes_the_json_path(tmp_path: Path) -> None:
    # The path the catch-up figures were measured on; CI's SQLite (Debian 12: 3.40) has it.
    store = StateStore(tmp_path / "s.sqlite")
    assert store._json is (sqlite3.sqlite_version_info >= (3, 38))
    store.close()
