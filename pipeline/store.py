"""The results database: reports in SQLite (WAL), idempotent on the report id.

One row per report: the full JSON plus a few indexed columns the collector
filters on and the report tables group by. WAL lets the collector, `edgepipe
bench` and `edgepipe report` use the same file at the same time.
"""
from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
import urllib.request
from pathlib import Path
from typing import Iterable, Optional

from edgepipe.device.errors import EdgepipeError, one_line
from edgepipe.device.paths import user_dir

SCHEMA_VERSION = 1

_DDL = """
CREATE TABLE IF NOT EXISTS reports (
    id        TEXT PRIMARY KEY,
    created   TEXT NOT NULL,
    received  REAL NOT NULL,
    kind      TEXT NOT NULL,
    hostname  TEXT,
    model     TEXT,
    recipe    TEXT,
    sha256    TEXT,
    delegate  TEXT,
    threads   INTEGER,
    body      TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS reports_created ON reports(created);
CREATE INDEX IF NOT EXISTS reports_model ON reports(model, recipe);
CREATE INDEX IF NOT EXISTS reports_host ON reports(hostname);
"""

# Query-string filters the collector accepts -> column.
FILTERS = {
    "kind": "kind",
    "device": "hostname",
    "hostname": "hostname",
    "model": "model",
    "recipe": "recipe",
    "sha256": "sha256",
    "delegate": "delegate",
    "threads": "threads",
}


# SQLite INTEGER is a signed 64-bit value.
_INT64 = range(-(1 << 63), 1 << 63)


class StoreError(EdgepipeError):
    """The results database cannot do what was asked; one line, no traceback."""


class NotADatabase(StoreError):
    """The file is missing, not SQLite, or not an edgepipe results database."""


class Unstorable(StoreError):
    """A report that is valid JSON but cannot be stored as it is (the sender must change it)."""


class ReportConflict(StoreError):
    """A different report body under an id that is already stored."""


def default_db_path() -> Path:
    """``$EDGEPIPE_DB``, else the user's data directory (never the cwd)."""
    return user_dir("data", "edgepipe", "results.db", env="EDGEPIPE_DB")


class _Pending:
    __slots__ = ("row", "done", "new", "error")

    def __init__(self, row: tuple):
        self.row, self.done, self.new, self.error = row, False, None, None


def _text(v) -> Optional[str]:
    return None if v is None else str(v)


def _lone_surrogate_path(doc, path: str = "") -> Optional[str]:
    """Where a string holds a lone UTF-16 surrogate (only called once encoding failed)."""
    stack = [(path or "(root)", doc)]
    while stack:
        where, v = stack.pop()
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                return where
        elif isinstance(v, dict):
            for k, x in v.items():
                stack.append((f"{where}/{k}" if where != "(root)" else str(k), k))
                stack.append((f"{where}/{k}" if where != "(root)" else str(k), x))
        elif isinstance(v, (list, tuple)):
            stack.extend((f"{where}/{i}", x) for i, x in enumerate(v))
    return None


def report_row(report: dict) -> tuple:
    """The row stored for ``report``, or :class:`Unstorable` naming what no database could keep."""
    rid = report.get("id")
    if not isinstance(rid, str) or not rid:
        raise Unstorable("a report needs a string id")
    rt = report.get("runtime") or {}
    model = report.get("model") or {}
    dev = report.get("device") or {}
    threads = rt.get("threads") if isinstance(rt, dict) else None
    if threads is not None and (not isinstance(threads, int) or threads not in _INT64):
        raise Unstorable(f"runtime/threads: {str(threads)[:40]} does not fit a 64-bit integer")
    try:
        body = json.dumps(report, separators=(",", ":"), sort_keys=True, ensure_ascii=False, allow_nan=False)
        body.encode("utf-8")
    except ValueError as e:
        if isinstance(e, UnicodeEncodeError):
            where = (_lone_surrogate_path(report) or "(root)").encode("utf-8", "backslashreplace").decode()[:120]
            raise Unstorable(f"{where}: a string holds a lone UTF-16 surrogate; text must be valid Unicode") \
                from None
        raise Unstorable("a number is NaN or infinite; JSON has no such values") from None
    except (TypeError, RecursionError) as e:
        raise Unstorable(f"not storable as JSON: {one_line(e)}") from None
    get = lambda d, k: _text(d.get(k)) if isinstance(d, dict) else None  # noqa: E731
    return (rid, str(report.get("created", "")), time.time(), str(report.get("kind", "")),
            get(dev, "hostname"), get(model, "name"), get(model, "recipe"), get(model, "sha256"),
            get(rt, "delegate"), threads, body)


def _same_report(stored: str, body: str) -> bool:
    # Bodies written by older versions were ASCII-escaped: compare the parsed documents.
    return stored == body or json.loads(stored) == json.loads(body)


class Store:
    """Thread-safe report store; one connection guarded by a lock.

    SQLite serialises writers anyway; a single connection with a short
    critical section is faster than a connection per thread for small rows.
    ``readonly=True`` opens an existing results database without ever
    writing to it (``edgepipe report``), and refuses anything else.
    """

    def __init__(self, path: os.PathLike, *, readonly: bool = False):
        self.path = Path(path)
        self.readonly = readonly
        self._lock = threading.Lock()
        self._queue_lock = threading.Lock()
        self._queue: list = []
        if readonly:
            self._db = _open_readonly(self.path)
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
        with self._lock:
            self._db.executescript(_DDL)
            self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def add(self, report: dict) -> bool:
        """Store ``report``; True when new, False when the same report was already stored.

        Raises :class:`Unstorable` for a report no database could keep and
        :class:`ReportConflict` for a different body under a stored id; either
        concerns this report alone. Group commit: concurrent callers queue
        their rows and whoever holds the database lock writes every queued row
        in one transaction, so a burst of reporters costs one commit.
        """
        if self.readonly:
            raise StoreError(f"{self.path} is open read-only")
        item = _Pending(report_row(report))
        with self._queue_lock:
            self._queue.append(item)
        with self._lock:
            if not item.done:
                with self._queue_lock:
                    batch, self._queue = self._queue, []
                self._write(batch)
        if item.error is not None:
            raise item.error
        return bool(item.new)

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

    def _insert(self, it: _Pending) -> None:
        try:
            cur = self._db.execute(
                "INSERT OR IGNORE INTO reports (id, created, received, kind, hostname, model, recipe,"
                " sha256, delegate, threads, body) VALUES (?,?,?,?,?,?,?,?,?,?,?)", it.row)
            it.new = cur.rowcount == 1
            if not it.new:
                old = self._db.execute("SELECT body FROM reports WHERE id=?", (it.row[0],)).fetchone()
                if old is not None and not _same_report(old[0], it.row[-1]):
                    it.error = ReportConflict(f"report {it.row[0]} is already stored with a different body")
        except (sqlite3.DataError, sqlite3.IntegrityError, sqlite3.InterfaceError, OverflowError,
                ValueError) as e:  # this row only: the statement failed, the transaction goes on
            it.new, it.error = None, Unstorable(f"the database refused the report: {one_line(e)}")

    def add_many(self, reports: Iterable[dict]) -> int:
        """Store several reports; returns how many were new."""
        return sum(1 for r in reports if self.add(r))

    def get(self, report_id: str) -> Optional[dict]:
        with self._lock:
            row = self._db.execute("SELECT body FROM reports WHERE id=?", (report_id,)).fetchone()
        return json.loads(row[0]) if row else None

    def count(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM reports").fetchone()[0]

    def query(self, *, since: Optional[str] = None, limit: Optional[int] = None,
              **filters) -> list:
        """Reports matching ``filters`` (see FILTERS), oldest first.

        ``since`` keeps reports created at or after that ISO time; ``limit``
        keeps the newest ``limit`` of them.
        """
        where, args = [], []
        for key, value in filters.items():
            if value is None:
                continue
            col = FILTERS.get(key)
            if col is None:
                raise ValueError(f"unknown filter {key!r} (known: {', '.join(sorted(FILTERS))})")
            if col == "threads":
                value = int(value)
                if value not in _INT64:  # no stored report can match, and SQLite cannot bind it
                    return []
            where.append(f"{col} = ?")
            args.append(value if col == "threads" else str(value))
        if since:
            where.append("created >= ?")
            args.append(since)
        sql = "SELECT body FROM reports"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY created DESC, received DESC"
        if limit is not None:
            sql += " LIMIT ?"
            args.append(int(limit))
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
