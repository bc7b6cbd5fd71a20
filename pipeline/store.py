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
from pathlib import Path
from typing import Iterable, Optional

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


def default_db_path() -> Path:
    """``$EDGEPIPE_DB``, else the user's data directory (never the cwd)."""
    return user_dir("data", "edgepipe", "results.db", env="EDGEPIPE_DB")


class _Pending:
    __slots__ = ("row", "done", "new", "error")

    def __init__(self, row: tuple):
        self.row, self.done, self.new, self.error = row, False, None, None


class Store:
    """Thread-safe report store; one connection guarded by a lock.

    SQLite serialises writers anyway; a single connection with a short
    critical section is faster than a connection per thread for small rows.
    """

    def __init__(self, path: os.PathLike):
        self.path = Path(path)
        if str(path) != ":memory:":
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._queue_lock = threading.Lock()
        self._queue: list = []
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
        """Store ``report``; True when new, False when its id was already stored.

        Group commit: concurrent callers queue their rows and whoever holds
        the database lock writes every queued row in one transaction, so a
        burst of reporters costs one commit instead of one each.
        """
        rt = report.get("runtime") or {}
        model = report.get("model") or {}
        dev = report.get("device") or {}
        item = _Pending((
            report["id"], str(report.get("created", "")), time.time(), str(report.get("kind", "")),
            dev.get("hostname"), model.get("name"), model.get("recipe"), model.get("sha256"),
            rt.get("delegate"), rt.get("threads"),
            json.dumps(report, separators=(",", ":"), sort_keys=True),
        ))
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
        try:
            self._db.execute("BEGIN IMMEDIATE")
            for it in batch:
                cur = self._db.execute(
                    "INSERT OR IGNORE INTO reports (id, created, received, kind, hostname, model, recipe,"
                    " sha256, delegate, threads, body) VALUES (?,?,?,?,?,?,?,?,?,?,?)", it.row)
                it.new = cur.rowcount == 1
            self._db.execute("COMMIT")
        except Exception as e:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            for it in batch:
                it.new, it.error = None, e
        finally:
            for it in batch:
                it.done = True

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
            where.append(f"{col} = ?")
            args.append(int(value) if col == "threads" else str(value))
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
