"""Where the model's state lives between runs: the `Store` interface and its SQLite default.

A store loads a `ModelState` and commits `Delta`s, both in the model's terms. `SqliteStore`
writes each delta in one transaction together with the high-water marks it reaches, so a crash
at any instant leaves either the whole batch or none of it; WAL mode keeps commits cheap.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import threading
from collections.abc import Iterable, Mapping
from operator import itemgetter
from pathlib import Path
from typing import Protocol

import msgspec

from exporter import __version__
from exporter.lastseen import GuidRows
from exporter.model import DURATION_BUCKETS, Baseline, Delta, Key, ModelState
from exporter.records import share

SCHEMA_VERSION = 3
_PAGE_SIZE = 1024
_CHECKPOINT_BYTES = 64 * 1024 * 1024  # of WAL between automatic checkpoints
_WAL_SIZE_LIMIT = 16 * 1024 * 1024  # bytes the WAL keeps on disk after a checkpoint
_CACHE_KIB = 2_048
_JSON_ROWS = 2_000  # rows per statement of a commit (see _rows)
# Log rows that trigger a fold into the last-seen tables (or the tables' size, if larger: each
# row is then folded O(1) times).
_FOLD_ROWS = 50_000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS marks (stream TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS counters (
    name TEXT NOT NULL, label TEXT NOT NULL, value INTEGER NOT NULL, PRIMARY KEY (name, label));
CREATE TABLE IF NOT EXISTS durations (
    content_guid TEXT PRIMARY KEY, counts TEXT NOT NULL, sum_us INTEGER NOT NULL);
-- The counters and histograms when they were first shown (see ModelState.baseline).
CREATE TABLE IF NOT EXISTS baseline_counters (
    name TEXT NOT NULL, label TEXT NOT NULL, value INTEGER NOT NULL, PRIMARY KEY (name, label));
CREATE TABLE IF NOT EXISTS baseline_durations (
    content_guid TEXT PRIMARY KEY, counts TEXT NOT NULL, sum_us INTEGER NOT NULL);
-- De-dup keys, one JSON array each, by key space: `pinned` keys outlive the horizon.
-- Ordered by time: a commit's new keys land on a few adjacent pages, and a horizon is one
-- range. A key whose time moves on gets a new row, and the store deletes the old one when it knows
-- it (a pinned key's), and any other ages out at the horizon: the newest row of a key wins.
CREATE TABLE IF NOT EXISTS keys (
    space TEXT NOT NULL, time INTEGER NOT NULL, key TEXT NOT NULL, value INTEGER NOT NULL,
    pinned INTEGER NOT NULL, PRIMARY KEY (space, time, key)) WITHOUT ROWID;
-- Last-seen times, keyed by small integers (content and user guids share one id space), and
-- appended to logs that are folded into the tables in bulk: a catch-up commits one row per
-- (content, user) pair it meets, and a log takes them on a few sequential pages instead of one
-- random B-tree page each. The newest time of a key in table or log is its value.
CREATE TABLE IF NOT EXISTS guids (id INTEGER PRIMARY KEY, guid TEXT NOT NULL UNIQUE);
CREATE TABLE IF NOT EXISTS user_last (user_id INTEGER PRIMARY KEY, last INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS pair_last (
    content_id INTEGER NOT NULL, user_id INTEGER NOT NULL, last INTEGER NOT NULL,
    PRIMARY KEY (content_id, user_id)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS user_last_log (user_id INTEGER NOT NULL, last INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS pair_last_log (
    content_id INTEGER NOT NULL, user_id INTEGER NOT NULL, last INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS content_last (content_guid TEXT PRIMARY KEY, last INTEGER NOT NULL);
-- Events of known users per content item over the largest window (exporter.viewers): appended
-- once each, forgotten by time. Hourly per-user counts (`user_hours`) were kept before them.
CREATE TABLE IF NOT EXISTS viewer_events (
    content_id INTEGER NOT NULL, user_id INTEGER NOT NULL, time INTEGER NOT NULL,
    value INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS viewer_events_time ON viewer_events (time);
DROP TABLE IF EXISTS user_hours;
"""

_WAY_OUT = (
    "Move the file away (or delete it) to start afresh: counters then restart at zero from now "
    "and the windowed gauges are back-filled from Connect."
)


_NOT_A_FIRST_START = "an existing state file is never taken for a first start"


class StateError(Exception):
    """The state file cannot be used; the message names the file and the way out."""


class StateFileGoneError(StateError):
    """The path no longer names the file the store opened (deleted, or another file moved
    there): nothing more is committed, to either of them. The message says how to keep the
    counts the open file holds."""


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
        # Keys whose rows outlive the horizon (open sessions), with their row's time.
        self._pinned: dict[tuple[str, Key], int] = {}
        self._log_rows = 0  # rows in the last-seen logs
        self._table_rows = 0  # rows in the last-seen tables
        self._identity: tuple[int, int] | None = None  # (device, inode) of the file opened
        self._gone: str | None = None  # why commits are refused, once the file is gone
        try:
            if read_only:
                uri = f"{path.resolve().as_uri()}?mode=ro"
                self._db = sqlite3.connect(uri, uri=True, check_same_thread=False, timeout=10)
            else:
                if _refuse_emptied(path):
                    _create(path)
                self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        except (OSError, sqlite3.Error) as exc:
            raise StateError(f"cannot open state file {path}: {exc}") from None
        try:
            if read_only:
                self._check_schema()
            else:
                self._check_and_create()
        except StateError:
            self._db.close()
            raise
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
        if not read_only:
            self._identity = _identity(path)
        self._resolved = path.resolve()

    def _check_and_create(self) -> None:
        db = self._db
        if sqlite3.sqlite_version_info < (3, 38):
            raise StateError(
                f"SQLite {sqlite3.sqlite_version} is too old for the state file {self.path}: "
                "the exporter needs 3.38 or later (JSON built in)"
            )
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
            epoch = db.execute("SELECT 1 FROM meta WHERE key='counting_since'").fetchone()
            if epoch is None and any(_holds_rows(db, t) for t in tables - {"meta"}):
                raise StateError(
                    f"state file {self.path} holds counts but no counting epoch: it was "
                    f"damaged. {_WAY_OUT}"
                )
        elif tables:
            raise sqlite3.DatabaseError("unknown tables, no exporter metadata")
        else:  # a file this exporter made has its tables from the start (`_create`)
            raise StateError(
                f"state file {self.path} is empty (an SQLite database without the exporter's "
                f"tables), and {_NOT_A_FIRST_START}. {_WAY_OUT}"
            )
        # Only now that it is known for an exporter state file: WAL mode is written into it.
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        # Fewer, larger checkpoints: a catch-up's commits each dirty many pages, and each
        # checkpoint costs two fsyncs. WAL commits stay atomic whatever the checkpoint cadence.
        page_size = db.execute("PRAGMA page_size").fetchone()[0]
        db.execute(f"PRAGMA wal_autocheckpoint={_CHECKPOINT_BYTES // page_size}")
        db.execute(f"PRAGMA journal_size_limit={_WAL_SIZE_LIMIT}")
        db.execute(f"PRAGMA cache_size=-{_CACHE_KIB}")
        _write_schema(db, found)
        self._pinned = {
            (space, _key(key)): time
            for space, time, key in db.execute("SELECT space, time, key FROM keys WHERE pinned")
        }
        self._table_rows = _count(db, "user_last", "pair_last")
        self._log_rows = _count(db, "user_last_log", "pair_last_log")

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
        """The committed state, read in one transaction: a reader beside the writing exporter
        (the demo's back-fill, `backfill` on a live file) sees one commit's tables, never the
        guids of one and the rows of the next."""
        with self._lock:
            db = self._db
            db.execute("BEGIN")
            try:
                return self._read(db)
            finally:
                db.execute("COMMIT")

    def _read(self, db: sqlite3.Connection) -> ModelState | None:
        row = db.execute("SELECT value FROM meta WHERE key='counting_since'").fetchone()
        if row is None:
            return None
        meta = dict(db.execute("SELECT key, value FROM meta"))
        state = ModelState(
            counting_since=int(row[0]),
            takeover=int(meta["takeover"]) if "takeover" in meta else None,
            server=meta.get("server"),
        )
        state.marks = dict(db.execute("SELECT stream, value FROM marks"))
        state.counters = {(n, lab): v for n, lab, v in db.execute("SELECT * FROM counters")}
        state.durations = _durations(db, "durations")
        if "baseline" in meta:
            state.baseline = Baseline(
                counters={
                    (n, lab): v for n, lab, v in db.execute("SELECT * FROM baseline_counters")
                },
                durations=_durations(db, "baseline_durations"),
            )
        # By time: a key with rows of several times takes its newest.
        # The writer's pinned keys are read again with them: one tuple for the model and it.
        pinned: dict[tuple[str, Key], int] = {}
        query = "SELECT space, key, value, time, pinned FROM keys ORDER BY space, time"
        for space, text, value, time, pin in db.execute(query):
            key = _key(text)
            state.keys.setdefault(space, {})[key] = (value, time)
            if pin:
                pinned[(space, key)] = time
        if not self.read_only:
            self._pinned = pinned
        names: Mapping[int, str] = dict(db.execute("SELECT id, guid FROM guids"))
        user_last = GuidRows(names, "iq", guids=1)
        pair_last = GuidRows(names, "iiq", guids=2)
        for table in ("user_last", "user_last_log"):
            user_last.extend(db.execute(f"SELECT user_id, last FROM {table}"))  # noqa: S608
        for table in ("pair_last", "pair_last_log"):
            query = f"SELECT content_id, user_id, last FROM {table}"  # noqa: S608
            pair_last.extend(db.execute(query))
        state.user_last, state.pair_last = user_last, pair_last
        state.content_last = dict(db.execute("SELECT * FROM content_last"))
        # A file this exporter has not opened for writing yet (read-only) may lack it.
        if db.execute(
            "SELECT 1 FROM sqlite_master WHERE type='table' AND name='viewer_events'"
        ).fetchone():
            events = GuidRows(names, "iiqq", guids=2)
            query = "SELECT content_id, user_id, time, value FROM viewer_events ORDER BY rowid"
            events.extend(db.execute(query))
            state.viewer_events = events
        return state

    def commit(self, delta: Delta) -> None:
        if self.read_only:
            raise StateError(f"state file {self.path} was opened read-only")
        with self._lock:
            self._check_in_place()
            if delta.is_empty():
                return
            db = self._db
            pinned = dict(self._pinned)
            try:
                db.execute("BEGIN IMMEDIATE")
                meta = {
                    "counting_since": delta.counting_since,
                    "takeover": delta.takeover,
                    "server": delta.server,
                }
                _upsert(db, "meta", ((k, str(v)) for k, v in meta.items() if v is not None))
                if delta.baseline is not None:
                    _write_baseline(db, delta.baseline)
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
                ids = _guid_ids(db, delta)
                log_rows = self._write_last_seen(db, delta, ids)
                _upsert(db, "content_last", delta.content_last.items())
                get = ids.__getitem__
                _rows(
                    db,
                    "INSERT INTO viewer_events",
                    [(get(c), get(u), t, v) for c, u, t, v in delta.viewer_events],
                )
                if delta.viewer_horizon is not None:
                    db.execute("DELETE FROM viewer_events WHERE time < ?", (delta.viewer_horizon,))
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
            self._pinned = pinned
            self._log_rows = log_rows

    def _check_in_place(self) -> None:
        """Refuse to commit once the path no longer names the file this store opened.

        SQLite would go on writing to a deleted file, which vanishes with the process, and
        the next start would count from zero. So the first time, the WAL is folded into the
        open file (it then holds every commit by itself, for the way out), and from then on
        every commit raises `StateFileGoneError`, whatever comes to the path later.
        """
        if self._gone is None:
            if self._identity is None or _identity(self.path) in (self._identity, None):
                return
            with contextlib.suppress(sqlite3.Error):
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            held = _held_as(self._resolved)
            keep = (
                f"To keep them, copy {held} (this process still holds the file) to {self.path}, "
                "then restart the exporter; restarted without it, it counts from zero."
                if held
                else "Restarted, the exporter counts from zero in a new file."
            )
            self._gone = (
                f"state file {self.path} was deleted or replaced while the exporter ran: nothing "
                f"more is committed, and /metrics keeps the counts last committed. {keep}"
            )
        raise StateFileGoneError(self._gone)

    def _write_last_seen(self, db: sqlite3.Connection, delta: Delta, ids: dict[str, int]) -> int:
        """Append the changed last-seen times to the logs, delete the forgotten ones, and fold
        the logs into the tables once they are long; the log rows left."""
        get = ids.__getitem__
        users = [(get(u), t) for u, t in delta.user_last.items() if t is not None]
        pairs = [(get(c), get(u), t) for (c, u), t in delta.pair_last.items() if t is not None]
        gone_users = [(get(u),) for u, t in delta.user_last.items() if t is None]
        gone_pairs = [(get(c), get(u)) for (c, u), t in delta.pair_last.items() if t is None]
        _rows(db, "INSERT INTO user_last_log", users)  # type: ignore[arg-type]
        _rows(db, "INSERT INTO pair_last_log", pairs)  # type: ignore[arg-type]
        for table in ("user_last", "user_last_log"):
            statement = f"DELETE FROM {table} WHERE (user_id) IN"  # noqa: S608
            _rows(db, statement, gone_users)  # type: ignore[arg-type]
        for table in ("pair_last", "pair_last_log"):
            statement = f"DELETE FROM {table} WHERE (content_id, user_id) IN"  # noqa: S608
            _rows(db, statement, gone_pairs)  # type: ignore[arg-type]
        log_rows = self._log_rows + len(users) + len(pairs)
        if log_rows >= max(_FOLD_ROWS, self._table_rows):
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
            self._table_rows = _count(db, "user_last", "pair_last")
            log_rows = 0
        return log_rows

    @staticmethod
    def _write_keys(
        db: sqlite3.Connection, delta: Delta, pinned: dict[tuple[str, Key], int]
    ) -> None:
        """Keys below their horizon are not written, and every row below it goes but pinned
        ones; a pinned key that moves or goes takes its old row with it."""
        upserts: list[tuple[str, int, str, int, bool]] = []
        deletes: list[tuple[str, int, str]] = []
        for space, changes in delta.keys.items():
            horizon = delta.horizons.get(space, -1)
            for key, change in changes.items():
                before = pinned.pop((space, key), None)
                if change is not None and (change[2] or change[1] >= horizon):
                    value, time, pin = change
                    upserts.append((space, time, _key_text(key), value, pin))
                    if pin:
                        pinned[(space, key)] = time
                if before is not None and (change is None or change[1] != before or not change[2]):
                    deletes.append((space, before, _key_text(key)))
        # Deletes first: a pinned key written again at the same time replaces its row below.
        _rows(db, "DELETE FROM keys WHERE (space, time, key) IN", deletes)  # type: ignore[arg-type]
        _rows(db, "INSERT OR REPLACE INTO keys", upserts)  # type: ignore[arg-type]
        db.executemany(
            "DELETE FROM keys WHERE space = ? AND time < ? AND NOT pinned",
            delta.horizons.items(),
        )


def _key(text: str) -> Key:
    """A de-dup key from its JSON text, its strings the shared ones (one object per guid)."""
    return tuple([share(v) if type(v) is str else v for v in json.loads(text)])


def _guid_ids(db: sqlite3.Connection, delta: Delta) -> dict[str, int]:
    """The id of each guid the delta's last-seen times and viewer events name, the new ones
    added to `guids` (in this transaction) in sorted order: the same file from the same data.
    SQLite's unique index on the guids is the map; the process keeps none between commits."""
    first, second = itemgetter(0), itemgetter(1)
    met = set(delta.user_last)
    met.update(map(first, delta.pair_last), map(second, delta.pair_last))
    met.update(map(first, delta.viewer_events), map(second, delta.viewer_events))
    if not met:
        return {}
    ids: dict[str, int] = {}
    guids = sorted(met)
    for at in range(0, len(guids), _JSON_ROWS):
        text = msgspec.json.encode(guids[at : at + _JSON_ROWS])
        db.execute("INSERT OR IGNORE INTO guids (guid) SELECT value FROM json_each(?)", (text,))
        query = "SELECT j.value, g.id FROM json_each(?) AS j JOIN guids AS g ON g.guid = j.value"
        ids.update(db.execute(query, (text,)))
    return ids


def _identity(path: Path) -> tuple[int, int] | None:
    """(device, inode) of the file at `path`; (-1, -1) when there is none, None when unknown."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return (-1, -1)
    except OSError:  # cannot tell (a directory made unreadable): SQLite will say if it matters
        return None
    return (st.st_dev, st.st_ino)


def _held_as(path: Path) -> str | None:
    """Where this process's descriptor of the deleted file `path` can be read (Linux)."""
    target = f"{path.resolve()} (deleted)"
    with contextlib.suppress(OSError):
        for fd in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/self/fd/{fd}") == target:
                    return f"/proc/{os.getpid()}/fd/{fd}"
    return None


def _refuse_emptied(path: Path) -> bool:
    """Whether `path` is free for a new state file; StateError if a file there was emptied.

    A file that exists is a state file someone has: 0 bytes means it was emptied (truncated, or
    restored from a bad copy), and counting from zero on it would reset every counter without
    a word. A write-ahead log without its file means the file was deleted from under it.
    """
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        wal = Path(f"{path}-wal")
        if wal.is_file() and wal.stat().st_size > 0:
            raise StateError(
                f"state file {path} is missing but its write-ahead log {wal} is there: the file "
                f"was deleted or moved. Put it back; or, to start afresh, move {wal} (and "
                f"{path}-shm) away too: counters then restart at zero."
            ) from None
        return True
    if size == 0 and path.is_file():
        raise StateError(
            f"state file {path} is empty (0 bytes), and {_NOT_A_FIRST_START}. {_WAY_OUT}"
        )
    return False


def _create(path: Path) -> None:
    """A new state file with its tables, written under another name and renamed into place.

    So a file at `path` always holds the exporter's tables, even after a crash or a power cut
    while it was made, and an empty one is never this exporter's doing. Its counting epoch comes
    with the first commit; until then it is a first start that has not finished (nothing was
    counted into it), which the next start takes up again.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    draft = path.with_name(f".{path.name}.new")
    for suffix in ("", "-wal", "-shm", "-journal"):  # a draft a crash left behind
        Path(f"{draft}{suffix}").unlink(missing_ok=True)
    db = sqlite3.connect(draft, isolation_level=None)
    try:
        db.execute(f"PRAGMA page_size={_PAGE_SIZE}")
        db.execute("PRAGMA journal_mode=WAL")
        _write_schema(db, SCHEMA_VERSION)
    finally:
        db.close()  # the last connection: its WAL is checkpointed into the file and removed
    os.replace(draft, path)
    with contextlib.suppress(OSError):  # the rename is durable once the directory is synced
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)


def _write_schema(db: sqlite3.Connection, found: int | None) -> None:
    """The tables and metadata of this schema, migrating a file of schema `found` if older."""
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


def _holds_rows(db: sqlite3.Connection, table: str) -> bool:
    name = table.replace('"', '""')  # a name as the file gives it
    return db.execute(f'SELECT 1 FROM "{name}" LIMIT 1').fetchone() is not None  # noqa: S608


def _durations(db: sqlite3.Connection, table: str) -> dict[str, tuple[list[int], int]]:
    return {
        guid: ([int(x) for x in counts.split(",")], total)
        for guid, counts, total in db.execute(f"SELECT * FROM {table}")  # noqa: S608
    }


def _write_baseline(db: sqlite3.Connection, baseline: Baseline) -> None:
    db.execute("DELETE FROM baseline_counters")
    db.execute("DELETE FROM baseline_durations")
    _upsert(db, "baseline_counters", ((n, lab, v) for (n, lab), v in baseline.counters.items()))
    _upsert(
        db,
        "baseline_durations",
        ((g, ",".join(map(str, c)), t) for g, (c, t) in baseline.durations.items()),
    )
    db.execute("INSERT OR REPLACE INTO meta VALUES ('baseline', 'taken')")


def _count(db: sqlite3.Connection, *tables: str) -> int:
    return sum(int(db.execute(f"SELECT count(*) FROM {t}").fetchone()[0]) for t in tables)  # noqa: S608


def _upsert(db: sqlite3.Connection, table: str, rows: Iterable[tuple[object, ...]]) -> None:
    _rows(db, f"INSERT OR REPLACE INTO {table}", list(rows))


def _rows(db: sqlite3.Connection, statement: str, rows: list[tuple[object, ...]]) -> None:
    """`statement` (an INSERT up to its VALUES, or a DELETE up to its IN) for every row.

    A few thousand rows per statement, read by SQLite from one JSON text, not bound one by
    one: executemany gives up the GIL around each row and must win it back from the event
    loop for the next, so a commit of tens of thousands of rows written beside a busy walk
    crawls and keeps interrupting it. The GIL is held only while msgspec writes the text.
    """
    if not rows:
        return
    width = len(rows[0])
    columns = ", ".join(f"value ->> {i}" for i in range(width))
    select = f"SELECT {columns} FROM json_each(?)"  # noqa: S608  # our constants
    sql = f"{statement} ({select})" if statement.endswith(" IN") else f"{statement} {select}"
    for at in range(0, len(rows), _JSON_ROWS):
        db.execute(sql, (msgspec.json.encode(rows[at : at + _JSON_ROWS]),))


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
    age out of the overlap. Schema 2's last-seen tables are this schema's; schema 1 kept them
    by guid text.
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
                (time, _key_text((content, user, started)), state, state != 1),
            )
    if "old_visit_keys" in tables:
        for key, count, time in db.execute(
            "SELECT key, max(count), max(time) FROM old_visit_keys GROUP BY key"
        ).fetchall():
            db.execute(
                "INSERT INTO keys VALUES ('legacy', ?, ?, ?, 0)",
                (time, _key_text((bytes(key).hex(),)), count),
            )
    if "old_guids" in tables:  # schema 2: the id-keyed tables as they are
        db.execute("INSERT INTO guids SELECT id, guid FROM old_guids")
        for table in ("user_last", "user_last_log"):
            db.execute(f"INSERT INTO {table} SELECT user_id, last FROM old_{table}")  # noqa: S608
        for table in ("pair_last", "pair_last_log"):
            db.execute(
                f"INSERT INTO {table} SELECT content_id, user_id, last FROM old_{table}"  # noqa: S608
            )
    elif "old_user_last" in tables:  # schema 1: guid text, given ids here
        db.execute(
            "INSERT OR IGNORE INTO guids (guid) "
            "SELECT user_guid FROM old_user_last UNION SELECT user_guid FROM old_user_last_log "
            "UNION SELECT content_guid FROM old_pair_last "
            "UNION SELECT user_guid FROM old_pair_last "
            "UNION SELECT content_guid FROM old_pair_last_log "
            "UNION SELECT user_guid FROM old_pair_last_log"
        )
        for table in ("user_last", "user_last_log"):
            db.execute(
                f"INSERT INTO {table} SELECT g.id, t.last FROM old_{table} t "  # noqa: S608
                "JOIN guids g ON g.guid = t.user_guid"
            )
        for table in ("pair_last", "pair_last_log"):
            db.execute(
                f"INSERT INTO {table} SELECT c.id, u.id, t.last FROM old_{table} t "  # noqa: S608
                "JOIN guids c ON c.guid = t.content_guid JOIN guids u ON u.guid = t.user_guid"
            )
    # Earlier exporters counted from their first start and showed the counters at once.
    if db.execute("SELECT 1 FROM meta WHERE key = 'counting_since'").fetchone():
        db.execute(
            "INSERT OR IGNORE INTO meta "
            "SELECT 'takeover', value FROM meta WHERE key = 'counting_since'"
        )
        db.execute("INSERT INTO baseline_counters SELECT name, label, value FROM counters")
        db.execute(
            "INSERT INTO baseline_durations SELECT content_guid, counts, sum_us FROM durations"
        )
        db.execute("INSERT OR REPLACE INTO meta VALUES ('baseline', 'taken')")
    if "old_content_last" in tables:
        db.execute("INSERT INTO content_last SELECT content_guid, last FROM old_content_last")
    for table in _OLD_TABLES:
        if f"old_{table}" in tables:
            db.execute(f"DROP TABLE old_{table}")


def _bucket_text() -> str:
    return ",".join(repr(b) for b in DURATION_BUCKETS)
