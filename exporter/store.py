"""Where the model's state lives between runs: the `Store` interface and its SQLite default.

A store loads a `ModelState` and commits `Delta`s, both in the model's terms. `SqliteStore`
writes each delta in one transaction together with the high-water marks it reaches, so a crash
at any instant leaves either the whole batch or none of it; WAL mode keeps commits cheap.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

from exporter import __version__
from exporter.model import DURATION_BUCKETS, Delta, Key, ModelState

SCHEMA_VERSION = 3
_PAGE_SIZE = 1024
_CHECKPOINT_BYTES = 64 * 1024 * 1024  # of WAL between automatic checkpoints
_WAL_SIZE_LIMIT = 16 * 1024 * 1024  # bytes the WAL keeps on disk after a checkpoint
_CACHE_KIB = 8_192

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS marks (stream TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS counters (
    name TEXT NOT NULL, label TEXT NOT NULL, value INTEGER NOT NULL, PRIMARY KEY (name, label));
CREATE TABLE IF NOT EXISTS durations (
    content_guid TEXT PRIMARY KEY, counts TEXT NOT NULL, sum_us INTEGER NOT NULL);
-- De-dup keys, one JSON array each, by key space: `pinned` keys outlive the horizon.
CREATE TABLE IF NOT EXISTS keys (
    space TEXT NOT NULL, key TEXT NOT NULL, value INTEGER NOT NULL, time INTEGER NOT NULL,
    pinned INTEGER NOT NULL, PRIMARY KEY (space, key)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS keys_by_time ON keys (space, time);
CREATE TABLE IF NOT EXISTS user_last (user_guid TEXT PRIMARY KEY, last INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS pair_last (
    content_guid TEXT NOT NULL, user_guid TEXT NOT NULL, last INTEGER NOT NULL,
    PRIMARY KEY (content_guid, user_guid)) WITHOUT ROWID;
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


class Store(Protocol):
    """What the poller needs of wherever the state lives."""

    def load(self) -> ModelState | None:
        """The committed state; None when nothing was ever committed (a first start)."""

    def commit(self, delta: Delta) -> None:
        """Apply one delta atomically: all of it or, on any error (raised), none of it."""

    def close(self) -> None: ...


def _key_text(key: Key) -> str:
    return json.dumps(key, ensure_ascii=False, separators=(",", ":"))


class SqliteStore:
    """The embedded default: one SQLite file, one connection used from worker threads.

    `read_only` opens an existing file of this schema for `load()` alone, beside a running
    exporter (a reader never blocks the writer in WAL mode).
    """

    def __init__(self, path: Path, *, read_only: bool = False) -> None:
        self.path = path
        self.read_only = read_only
        self._lock = threading.Lock()
        self._pinned: set[tuple[str, Key]] = set()  # key rows that outlive the horizon
        try:
            if read_only:
                uri = f"{path.resolve().as_uri()}?mode=ro"
                self._db = sqlite3.connect(uri, uri=True, check_same_thread=False, timeout=10)
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        except (OSError, sqlite3.Error) as exc:
            raise StateError(f"cannot open state file {path}: {exc}") from None
        try:
            if read_only:
                self._check_schema()
            else:
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
        db.execute(f"PRAGMA page_size={_PAGE_SIZE}")  # a new file only
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        # Fewer, larger checkpoints: a catch-up's commits each dirty many pages, and each
        # checkpoint costs two fsyncs. WAL commits stay atomic whatever the checkpoint cadence.
        page_size = db.execute("PRAGMA page_size").fetchone()[0]
        db.execute(f"PRAGMA wal_autocheckpoint={_CHECKPOINT_BYTES // page_size}")
        db.execute(f"PRAGMA journal_size_limit={_WAL_SIZE_LIMIT}")
        db.execute(f"PRAGMA cache_size=-{_CACHE_KIB}")
        result = db.execute("PRAGMA quick_check").fetchone()
        if result is None or result[0] != "ok":
            raise sqlite3.DatabaseError(f"integrity check failed: {result}")
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        found: int | None = SCHEMA_VERSION
        if "meta" in tables:
            row = db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
            found = int(row[0]) if row else None
            if found not in (1, 2, SCHEMA_VERSION):
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
        # One transaction: a crash here leaves no half-made schema or half-done migration.
        db.execute("BEGIN IMMEDIATE")
        if found != SCHEMA_VERSION:
            _rename_old_tables(db)
        for statement in filter(str.strip, _SCHEMA.split(";")):
            db.execute(statement)
        if found != SCHEMA_VERSION:
            _migrate(db)
        db.executemany(
            "INSERT OR REPLACE INTO meta VALUES (?, ?)",
            [("schema_version", str(SCHEMA_VERSION)), ("duration_buckets", _bucket_text())],
        )
        db.execute("INSERT OR IGNORE INTO meta VALUES ('created_by', ?)", (__version__,))
        db.execute("COMMIT")
        self._pinned = {
            (space, tuple(json.loads(key)))
            for space, key in db.execute("SELECT space, key FROM keys WHERE pinned")
        }

    def _check_schema(self) -> None:
        try:
            row = self._db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        except sqlite3.DatabaseError as exc:
            raise StateError(f"state file {self.path} cannot be read: {exc}") from None
        if row is None or int(row[0]) != SCHEMA_VERSION:
            raise StateError(
                f"state file {self.path} has schema version {row and row[0]}, this exporter "
                f"({__version__}) reads {SCHEMA_VERSION}; start the exporter on it once"
            )

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def load(self) -> ModelState | None:
        with self._lock:
            db = self._db
            row = db.execute("SELECT value FROM meta WHERE key='counting_since'").fetchone()
            if row is None:
                return None
            state = ModelState(counting_since=int(row[0]))
            state.marks = dict(db.execute("SELECT stream, value FROM marks"))
            state.counters = {(n, lab): v for n, lab, v in db.execute("SELECT * FROM counters")}
            state.durations = {
                guid: ([int(x) for x in counts.split(",")], total)
                for guid, counts, total in db.execute("SELECT * FROM durations")
            }
            for space, key, value, time in db.execute("SELECT space, key, value, time FROM keys"):
                state.keys.setdefault(space, {})[tuple(json.loads(key))] = (value, time)
            state.user_last = dict(db.execute("SELECT user_guid, last FROM user_last"))
            for content, user, last in db.execute("SELECT * FROM pair_last"):
                state.pair_last.setdefault(content, {})[user] = last
            state.content_last = dict(db.execute("SELECT * FROM content_last"))
            for user, hour, count in db.execute("SELECT * FROM user_hours"):
                state.user_hours.setdefault(user, {})[hour] = count
            return state

    def commit(self, delta: Delta) -> None:
        if self.read_only:
            raise StateError(f"state file {self.path} was opened read-only")
        if delta.is_empty():
            return
        with self._lock:
            db = self._db
            pinned = set(self._pinned)
            try:
                db.execute("BEGIN IMMEDIATE")
                if delta.counting_since is not None:
                    db.execute(
                        "INSERT OR REPLACE INTO meta VALUES ('counting_since', ?)",
                        (str(delta.counting_since),),
                    )
                _upsert(db, "marks", delta.marks.items())
                _upsert(db, "counters", ((n, lab, v) for (n, lab), v in delta.counters.items()))
                _upsert(
                    db,
                    "durations",
                    (
                        (guid, ",".join(map(str, counts)), total)
                        for guid, (counts, total) in delta.durations.items()
                    ),
                )
                self._write_keys(db, delta, pinned)
                _write(db, "user_last", ("user_guid",), delta.user_last.items())
                _write(
                    db,
                    "pair_last",
                    ("content_guid", "user_guid"),
                    ((c, u, t) for (c, u), t in delta.pair_last.items()),
                )
                _upsert(db, "content_last", delta.content_last.items())
                _write(
                    db,
                    "user_hours",
                    ("user_guid", "hour"),
                    ((u, h, n) for (u, h), n in delta.user_hours.items()),
                )
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
            self._pinned = pinned

    @staticmethod
    def _write_keys(db: sqlite3.Connection, delta: Delta, pinned: set[tuple[str, Key]]) -> None:
        """Keys below their horizon are not written (a long walk's keys mostly are), and go."""
        upserts: list[tuple[str, str, int, int, bool]] = []
        deletes: list[tuple[str, str]] = []
        for space, changes in delta.keys.items():
            horizon = delta.horizons.get(space, -1)
            for key, change in changes.items():
                if change is not None and (change[2] or change[1] >= horizon):
                    upserts.append((space, _key_text(key), *change))
                    if change[2]:
                        pinned.add((space, key))
                    else:
                        pinned.discard((space, key))
                elif change is None or (space, key) in pinned:
                    deletes.append((space, _key_text(key)))
                    pinned.discard((space, key))
        db.executemany("DELETE FROM keys WHERE space = ? AND key = ?", deletes)
        db.executemany("INSERT OR REPLACE INTO keys VALUES (?, ?, ?, ?, ?)", upserts)
        db.executemany(
            "DELETE FROM keys WHERE space = ? AND time < ? AND NOT pinned",
            delta.horizons.items(),
        )


def _upsert(db: sqlite3.Connection, table: str, rows: Iterable[tuple[object, ...]]) -> None:
    rows = list(rows)
    if rows:
        marks = ", ".join("?" * len(rows[0]))
        db.executemany(f"INSERT OR REPLACE INTO {table} VALUES ({marks})", rows)  # noqa: S608


def _write(
    db: sqlite3.Connection,
    table: str,
    key_columns: tuple[str, ...],
    rows: Iterable[tuple[object, ...]],
) -> None:
    """Upsert the rows whose last value is set; delete those whose value is None."""
    upserts: list[tuple[object, ...]] = []
    deletes: list[tuple[object, ...]] = []
    for row in rows:
        (deletes if row[-1] is None else upserts).append(row)
    _upsert(db, table, upserts)
    if deletes:
        where = " AND ".join(f"{c} = ?" for c in key_columns)
        db.executemany(f"DELETE FROM {table} WHERE {where}", [r[:-1] for r in deletes])  # noqa: S608


# --- migration from schema 1 and 2 ------------------------------------------------------------

_OLD_TABLES = (
    "hwm",
    "durations",
    "shiny_keys",
    "visit_keys",
    "guids",
    "user_last",
    "pair_last",
    "user_last_log",
    "pair_last_log",
    "content_last",
    "user_hours",
)


def _rename_old_tables(db: sqlite3.Connection) -> None:
    tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    for table in _OLD_TABLES:
        if table in tables:
            db.execute(f"ALTER TABLE {table} RENAME TO old_{table}")


def _migrate(db: sqlite3.Connection) -> None:
    """Schema 1 and 2 files, into schema 3 tables (in the caller's transaction).

    Everything carries over. Their visit keys were digests, which cannot name the visits they
    stood for: they go to the `legacy` key space, which the model matches by digest until they
    age out of the overlap. Schema 2 keyed last-seen rows by integer ids (`guids`), and both
    kept append-only logs beside the tables: the latest time of each wins.
    """
    tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    if "old_hwm" in tables:
        db.execute("INSERT INTO marks SELECT stream, value FROM old_hwm")
    if "old_durations" in tables:
        db.execute("INSERT INTO durations SELECT content_guid, counts, sum_us FROM old_durations")
    if "old_shiny_keys" in tables:
        for content, user, started, state, time in db.execute(
            "SELECT content_guid, user_guid, started, state, time FROM old_shiny_keys"
        ).fetchall():
            db.execute(
                "INSERT INTO keys VALUES ('shiny', ?, ?, ?, ?)",
                (_key_text((content, user, started)), state, time, state != 1),
            )
    if "old_visit_keys" in tables:
        for key, count, time in db.execute(
            "SELECT key, max(count), max(time) FROM old_visit_keys GROUP BY key"
        ).fetchall():
            db.execute(
                "INSERT INTO keys VALUES ('legacy', ?, ?, ?, 0)",
                (_key_text((bytes(key).hex(),)), count, time),
            )
    ids = "old_guids" in tables
    user = "(SELECT guid FROM old_guids WHERE id = t.user_id)" if ids else "t.user_guid"
    content = "(SELECT guid FROM old_guids WHERE id = t.content_id)" if ids else "t.content_guid"
    for table in ("old_user_last", "old_user_last_log"):
        if table in tables:
            db.execute(
                f"INSERT INTO user_last SELECT {user}, t.last FROM {table} t WHERE true "  # noqa: S608
                "ON CONFLICT (user_guid) DO UPDATE SET last = max(last, excluded.last)"
            )
    for table in ("old_pair_last", "old_pair_last_log"):
        if table in tables:
            db.execute(
                f"INSERT INTO pair_last SELECT {content}, {user}, t.last FROM {table} t "  # noqa: S608
                "WHERE true ON CONFLICT (content_guid, user_guid) "
                "DO UPDATE SET last = max(last, excluded.last)"
            )
    if "old_content_last" in tables:
        db.execute("INSERT INTO content_last SELECT content_guid, last FROM old_content_last")
    if "old_user_hours" in tables:
        db.execute("INSERT INTO user_hours SELECT user_guid, hour, count FROM old_user_hours")
    for table in _OLD_TABLES:
        if f"old_{table}" in tables:
            db.execute(f"DROP TABLE old_{table}")


def _bucket_text() -> str:
    return ",".join(repr(b) for b in DURATION_BUCKETS)
