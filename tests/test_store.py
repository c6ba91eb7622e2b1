"""The SQLite store: round trips, atomic batches, migrations, and clear errors for bad files."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import shutil
import sqlite3
from pathlib import Path

import pytest

from exporter.model import (
    CLOSED,
    LEGACY_SPACE,
    OPEN,
    US,
    Baseline,
    Delta,
    ModelState,
    Rules,
    UsageModel,
    WalkTally,
    legacy_digest,
)
from exporter.records import ShinySession, Visit
from exporter.store import SCHEMA_VERSION, SqliteStore, StateError, StateFileGoneError

T0 = 1_700_000_000 * US


def rules() -> Rules:
    return Rules(overlap_us=120 * US, max_session_age_us=86400 * US, top_viewers=5, top_users=5)


def populated() -> UsageModel:
    m = UsageModel(rules())
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
        [Visit("d", "u2", T0 + 3 * US, None, None, "1", "/", "x", 3)],
        WalkTally(start_us=m.walk_start("visits")),
    )
    m.count_malformed("visits", [b'{"bad": 1}'], T0 + 3 * US, WalkTally(start_us=0))
    m.set_hwm("shiny", T0 + 50 * US)
    return m


def comparable(m: UsageModel) -> tuple[object, ...]:
    return (
        m.counting_since,
        m.hwm,
        m.counters,
        m.duration_counts,
        m.duration_sums,
        {space: keys for space, keys in m.keys.items() if keys},
        m.user_last.as_dict(),
        m.pair_last.as_dict(),
        m.content_last,
        sorted(m.viewers.events()) if m.viewers is not None else None,
    )


def reopened_equals(path: Path, m: UsageModel) -> UsageModel:
    """Open the file afresh, load, and check it holds `m`; the loaded model."""
    store = SqliteStore(path)
    state = store.load()
    store.close()
    assert state is not None
    again = UsageModel(rules(), state)
    assert comparable(again) == comparable(m)
    return again


def test_a_load_reads_the_guids_another_writer_added_since_this_store_opened(
    tmp_path: Path,
) -> None:
    path = tmp_path / "state.sqlite"
    first = SqliteStore(path)
    m = UsageModel(rules())
    m.start_counting(T0, ("shiny", "visits"))
    m.apply_visits(
        [Visit("d", "u1", T0 + 1 * US, None, None, None, None, None, 1)],
        WalkTally(start_us=m.walk_start("visits")),
    )
    first.commit(m.take_delta())
    second = SqliteStore(path)  # its id map: the guids as of now
    m.apply_visits(
        [Visit("e", "u2", T0 + 2 * US, None, None, None, None, None, 1)],
        WalkTally(start_us=m.walk_start("visits")),
    )
    first.commit(m.take_delta())  # new guids, ids the second store has not seen
    state = second.load()
    assert state is not None
    again = UsageModel(rules(), state)
    assert comparable(again) == comparable(m)
    first.close()
    second.close()


def test_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite"
    store = SqliteStore(path)
    m = populated()
    store.commit(m.take_delta())
    store.close()
    assert not reopened_equals(path, m).has_changes()


def test_a_round_trip_keeps_text_any_guid_may_hold(tmp_path: Path) -> None:
    odd = ['q"uo\\te', "ünï\u00e9cödé ✓", "tab\there", "line\nbreak", "😀", "[1,2]"]
    path = tmp_path / "s.sqlite"
    store = SqliteStore(path)
    m = populated()
    m.apply_visits(
        [
            Visit(c, u, T0 + (10 + i) * US, c, u, None, c, u, None)
            for i, (c, u) in enumerate(zip(odd, reversed(odd), strict=True))
        ],
        WalkTally(start_us=m.walk_start("visits")),
    )
    m.apply_shiny(
        [ShinySession(odd[0], odd[1], T0 + 20 * US, None, 1)],
        WalkTally(start_us=m.walk_start("shiny")),
        T0 + 100 * US,
    )
    store.commit(m.take_delta())
    store.close()
    reopened_equals(path, m)


def test_empty_file_has_no_state(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "s.sqlite")
    assert store.load() is None
    store.close()


def test_failed_batch_leaves_nothing(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    store = SqliteStore(path)
    delta = populated().take_delta()
    delta.content_last["broken"] = None  # type: ignore[assignment]  # NOT NULL violation
    with pytest.raises(sqlite3.IntegrityError):
        store.commit(delta)
    assert store.load() is None  # not even the epoch of the same batch
    del delta.content_last["broken"]
    store.commit(delta)  # the same batch again, whole
    store.close()


def test_a_pinned_key_stays_past_the_horizon_and_goes_once_unpinned(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    store = SqliteStore(path)
    m = populated()
    store.commit(m.take_delta())
    m.set_hwm("shiny", T0 + 3 * 86400 * US)
    m.set_hwm("visits", T0 + 3 * 86400 * US)
    store.commit(m.take_delta())
    state = store.load()
    assert state is not None
    # Only the open session is left: the closed one and the visit went with the horizon.
    assert state.keys == {"shiny": {("a", "", T0 + 2 * US): (OPEN, T0 + 2 * US)}}
    end = T0 + 3 * 86400 * US - 10 * US  # inside the overlap: its key is still needed
    w = WalkTally(start_us=m.walk_start("shiny"))
    m.apply_shiny([ShinySession("a", None, T0 + 2 * US, end, 1)], w, T0 + 3 * 86400 * US)
    delta = m.take_delta()
    assert delta.keys["shiny"] == {("a", "", T0 + 2 * US): (CLOSED, end, False)}
    store.commit(delta)
    state = store.load()
    assert state is not None
    assert state.keys == {"shiny": {("a", "", T0 + 2 * US): (CLOSED, end)}}
    m.set_hwm("shiny", T0 + 4 * 86400 * US)  # the mark moves on: closed, it goes
    store.commit(m.take_delta())
    state = store.load()
    assert state is not None and state.keys == {}
    store.close()


def test_corrupt_file_names_the_file_and_the_way_out(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StateError) as info:
        SqliteStore(path)
    assert str(path) in str(info.value)
    assert "Move the file away" in str(info.value)


def edit(path: Path, statement: str) -> None:
    """Change the file behind the store's back, as a person with the sqlite3 shell would."""
    db = sqlite3.connect(path)
    db.execute(statement)
    db.commit()
    db.close()


def written(path: Path) -> Path:
    """A state file with counts in it, closed as a stopped exporter leaves it."""
    store = SqliteStore(path)
    store.commit(populated().take_delta())
    store.close()
    return path


def test_a_zero_byte_file_is_refused_not_taken_for_a_first_start(tmp_path: Path) -> None:
    # `truncate -s 0` on the state file: it was opened as new, and every counter restarted at
    # zero with only an INFO line to show for it.
    path = written(tmp_path / "state.sqlite")
    os.truncate(path, 0)
    with pytest.raises(StateError) as info:
        SqliteStore(path)
    message = str(info.value)
    assert message.startswith(f"state file {path} is empty (0 bytes)")
    assert "never taken for a first start" in message and "Move the file away" in message
    assert path.stat().st_size == 0  # left as it was found
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.sqlite"]


def test_an_sqlite_file_without_the_exporters_tables_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite"
    edit(path, "PRAGMA user_version = 1")  # a valid database file with no table at all
    found = path.read_bytes()
    with pytest.raises(StateError, match=r"is empty .*without the exporter's tables"):
        SqliteStore(path)
    assert path.read_bytes() == found  # not even switched to WAL mode


def test_counts_without_a_counting_epoch_are_refused(tmp_path: Path) -> None:
    path = written(tmp_path / "state.sqlite")
    edit(path, "DELETE FROM meta WHERE key = 'counting_since'")
    with pytest.raises(StateError, match="holds counts but no counting epoch"):
        SqliteStore(path)


def test_a_write_ahead_log_without_its_file_is_refused(tmp_path: Path) -> None:
    # The exporter was killed (its WAL holds the last commits), then the file alone deleted.
    store = SqliteStore(tmp_path / "state.sqlite")
    store.commit(populated().take_delta())
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copyfile(tmp_path / "state.sqlite-wal", elsewhere / "state.sqlite-wal")
    store.close()
    with pytest.raises(StateError, match=r"is missing but its write-ahead log .* is there"):
        SqliteStore(elsewhere / "state.sqlite")
    assert not (elsewhere / "state.sqlite").exists()


def test_a_new_file_appears_whole_and_a_start_that_never_committed_is_taken_up_again(
    tmp_path: Path,
) -> None:
    # The file appears with its tables or not at all: a draft left by a crash is cleared.
    path = tmp_path / "state.sqlite"
    (tmp_path / ".state.sqlite.new").write_bytes(b"half a draft")
    store = SqliteStore(path)
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(("-wal", "-shm"))) == [
        "state.sqlite"
    ]
    store.close()
    # Tables, no epoch: a first start that stopped before its first commit (Connect not
    # reachable yet, the port taken). Nothing was counted into it: a first start again.
    store = SqliteStore(path)
    assert store.load() is None
    store.commit(populated().take_delta())
    store.close()
    reopened_equals(path, populated())


HELD = re.compile(r"copy (/proc/\d+/fd/\d+) \(this process still holds the file\)")


@pytest.mark.parametrize("how", ["deleted", "replaced"])
def test_a_file_gone_from_its_path_takes_no_more_commits_and_keeps_them_all(
    tmp_path: Path, how: str
) -> None:
    # `rm state.sqlite*` under a running exporter: it went on committing to the deleted file,
    # which vanished with the process, and the next start counted from zero.
    path = tmp_path / "state.sqlite"
    store = SqliteStore(path)
    m = populated()
    store.commit(m.take_delta())  # in the write-ahead log, not yet in the file itself
    for file in tmp_path.iterdir():
        file.unlink()
    if how == "replaced":
        written(tmp_path / "other.sqlite").rename(path)
    m.set_hwm("visits", T0 + 600 * US)
    with pytest.raises(StateFileGoneError) as info:
        store.commit(m.take_delta())
    message = str(info.value)
    assert message.startswith(
        f"state file {path} was deleted or replaced while the exporter ran: nothing more is "
        "committed, and /metrics keeps the counts last committed. To keep them, copy /proc/"
    )
    assert message.endswith("then restart the exporter; restarted without it, it counts from zero.")
    with pytest.raises(StateFileGoneError):  # for good, whatever is at the path now
        store.commit(Delta())
    assert sorted(p.name for p in tmp_path.iterdir()) == (["state.sqlite"] * (how == "replaced"))
    # The way out the message gives: the file this process holds has every commit it took.
    match = HELD.search(message)
    assert match is not None
    kept = tmp_path / "kept.sqlite"
    shutil.copyfile(match.group(1), kept)
    store.close()
    reopened_equals(kept, populated())


def test_incompatible_schema_is_refused_not_reset(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite"
    SqliteStore(path).close()
    edit(path, "UPDATE meta SET value='999' WHERE key='schema_version'")
    with pytest.raises(StateError, match="schema version 999"):
        SqliteStore(path)
    db = sqlite3.connect(path)
    assert db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone() == ("999",)
    db.close()


def test_foreign_database_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "other.sqlite"
    edit(path, "CREATE TABLE notes (x)")
    with pytest.raises(StateError, match="not an exporter state file"):
        SqliteStore(path)


# --- files of earlier schemas ------------------------------------------------------------------

# The tables of schema 2, as the exporter that wrote them declared them.
SCHEMA_2 = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE hwm (stream TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE counters (
    name TEXT NOT NULL, label TEXT NOT NULL, value INTEGER NOT NULL, PRIMARY KEY (name, label));
CREATE TABLE durations (
    content_guid TEXT PRIMARY KEY, counts TEXT NOT NULL, sum_us INTEGER NOT NULL);
CREATE TABLE shiny_keys (
    started INTEGER NOT NULL, content_guid TEXT NOT NULL, user_guid TEXT NOT NULL,
    state INTEGER NOT NULL, time INTEGER NOT NULL,
    PRIMARY KEY (started, content_guid, user_guid)) WITHOUT ROWID;
CREATE TABLE visit_keys (
    time INTEGER NOT NULL, key BLOB NOT NULL, count INTEGER NOT NULL,
    PRIMARY KEY (time, key)) WITHOUT ROWID;
CREATE TABLE guids (id INTEGER PRIMARY KEY, guid TEXT NOT NULL UNIQUE);
CREATE TABLE user_last (user_id INTEGER PRIMARY KEY, last INTEGER NOT NULL);
CREATE TABLE pair_last (
    content_id INTEGER NOT NULL, user_id INTEGER NOT NULL, last INTEGER NOT NULL,
    PRIMARY KEY (content_id, user_id)) WITHOUT ROWID;
CREATE TABLE user_last_log (user_id INTEGER NOT NULL, last INTEGER NOT NULL);
CREATE TABLE pair_last_log (
    content_id INTEGER NOT NULL, user_id INTEGER NOT NULL, last INTEGER NOT NULL);
CREATE TABLE content_last (content_guid TEXT PRIMARY KEY, last INTEGER NOT NULL);
CREATE TABLE user_hours (
    user_guid TEXT NOT NULL, hour INTEGER NOT NULL, count INTEGER NOT NULL,
    PRIMARY KEY (user_guid, hour)) WITHOUT ROWID;
"""
BUCKETS = (
    "1.0,5.0,15.0,30.0,60.0,120.0,300.0,600.0,1200.0,1800.0,3600.0,7200.0,14400.0,28800.0,86400.0"
)
V = Visit("d", "u2", T0 + 3 * US, None, None, "1", "/", "x", 3)


def _schema_2_file(path: Path) -> None:
    db = sqlite3.connect(path)
    db.executescript(SCHEMA_2)
    db.executemany(
        "INSERT INTO meta VALUES (?, ?)",
        [("schema_version", "2"), ("duration_buckets", BUCKETS), ("counting_since", str(T0))],
    )
    db.executemany("INSERT INTO hwm VALUES (?, ?)", [("shiny", T0 + 50 * US), ("visits", T0)])
    db.executemany(
        "INSERT INTO counters VALUES (?, ?, ?)",
        [("shiny_sessions", "a", 2), ("content_visits", "d", 1)],
    )
    db.execute(
        "INSERT INTO durations VALUES ('a', ?, 60000000)",
        (",".join(["0"] * 4 + ["1"] + ["0"] * 11),),
    )
    db.executemany(
        "INSERT INTO shiny_keys VALUES (?, ?, ?, ?, ?)",
        [(T0 + 1 * US, "a", "u1", 1, T0 + 61 * US), (T0 + 2 * US, "a", "", 0, T0 + 2 * US)],
    )
    digest = bytes.fromhex(legacy_digest(V))
    db.execute("INSERT INTO visit_keys VALUES (?, ?, 1)", (T0 + 3 * US, digest))
    db.executemany("INSERT INTO guids VALUES (?, ?)", [(1, "a"), (2, "u1"), (3, "d"), (4, "u2")])
    db.executemany("INSERT INTO user_last VALUES (?, ?)", [(2, T0 + 61 * US), (4, T0)])
    db.execute("INSERT INTO user_last_log VALUES (4, ?)", (T0 + 3 * US,))
    db.execute("INSERT INTO pair_last VALUES (1, 2, ?)", (T0 + 61 * US,))
    db.execute("INSERT INTO pair_last_log VALUES (3, 4, ?)", (T0 + 3 * US,))
    db.executemany(
        "INSERT INTO content_last VALUES (?, ?)", [("a", T0 + 61 * US), ("d", T0 + 3 * US)]
    )
    db.execute("INSERT INTO user_hours VALUES ('u2', ?, 1)", ((T0 + 3 * US) // (3600 * US),))
    db.commit()
    db.close()


def _folded(state: ModelState | None) -> ModelState | None:
    """`state` with its last-seen rows folded (the latest of a key's rows) and its viewer
    events listed: comparable with another state's."""
    if state is None:
        return None
    users: dict[str, int] = {}
    for user, last in state.user_last:
        users[user] = max(last, users.get(user, last))
    pairs: dict[tuple[str, str], int] = {}
    for content, user, last in state.pair_last:
        pairs[content, user] = max(last, pairs.get((content, user), last))
    return dataclasses.replace(
        state,
        user_last=sorted(users.items()),
        pair_last=sorted((c, u, t) for (c, u), t in pairs.items()),
        viewer_events=list(state.viewer_events),
    )


def _expected_migrated() -> ModelState:
    counters = {("shiny_sessions", "a"): 2, ("content_visits", "d"): 1}
    durations = {"a": ([0] * 4 + [1] + [0] * 11, 60 * US)}
    return ModelState(
        counting_since=T0,
        takeover=T0,  # earlier exporters counted from their first start and showed it at once
        baseline=Baseline(counters=dict(counters), durations=dict(durations)),
        marks={"shiny": T0 + 50 * US, "visits": T0},
        counters=counters,
        durations=durations,
        keys={
            "shiny": {
                ("a", "u1", T0 + 1 * US): (CLOSED, T0 + 61 * US),
                ("a", "", T0 + 2 * US): (OPEN, T0 + 2 * US),
            },
            LEGACY_SPACE: {(legacy_digest(V),): (1, T0 + 3 * US)},
        },
        user_last=[("u1", T0 + 61 * US), ("u2", T0 + 3 * US)],
        pair_last=[("a", "u1", T0 + 61 * US), ("d", "u2", T0 + 3 * US)],
        content_last={"a": T0 + 61 * US, "d": T0 + 3 * US},
        # user_hours (the opt-in hourly counts behind user_events) is not carried over: the
        # per-user series it fed are gone; viewer events count from the first new event on.
    )


def test_a_schema_2_file_is_migrated_in_place_losing_nothing(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite"
    _schema_2_file(path)
    store = SqliteStore(path)
    assert _folded(store.load()) == _folded(_expected_migrated())
    # The visit the schema-2 digest stands for is not counted again; a new one is.
    model = UsageModel(rules(), store.load())
    model.apply_visits([V, V], WalkTally(start_us=model.walk_start("visits")))
    assert model.view(T0 / US).content_visits_total == {"d": 2}
    store.commit(model.take_delta())
    store.close()
    db = sqlite3.connect(path)
    assert db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone() == (
        str(SCHEMA_VERSION),
    )
    tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert not {"hwm", "shiny_keys", "visit_keys"} & tables
    assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    db.close()


def test_a_schema_1_file_is_migrated_in_place_losing_nothing(tmp_path: Path) -> None:
    # Schema 1 kept last-seen rows by guid text and key tables in another column order.
    path = tmp_path / "state.sqlite"
    _schema_2_file(path)
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
    db.execute("ALTER TABLE shiny_keys RENAME TO shiny_keys_x")
    db.execute(
        "CREATE TABLE shiny_keys (content_guid TEXT NOT NULL, user_guid TEXT NOT NULL, "
        "started INTEGER NOT NULL, state INTEGER NOT NULL, time INTEGER NOT NULL, "
        "PRIMARY KEY (content_guid, user_guid, started))"
    )
    db.execute(
        "INSERT INTO shiny_keys SELECT content_guid, user_guid, started, state, time "
        "FROM shiny_keys_x"
    )
    db.execute("DROP TABLE shiny_keys_x")
    db.execute("UPDATE meta SET value='1' WHERE key='schema_version'")
    db.commit()
    db.close()
    store = SqliteStore(path)
    assert _folded(store.load()) == _folded(_expected_migrated())
    store.close()


def test_a_malformed_record_keyed_by_a_schema_2_digest_is_not_counted_again(
    tmp_path: Path,
) -> None:
    path = tmp_path / "state.sqlite"
    _schema_2_file(path)
    raw = b'{"content_guid": null}'
    digest = hashlib.blake2b(b"visits\x1f" + raw, digest_size=16).digest()
    db = sqlite3.connect(path)
    db.execute("INSERT INTO visit_keys VALUES (?, ?, 1)", (T0 + 4 * US, digest))
    db.commit()
    db.close()
    store = SqliteStore(path)
    model = UsageModel(rules(), store.load())
    model.count_malformed("visits", [raw], T0 + 3 * US, WalkTally(start_us=0))
    assert model.view(T0 / US).excluded_events_total == {}
    store.close()
