"""The results-store schema shared by SQLite and PostgreSQL: columns and versioned migrations.

A report is stored whole (its canonical JSON) plus a few indexed columns the
collector filters on and the report tables group by. Migrations are numbered;
each database records the ones applied in ``schema_migrations``, so every
store (a workstation's SQLite file, a team's PostgreSQL) upgrades itself the
same way when a newer edgepipe opens it. Databases made before this table
existed (SQLite ``user_version`` 1) count as version 1.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import time
from dataclasses import dataclass
import threading
from typing import Callable, Iterable, Optional

from edgepipe.device.errors import EdgepipeError, one_line

# Column order of an INSERT (see columns()).
COLUMNS = ("id", "created", "received", "kind", "hostname", "model", "recipe", "sha256", "delegate",
           "threads", "device_id", "device_name", "source", "body")
INT64 = (-(1 << 63), (1 << 63) - 1)

# Query-string filters -> column (``device`` matches the id, the name or the hostname).
FILTERS = {
    "kind": "kind",
    "device": "device",
    "device_id": "device_id",
    "hostname": "hostname",
    "model": "model",
    "recipe": "recipe",
    "sha256": "sha256",
    "delegate": "delegate",
    "threads": "threads",
    "source": "source",
}


class StoreError(EdgepipeError):
    """The results database cannot do what was asked; one line, no traceback."""


class SchemaTooNew(StoreError):
    """The database was migrated by a newer edgepipe than this one."""


class Unstorable(StoreError):
    """A report that is valid JSON but cannot be stored as it is (the sender must change it)."""


class ReportConflict(StoreError):
    """A different report body under an id that is already stored."""


def source_label(report: dict) -> Optional[str]:
    """What a run or bench read: ``video:clip.avi``, ``images:photos``; None for random bench inputs.

    Part of a configuration's identity, so a video run and a photo run of the
    same bundle are two rows, not one hiding the other.
    """
    inp = report.get("input")
    if not isinstance(inp, dict):
        return None
    kind = inp.get("kind")
    if kind in (None, "random"):
        return None
    src = inp.get("source")
    if not isinstance(src, str) or not src:
        return str(kind)
    base = os.path.basename(src.rstrip("/\\")) or src
    return f"{kind}:{base}"[:200]


def _text(value) -> Optional[str]:
    if value is None:
        return None
    s = str(value)
    if "\x00" in s:  # PostgreSQL text cannot hold NUL; refused on SQLite too, so both agree
        raise Unstorable("a text field contains a NUL character")
    return s


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


def canonical(report: dict) -> str:
    """The stored body: compact, keys sorted, UTF-8; Unstorable for what no database could keep."""
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
    return body


def same_report(stored: str, body: str) -> bool:
    """Whether a stored body is the same report (older versions wrote ASCII-escaped bodies)."""
    return stored == body or json.loads(stored) == json.loads(body)


def columns(report: dict, received: Optional[float] = None) -> tuple:
    """The row for ``report`` in COLUMNS order, or Unstorable naming what no database could keep."""
    rid = report.get("id")
    if not isinstance(rid, str) or not rid:
        raise Unstorable("a report needs a string id")
    body = canonical(report)  # first: it names a lone surrogate's path
    rt, model, dev = (d if isinstance(d, dict) else {} for d in
                      (report.get("runtime"), report.get("model"), report.get("device")))
    threads = rt.get("threads")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int)
                                or not INT64[0] <= threads <= INT64[1]):
        raise Unstorable(f"runtime/threads: {str(threads)[:40]} does not fit a 64-bit integer")
    return (
        _text(rid), str(report.get("created", "")), time.time() if received is None else received,
        _text(report.get("kind", "")), _text(dev.get("hostname")), _text(model.get("name")),
        _text(model.get("recipe")), _text(model.get("sha256")), _text(rt.get("delegate")), threads,
        _text(dev.get("id")), _text(dev.get("name")), _text(source_label(report)), body,
    )


# -- migrations ----------------------------------------------------------------

@dataclass(frozen=True)
class Migration:
    """One schema step: DDL per dialect, then an optional Python backfill ``fill(db)``."""

    version: int
    description: str
    sqlite: tuple
    postgres: tuple
    fill: Optional[Callable] = None


_V1_INDEXES = ("CREATE INDEX IF NOT EXISTS reports_created ON reports(created)",
               "CREATE INDEX IF NOT EXISTS reports_model ON reports(model, recipe)",
               "CREATE INDEX IF NOT EXISTS reports_host ON reports(hostname)")
_V1 = ("CREATE TABLE IF NOT EXISTS reports (id TEXT PRIMARY KEY, created TEXT NOT NULL, received {real} NOT NULL,"
       " kind TEXT NOT NULL, hostname TEXT, model TEXT, recipe TEXT, sha256 TEXT, delegate TEXT,"
       " threads {int}, body TEXT NOT NULL)")
_V2 = ("ALTER TABLE reports ADD COLUMN device_id TEXT",
       "ALTER TABLE reports ADD COLUMN device_name TEXT",
       "ALTER TABLE reports ADD COLUMN source TEXT",
       "CREATE INDEX IF NOT EXISTS reports_device_id ON reports(device_id)",
       "CREATE INDEX IF NOT EXISTS reports_received ON reports(received)")


def _backfill_v2(db) -> None:
    """Identity and input source for rows stored before those columns existed."""
    rows = db.fetchall("SELECT id, body FROM reports WHERE device_id IS NULL AND source IS NULL")
    for rid, body in rows:
        try:
            rep = json.loads(body)
        except ValueError:
            continue
        dev = rep.get("device") if isinstance(rep.get("device"), dict) else {}
        vals = (dev.get("id"), dev.get("name"), source_label(rep))
        if any(v is not None for v in vals):
            db.execute("UPDATE reports SET device_id=?, device_name=?, source=? WHERE id=?",
                       tuple(None if v is None else str(v) for v in vals) + (rid,))


MIGRATIONS = (
    Migration(1, "reports table", (_V1.format(real="REAL", int="INTEGER"),) + _V1_INDEXES,
              (_V1.format(real="DOUBLE PRECISION", int="BIGINT"),) + _V1_INDEXES),
    Migration(2, "device identity and input source columns", _V2, _V2, _backfill_v2),
)
LATEST = MIGRATIONS[-1].version
_VERSIONS = ("CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY,"
             " description TEXT NOT NULL, applied TEXT NOT NULL)")


class Dialect:
    """The few things migrations need from a connection: run SQL with ``?`` placeholders."""

    name = "?"

    def execute(self, sql: str, args: tuple = ()) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def fetchall(self, sql: str, args: tuple = ()) -> list:  # pragma: no cover - abstract
        raise NotImplementedError

    def table_exists(self, name: str) -> bool:  # pragma: no cover - abstract
        raise NotImplementedError


def current_version(db: Dialect) -> int:
    """The schema version of an open database (0 for an empty one)."""
    if db.table_exists("schema_migrations"):
        rows = db.fetchall("SELECT MAX(version) FROM schema_migrations")
        if rows and rows[0][0] is not None:
            return int(rows[0][0])
    return 1 if db.table_exists("reports") else 0


def check_version(version: int, where: str) -> None:
    if version > LATEST:
        raise SchemaTooNew(f"{where} has results schema version {version}, newer than this edgepipe "
                           f"understands ({LATEST}); upgrade edgepipe to use it")


def migrate(db: Dialect, where: str) -> int:
    """Apply every missing migration; the caller holds a write transaction/lock. Returns the version."""
    have = current_version(db)
    check_version(have, where)
    if have == LATEST and db.table_exists("schema_migrations"):
        return have
    db.execute(_VERSIONS)
    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    if have >= 1 and not db.fetchall("SELECT version FROM schema_migrations WHERE version=1"):
        db.execute("INSERT INTO schema_migrations (version, description, applied) VALUES (?,?,?)",
                   (1, MIGRATIONS[0].description + " (found)", now))
    for m in MIGRATIONS:
        if m.version <= have:
            continue
        for sql in (m.sqlite if db.name == "sqlite" else m.postgres):
            db.execute(sql)
        if m.fill is not None:
            m.fill(db)
        db.execute("INSERT INTO schema_migrations (version, description, applied) VALUES (?,?,?)",
                   (m.version, m.description, now))
    return LATEST


def where_clause(filters: dict, since: Optional[str], ph: str = "?", version: int = LATEST) -> Optional[tuple]:
    """(SQL after WHERE or "", args) for FILTERS, or None when no stored report can match.

    ValueError names an unknown filter. ``version`` < 2 (an old database opened
    read-only) has only hostnames: ``device`` matches those.
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
            if not INT64[0] <= value <= INT64[1]:
                return None  # no stored report can match, and no database can bind it
        if version < 2 and col in ("device_id", "source"):
            return None
        if version < 2 and col == "device":
            col = "hostname"
        if col == "device":
            # Rows stored before device ids existed keep their hostname identity.
            where.append(f"(device_id = {ph} OR device_name = {ph} OR hostname = {ph})")
            args += [str(value)] * 3
        else:
            where.append(f"{col} = {ph}")
            args.append(value if col == "threads" else str(value))
    if since:
        where.append(f"created >= {ph}")
        args.append(since)
    return " AND ".join(where), args


def select_sql(filters: dict, since: Optional[str], limit: Optional[int], ph: str,
               version: int = LATEST) -> Optional[tuple]:
    """(SELECT of matching bodies, newest first, args), or None when no stored report can match."""
    clause = where_clause(filters, since, ph, version)
    if clause is None:
        return None
    where, args = clause
    sql = "SELECT body FROM reports" + (f" WHERE {where}" if where else "")
    sql += " ORDER BY created DESC, received DESC"
    if limit is not None:
        sql += f" LIMIT {ph}"
        args.append(int(limit))
    return sql, args


class Pending:
    """One report row waiting in a store's group-commit queue, and how its write went."""

    __slots__ = ("row", "done", "new", "error")

    def __init__(self, row: tuple):
        self.row, self.done, self.new, self.error = row, False, None, None


class GroupCommit:
    """What both stores share: group-committed :meth:`add` and the context manager.

    Subclasses set ``path`` and ``readonly``, implement ``_write(batch)`` (mark every
    Pending done, with ``new`` or ``error`` set) and ``close()``, and call
    ``_init_queue()`` in ``__init__``. ``_lock`` guards the writer.
    """

    def _init_queue(self) -> None:
        self._lock = threading.Lock()
        self._queue_lock = threading.Lock()
        self._queue: list = []

    def add(self, report: dict) -> bool:
        """Store ``report``; True when new, False when the same report was already stored.

        Raises :class:`Unstorable` for a report no database could keep and
        :class:`ReportConflict` for a different body under a stored id; either
        concerns this report alone. Group commit: concurrent callers queue
        their rows and whoever holds the writer lock writes every queued row
        in one transaction, so a burst of reporters costs one commit.
        """
        if self.readonly:
            raise StoreError(f"{self.path} is open read-only")
        item = Pending(columns(report))
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

    def add_many(self, reports: Iterable[dict]) -> int:
        """Store several reports; returns how many were new."""
        return sum(1 for r in reports if self.add(r))

    def _write(self, batch: list) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
