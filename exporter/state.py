"""The exporter's state in one SQLite file: what makes counts survive restarts exactly-once.

Each batch is written in one transaction together with its high-water mark, so a crash at any
instant leaves either the whole batch or none of it. WAL mode keeps commits cheap.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Sequence
from operator import itemgetter
from pathlib import Path

import orjson

from exporter import __version__
from exporter.model import CLOSED, Delta, UsageModel
from exporter.snapshot import DURATION_BUCKETS

SCHEMA_VERSION = 2  # 2: last-seen tables keyed by integer ids (1 is migrated in place)
_PAGE_SIZE = 1024
_CHECKPOINT_BYTES = 64 * 1024 * 1024  # of WAL between automatic checkpoints
_WAL_SIZE_LIMIT = 16 * 1024 * 1024  # bytes the WAL keeps on disk after a checkpoint
_SHINY_COLUMNS = "content_guid, user_guid, started, state, time"  # the model's order
_VISIT_COLUMNS = "key, count, time"
# Last-seen log rows that trigger a fold into the tables (or the tables' size, if larger: each
# row is then folded O(1) times). Lower, steady state folds sooner and the file stays small; the
# soak at 200k never folded in a month, and the file (12 MB) kept filling the page cache.
_FOLD_ROWS = 50_000
# Ids of users with an open Shiny session: their last-seen rows outlive a prune.
_OPEN_USER_IDS = (
    "SELECT g.id FROM shiny_keys s JOIN guids g ON g.guid = s.user_guid WHERE s.state = 0"
)
_LAST_SEEN_TABLES = ("user_last", "pair_last", "user_last_log", "pair_last_log")
_JSON_ROWS = 2_000  # rows per statement of a commit (see _insert)
_CACHE_KIB = 8_192  # page cache: the hot B-tree pages of the last-seen tables stay in memory

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS hwm (stream TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS counters (
    name TEXT NOT NULL, label TEXT NOT NULL, value INTEGER NOT NULL, PRIMARY KEY (name, label));
CREATE TABLE IF NOT EXISTS durations (
    content_guid TEXT PRIMARY KEY, counts TEXT NOT NULL, sum_us INTEGER NOT NULL);
-- De-dup keys are ordered by time first: a walk reads in time order, so a commit's new keys
-- land on a few adjacent B-tree pages instead of one random page each, and a prune is a range.
-- (Key columns come first: SQLite 3.40's quick_check misreads a WITHOUT ROWID table whose
-- key columns are declared in another order. Statements name their columns.)
CREATE TABLE IF NOT EXISTS shiny_keys (
    started INTEGER NOT NULL, content_guid TEXT NOT NULL, user_guid TEXT NOT NULL,
    state INTEGER NOT NULL, time INTEGER NOT NULL,
    PRIMARY KEY (started, content_guid, user_guid)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS visit_keys (
    time INTEGER NOT NULL, key BLOB NOT NULL, count INTEGER NOT NULL,
    PRIMARY KEY (time, key)) WITHOUT ROWID;
-- Last-seen times are keyed by small integers, not guids: a catch-up writes one row per
-- (content, user) pair it meets, and two 36-character texts per row made these tables most of
-- a commit's cost (measured: binding and folding ints takes half the time). Content and user
-- guids share one id space: guids are unique across both.
CREATE TABLE IF NOT EXISTS guids (id INTEGER PRIMARY KEY, guid TEXT NOT NULL UNIQUE);
CREATE TABLE IF NOT EXISTS user_last (user_id INTEGER PRIMARY KEY, last INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS pair_last (
    content_id INTEGER NOT NULL, user_id INTEGER NOT NULL, last INTEGER NOT NULL,
    PRIMARY KEY (content_id, user_id)) WITHOUT ROWID;
-- Append-only logs of last-seen changes, folded into user_last / pair_last in bulk: a commit
-- then writes a few sequential pages instead of one random B-tree page per row.
CREATE TABLE IF NOT EXISTS user_last_log (user_id INTEGER NOT NULL, last INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS pair_last_log (
    content_id INTEGER NOT NULL, user_id INTEGER NOT NULL, last INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS content_last (content_guid TEXT PRIMARY KEY, last INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS user_hours (
    user_guid TEXT NOT NULL, hour INTEGER NOT NULL, count INTEGER NOT NULL,
    PRIMARY KEY (user_guid, hour)) WITHOUT ROWID;
"""

_WAY_OUT = (
    "Move the file away (or delete it) to start afresh: counters then restart at zero from now "
    "and the windowed gauges are back-filled from Connect."
)


class StateError(Exception):
    """The state file cannot be used; the message names the file and the way out."""


class StateStore:
    """One SQLite connection used from worker threads, serialised by a lock."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._log_rows = 0  # rows in the last-seen logs; counted again on restore
        # Rows in user_last + pair_last: a fold waits for a log at least this long, so each
        # row is folded O(1) times however large the tables grow.
        self._table_rows = 0
        # guid -> id of the last-seen tables, as committed; grows with the server's guids.
        self._ids: dict[str, int] = {}
        self._max_id = 0
        self._json = False  # whether this SQLite reads rows from one JSON text (see _insert)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        except (OSError, sqlite3.Error) as exc:
            raise StateError(f"cannot open state file {path}: {exc}") from None
        try:
            self._check_and_create()
        except sqlite3.OperationalError as exc:
            # Read-only or full: the file may be fine, so never advise deleting it.
            self._db.close()
            raise StateError(
                f"cannot write the state file {path} ({exc}); check that its directory is "
                "writable and has free space"
            ) from None
        except sqlite3.DatabaseError as exc:
            self._db.close()
            raise StateError(
                f"state file {path} is corrupt or not an exporter state file ({exc}). {_WAY_OUT}"
            ) from None

    def _check_and_create(self) -> None:
        db = self._db
        # A catch-up commits a page of last-seen rows spread over the whole key space, so each
        # commit dirties hundreds of B-tree pages, and WAL writes whole pages: small pages write
        # less per commit (a new file only; an existing one keeps its page size).
        db.execute(f"PRAGMA page_size={_PAGE_SIZE}")
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        # The default checkpoint (every 1000 WAL pages) then ran every few commits, each with two
        # fsyncs: ~30% of a catch-up's time. Fewer, larger checkpoints write each hot page once
        # per checkpoint instead; the WAL file is truncated back after a checkpoint. Safety is
        # unchanged: WAL commits stay atomic.
        page_size = db.execute("PRAGMA page_size").fetchone()[0]
        db.execute(f"PRAGMA wal_autocheckpoint={_CHECKPOINT_BYTES // page_size}")
        db.execute(f"PRAGMA journal_size_limit={_WAL_SIZE_LIMIT}")
        db.execute(f"PRAGMA cache_size=-{_CACHE_KIB}")
        self._json = _has_json(db)
        result = db.execute("PRAGMA quick_check").fetchone()
        if result is None or result[0] != "ok":
            raise sqlite3.DatabaseError(f"integrity check failed: {result}")
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if "meta" in tables:
            row = db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
            found = int(row[0]) if row else None
            if found not in (1, SCHEMA_VERSION):
                raise StateError(
                    f"state file {self.path} has schema version {found}, this exporter "
                    f"({__version__}) needs {SCHEMA_VERSION}. {_WAY_OUT}"
                )
            buckets = db.execute("SELECT value FROM meta WHERE key='duration_buckets'").fetchone()
            if buckets and buckets[0] != _bucket_text():
                raise StateError(
                    f"state file {self.path} was written with other histogram buckets. {_WAY_OUT}"
                )
        elif tables:
            raise sqlite3.DatabaseError("unknown tables, no exporter metadata")
        # One transaction: a crash here leaves no half-made schema behind.
        db.execute("BEGIN IMMEDIATE")
        _reorder_key_tables(db)
        _rename_guid_tables(db)
        for statement in filter(str.strip, _SCHEMA.split(";")):
            db.execute(statement)
        _migrate_guid_tables(db)
        db.execute("UPDATE meta SET value=? WHERE key='schema_version'", (str(SCHEMA_VERSION),))
        db.executemany(
            "INSERT OR IGNORE INTO meta VALUES (?, ?)",
            [
                ("schema_version", str(SCHEMA_VERSION)),
                ("duration_buckets", _bucket_text()),
                ("created_by", __version__),
            ],
        )
        db.execute("COMMIT")
        self._ids = {guid: i for i, guid in db.execute("SELECT id, guid FROM guids")}
        self._max_id = max(self._ids.values(), default=0)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def restore(self, model: UsageModel) -> bool:
        """Load the committed state into `model`; False when the file holds no epoch yet."""
        with self._lock:
            db = self._db
            row = db.execute("SELECT value FROM meta WHERE key='counting_since'").fetchone()
            if row is None:
                return False
            model.counting_since = int(row[0])
            model.hwm = dict(db.execute("SELECT stream, value FROM hwm"))
            model.counters = {(n, lab): v for n, lab, v in db.execute("SELECT * FROM counters")}
            for guid, counts, total in db.execute("SELECT * FROM durations"):
                model.duration_counts[guid] = [int(x) for x in counts.split(",")]
                model.duration_sums[guid] = total
            model.shiny_keys = {
                (c, u, s): (st, t)
                for c, u, s, st, t in db.execute(
                    "SELECT content_guid, user_guid, started, state, time FROM shiny_keys"
                )
            }
            # A key whose time moved on (a malformed record's anchor) has a row per time until
            # the older one is pruned; its newest row has the largest count.
            visit_keys: dict[bytes, tuple[int, int]] = {}
            for k, n, t in db.execute("SELECT key, count, time FROM visit_keys"):
                if n > visit_keys.get(k, (0, 0))[0]:
                    visit_keys[k] = (n, t)
            model.visit_keys = visit_keys
            model.visit_keys_until = max((t for _n, t in visit_keys.values()), default=-1)
            # A log row is only ever appended when its value grew, but take the max anyway.
            names = {i: model.intern(guid) for guid, i in self._ids.items()}
            user_last: dict[str, int] = {}
            model.user_last = user_last
            for query in ("SELECT * FROM user_last", "SELECT * FROM user_last_log"):
                for u, t in db.execute(query):
                    user = names[u]
                    if user_last.get(user, -1) < t:
                        user_last[user] = t
            pair_last: dict[str, dict[str, int]] = {}
            model.pair_last = pair_last
            for query in ("SELECT * FROM pair_last", "SELECT * FROM pair_last_log"):
                for c, u, t in db.execute(query):
                    content = names[c]
                    users = pair_last.get(content)
                    if users is None:
                        users = pair_last[content] = {}
                    user = names[u]
                    if users.get(user, -1) < t:
                        users[user] = t
            self._table_rows = _table_rows(db)
            self._log_rows = db.execute(
                "SELECT (SELECT count(*) FROM user_last_log) + (SELECT count(*) FROM pair_last_log)"
            ).fetchone()[0]
            model.content_last = dict(db.execute("SELECT * FROM content_last"))
            for user, hour, count in db.execute("SELECT * FROM user_hours"):
                model.user_hours.setdefault(user, {})[hour] = count
            model.shiny_open_on_disk = {
                k for k, (st, _t) in model.shiny_keys.items() if st != CLOSED
            }
            model.take_delta()  # what was just loaded is not a change
            return True

    def commit(self, delta: Delta) -> None:
        """Write one batch atomically; on any error nothing of it is kept."""
        if delta.is_empty():
            return
        with self._lock:
            db = self._db
            ids = self._ids
            new_guids: list[tuple[int, str]] = []
            json = self._json

            def insert(into: str, rows: Sequence[tuple[object, ...]]) -> None:
                _insert(db, into, rows, json=json)

            try:
                db.execute("BEGIN IMMEDIATE")
                if delta.meta:
                    db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", delta.meta.items())
                if delta.hwm:
                    db.executemany("INSERT OR REPLACE INTO hwm VALUES (?, ?)", delta.hwm.items())
                # Range prunes first: a key written after its prune is upserted below.
                if delta.prune_closed_before is not None:
                    db.execute(
                        "DELETE FROM shiny_keys WHERE state = 1 AND time < ?",
                        (delta.prune_closed_before,),
                    )
                if delta.prune_visits_before is not None:
                    db.execute(
                        "DELETE FROM visit_keys WHERE time < ?", (delta.prune_visits_before,)
                    )
                insert("INSERT OR REPLACE INTO counters", delta.counters)
                insert("INSERT OR REPLACE INTO durations", delta.durations)
                insert(f"INSERT OR REPLACE INTO shiny_keys ({_SHINY_COLUMNS})", delta.shiny_upserts)
                _many(
                    db,
                    "DELETE FROM shiny_keys WHERE content_guid=? AND user_guid=? AND started=?",
                    delta.shiny_deletes,
                )
                _many(
                    db,
                    "INSERT OR REPLACE INTO visit_keys (key, count, time) VALUES (?, ?, ?)",
                    delta.visit_upserts,
                )
                _many(db, "DELETE FROM visit_keys WHERE key=?", delta.visit_deletes)
                user_rows, pair_rows = _id_rows(
                    ids, self._max_id, new_guids, delta.user_last, delta.pair_last
                )
                insert("INSERT INTO guids", new_guids)
                insert("INSERT INTO user_last_log", user_rows)
                insert("INSERT INTO pair_last_log", pair_rows)
                log_rows = self._log_rows + len(delta.user_last) + len(delta.pair_last)
                if log_rows >= max(_FOLD_ROWS, self._table_rows):
                    self._table_rows = _fold(db)
                    log_rows = 0
                insert("INSERT OR REPLACE INTO content_last", delta.content_last)
                insert("INSERT OR REPLACE INTO user_hours", delta.user_hours)
                if delta.prune_last_before is not None:
                    cutoff = delta.prune_last_before
                    # Users with an open session are kept in memory; keep them on disk too.
                    # (An older log row of a key that has a newer one may go: restore takes max.)
                    for table in _LAST_SEEN_TABLES:
                        db.execute(
                            f"DELETE FROM {table} WHERE last < ? AND user_id NOT IN "  # noqa: S608
                            f"({_OPEN_USER_IDS})",
                            (cutoff,),
                        )
                    db.execute("DELETE FROM user_hours WHERE hour < ?", (cutoff // 3_600_000_000,))
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                for _id, guid in new_guids:  # their rows are gone with the transaction
                    del ids[guid]
                raise
            self._log_rows = log_rows
            self._max_id += len(new_guids)


def _reorder_key_tables(db: sqlite3.Connection) -> None:
    """Files from before the time-first key order get their key tables rebuilt, in place."""
    rows = dict(db.execute("SELECT name, sql FROM sqlite_master WHERE type='table'"))
    old = {
        "shiny_keys": "PRIMARY KEY (content_guid, user_guid, started)",
        "visit_keys": "key BLOB PRIMARY KEY",
    }
    for table, marker in old.items():
        if marker in (rows.get(table) or ""):
            db.execute(f"ALTER TABLE {table} RENAME TO {table}_old")
            create = next(
                st for st in _SCHEMA.split(";") if f"CREATE TABLE IF NOT EXISTS {table} " in st
            )
            db.execute(create)
            columns = _SHINY_COLUMNS if table == "shiny_keys" else _VISIT_COLUMNS
            db.execute(
                f"INSERT INTO {table} ({columns}) SELECT {columns} FROM {table}_old"  # noqa: S608
            )
            db.execute(f"DROP TABLE {table}_old")


def _id_rows(
    ids: dict[str, int],
    max_id: int,
    new_guids: list[tuple[int, str]],
    user_last: Sequence[tuple[str, int]],
    pair_last: Sequence[tuple[str, str, int]],
) -> tuple[list[tuple[int, int]], list[tuple[int, int, int]]]:
    """The last-seen rows with guids swapped for ids; guids met first get the next ids.

    Set and map passes in C, not a loop in Python: this runs on ~25k rows per commit of a
    catch-up, holding the GIL the event loop needs.
    """
    first, second, third = itemgetter(0), itemgetter(1), itemgetter(2)
    met = set(map(first, user_last))
    met.update(map(first, pair_last), map(second, pair_last))
    for guid in sorted(met.difference(ids)):  # sorted: the same file from the same data
        max_id += 1
        ids[guid] = max_id
        new_guids.append((max_id, guid))
    get = ids.__getitem__
    user_rows = list(zip(map(get, map(first, user_last)), map(second, user_last), strict=True))
    pair_rows = list(
        zip(
            map(get, map(first, pair_last)),
            map(get, map(second, pair_last)),
            map(third, pair_last),
            strict=True,
        )
    )
    return user_rows, pair_rows


def _rename_guid_tables(db: sqlite3.Connection) -> None:
    """Schema 1 keyed last-seen rows by guid text: its tables step aside for the new ones."""
    columns = {row[1] for row in db.execute("PRAGMA table_info(user_last)")}
    if "user_guid" in columns:
        for table in _LAST_SEEN_TABLES:
            db.execute(f"ALTER TABLE {table} RENAME TO {table}_v1")


def _migrate_guid_tables(db: sqlite3.Connection) -> None:
    """Schema 1's last-seen rows, moved into the id-keyed tables (in the caller's transaction)."""
    tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    if "user_last_v1" not in tables:
        return
    db.execute(
        "INSERT OR IGNORE INTO guids (guid) "
        "SELECT user_guid FROM user_last_v1 UNION SELECT user_guid FROM user_last_log_v1 "
        "UNION SELECT content_guid FROM pair_last_v1 UNION SELECT user_guid FROM pair_last_v1 "
        "UNION SELECT content_guid FROM pair_last_log_v1 "
        "UNION SELECT user_guid FROM pair_last_log_v1"
    )
    for table in ("user_last", "user_last_log"):
        db.execute(
            f"INSERT INTO {table} SELECT g.id, t.last FROM {table}_v1 t "  # noqa: S608
            "JOIN guids g ON g.guid = t.user_guid"
        )
    for table in ("pair_last", "pair_last_log"):
        db.execute(
            f"INSERT INTO {table} SELECT c.id, u.id, t.last FROM {table}_v1 t "  # noqa: S608
            "JOIN guids c ON c.guid = t.content_guid JOIN guids u ON u.guid = t.user_guid"
        )
    for table in _LAST_SEEN_TABLES:
        db.execute(f"DROP TABLE {table}_v1")


def _table_rows(db: sqlite3.Connection) -> int:
    row = db.execute(
        "SELECT (SELECT count(*) FROM user_last) + (SELECT count(*) FROM pair_last)"
    ).fetchone()
    return int(row[0])


def _fold(db: sqlite3.Connection) -> int:
    """Move the last-seen logs into their tables: one sorted pass, each B-tree page once."""
    db.execute(
        "INSERT OR REPLACE INTO user_last "
        "SELECT user_id, max(last) FROM user_last_log GROUP BY user_id"
    )
    db.execute(
        "INSERT OR REPLACE INTO pair_last SELECT content_id, user_id, max(last) "
        "FROM pair_last_log GROUP BY content_id, user_id"
    )
    db.execute("DELETE FROM user_last_log")
    db.execute("DELETE FROM pair_last_log")
    return _table_rows(db)


def _many(db: sqlite3.Connection, sql: str, rows: Sequence[tuple[object, ...]]) -> None:
    if rows:
        db.executemany(sql, rows)


def _has_json(db: sqlite3.Connection) -> bool:
    """SQLite >= 3.38 has JSON built in (and `->>`); older or stripped builds bind row by row."""
    try:
        return bool(db.execute("SELECT '[[7]]' ->> '$[0][0]' = 7").fetchone()[0])
    except sqlite3.Error:
        return False


def _insert(
    db: sqlite3.Connection,
    into: str,
    rows: Sequence[tuple[object, ...]],
    *,
    json: bool,
) -> None:
    """`into` (an INSERT up to its VALUES) for every row, in order (a later row replaces);
    the rows are tuples of one width.

    One statement over one JSON text, not executemany: executemany gives up the GIL around
    each row's step and must win it back from the event loop for the next one, so a commit
    of 25k rows crawled while it kept interrupting the loop (against a busy thread: 500k rows
    in 108 s, 0.8 s this way; a catch-up's commits took 5.9 s of wall, now 2.6 s, and run
    beside the loop instead of in its way). The GIL is held only while orjson writes the text.
    A few thousand rows per text: SQLite parses a whole text at once, and buffers of megabytes
    made in the commit thread stayed in its malloc arena (memory bench: +20 MB peak RSS).
    """
    if not rows:
        return
    width = len(rows[0])
    if json:
        columns = ", ".join(f"value ->> {i}" for i in range(width))
        sql = f"{into} SELECT {columns} FROM json_each(?)"  # noqa: S608  # our constants
        for at in range(0, len(rows), _JSON_ROWS):
            db.execute(sql, (orjson.dumps(rows[at : at + _JSON_ROWS]),))
    else:
        db.executemany(f"{into} VALUES ({', '.join('?' * width)})", rows)


def _bucket_text() -> str:
    return ",".join(repr(b) for b in DURATION_BUCKETS)
