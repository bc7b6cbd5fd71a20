"""The results database: reports in SQLite (WAL) by default, or PostgreSQL for teams; idempotent on the id.

One row per report: the full JSON plus a few indexed columns the collector
filters on and the report tables group by (pipeline/store_schema.py: columns
and versioned migrations, the same for both). WAL lets the collector,
`edgepipe bench` and `edgepipe report` use the same file at the same time;
:func:`open_store` picks the PostgreSQL store (pipeline/store_pg.py) for a
``postgresql://`` URL.
"""
from __future__ import annotations

import json
import os
import sqlite3
import urllib.request
from pathlib import Path
from typing import Optional

from edgepipe.device.errors import one_line
from edgepipe.device.paths import user_dir
from edgepipe.pipeline.store_pg import PgStore, is_pg_url
from edgepipe.pipeline.store_schema import (COLUMNS, FILTERS, LATEST, Dialect, GroupCommit, Pending, ReportConflict,
                                            SchemaTooNew, StoreError, Unstorable, check_version, columns,
                                            current_version, migrate, same_report, select_sql)

SCHEMA_VERSION = LATEST
# What the collector's query string may filter on (see store_schema.FILTERS).
__all__ = ["Store", "open_store", "default_db", "default_db_path", "FILTERS", "StoreError", "NotADatabase",
           "Unstorable", "ReportConflict", "SchemaTooNew", "report_row"]
report_row = columns


class NotADatabase(StoreError):
    """The file is missing, not SQLite, or not an edgepipe results database."""


def default_db_path() -> Path:
    """``$EDGEPIPE_DB``, else the user's data directory (never the cwd)."""
    return user_dir("data", "edgepipe", "results.db", env="EDGEPIPE_DB")


class _SqliteDialect(Dialect):
    name = "sqlite"

    def __init__(self, db: sqlite3.Connection):
        self.db = db

    def execute(self, sql: str, args: tuple = ()) -> None:
        self.db.execute(sql, args)

    def fetchall(self, sql: str, args: tuple = ()) -> list:
        return self.db.execute(sql, args).fetchall()

    def table_exists(self, name: str) -> bool:
        return self.db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name=?", (name,)).fetchone() \
            is not None


def default_db() -> str:
    """``$EDGEPIPE_DB`` as given (a path or a postgresql:// URL), else the user's SQLite file."""
    env = os.environ.get("EDGEPIPE_DB", "").strip()
    return env if is_pg_url(env) else str(default_db_path())


def open_store(target=None, *, readonly: bool = False):
    """The results store at ``target``: a postgresql:// URL, else a SQLite file path (default: default_db())."""
    target = default_db() if target is None else str(target)
    if is_pg_url(target):
        return PgStore(target, readonly=readonly)
    return Store(target, readonly=readonly)


_INSERT = f"INSERT OR IGNORE INTO reports ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})"


class Store(GroupCommit):
    """Thread-safe report store; one connection guarded by a lock.

    SQLite serialises writers anyway; a single connection with a short
    critical section is faster than a connection per thread for small rows.
    ``readonly=True`` opens an existing results database without ever
    writing to it (``edgepipe report``), and refuses anything else.
    """

    def __init__(self, path: os.PathLike, *, readonly: bool = False):
        self.path = Path(path)
        self.readonly = readonly
        self._init_queue()
        if readonly:
            self._db = _open_readonly(self.path)
            self.schema_version = current_version(_SqliteDialect(self._db))
            try:
                check_version(self.schema_version, str(self.path))
            except SchemaTooNew:
                self._db.close()
                raise
            return
        if str(path) != ":memory:":
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), check_same_thread=False, timeout=30,
                                   isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        # With WAL, NORMAL survives a process crash; only power loss can drop
        # the last commits, and the device re-sends anything unacknowledged.
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA busy_timeout=30000")
        try:
            self.schema_version = self._migrate()
        except BaseException:
            self._db.close()
            raise

    def _migrate(self) -> int:
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")  # one migrating process at a time
                version = migrate(_SqliteDialect(self._db), str(self.path))
                self._db.execute(f"PRAGMA user_version={version}")
                self._db.execute("COMMIT")
                return version
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _write(self, batch: list) -> None:
        # Each row succeeds or fails on its own: one bad report must never fail the others in its batch.
        try:
            self._db.execute("BEGIN IMMEDIATE")
            for it in batch:
                self._insert(it)
            self._db.execute("COMMIT")
        except sqlite3.Error as e:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            for it in batch:
                it.new, it.error = None, StoreError(f"the results database failed: {one_line(e)}")
        finally:
            for it in batch:
                it.done = True

    def _insert(self, it: Pending) -> None:
        try:
            cur = self._db.execute(_INSERT, it.row)
            it.new = cur.rowcount == 1
            if not it.new:
                old = self._db.execute("SELECT body FROM reports WHERE id=?", (it.row[0],)).fetchone()
                if old is not None and not same_report(old[0], it.row[-1]):
                    it.error = ReportConflict(f"report {it.row[0]} is already stored with a different body")
        except (sqlite3.DataError, sqlite3.IntegrityError, sqlite3.InterfaceError, OverflowError,
                ValueError) as e:  # this row only: the statement failed, the transaction goes on
            it.new, it.error = None, Unstorable(f"the database refused the report: {one_line(e)}")

    def get(self, report_id: str) -> Optional[dict]:
        with self._lock:
            row = self._db.execute("SELECT body FROM reports WHERE id=?", (report_id,)).fetchone()
        return json.loads(row[0]) if row else None

    def count(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM reports").fetchone()[0]

    def revision(self) -> tuple:
        """(count, newest received time): changes whenever any process stores a report."""
        with self._lock:
            n, newest = self._db.execute("SELECT COUNT(*), MAX(received) FROM reports").fetchone()
        return int(n), float(newest or 0.0)

    def query(self, *, since: Optional[str] = None, limit: Optional[int] = None,
              **filters) -> list:
        """Reports matching ``filters`` (see FILTERS), oldest first.

        ``since`` keeps reports created at or after that ISO time; ``limit``
        keeps the newest ``limit`` of them.
        """
        select = select_sql(filters, since, limit, "?", self.schema_version)
        if select is None:
            return []
        sql, args = select
        with self._lock:
            rows = self._db.execute(sql, args).fetchall()
        return [json.loads(r[0]) for r in reversed(rows)]


def _open_readonly(path: Path) -> sqlite3.Connection:
    """A read-only connection to an existing results database, or :class:`NotADatabase`."""
    if not path.is_file():
        raise NotADatabase(f"no results database at {path}")
    uri = "file:" + urllib.request.pathname2url(str(path.resolve())) + "?mode=ro"
    db = None
    try:
        db = sqlite3.connect(uri, uri=True, check_same_thread=False, timeout=30, isolation_level=None)
        db.execute("PRAGMA busy_timeout=30000")
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    except sqlite3.Error as e:
        if db is not None:
            db.close()
        raise NotADatabase(f"{path} is not a readable results database ({one_line(e)})") from None
    if "reports" not in tables:
        db.close()
        raise NotADatabase(f"{path} is not an edgepipe results database (it has no reports table)")
    return db
