"""The results store on PostgreSQL (psycopg 3): one shared database for a team.

Same interface and same schema (pipeline/store_schema.py) as the SQLite store.
Several collectors, `edgepipe bench` runs and CI jobs may write to one database
at once: the report id is the primary key and inserts are ``ON CONFLICT DO
NOTHING``, so a report delivered twice, through two collectors, is stored
once. Writers group-commit like the SQLite store; reads use their own
connection so a dashboard never waits behind a burst of ingest.
"""
from __future__ import annotations

import json
import re
import threading
from typing import Optional

from edgepipe.device.errors import one_line
from edgepipe.pipeline.store_schema import (COLUMNS, Dialect, GroupCommit, Pending, ReportConflict, StoreError,
                                            Unstorable, check_version, current_version, migrate, same_report,
                                            select_sql)

# Serialises schema migrations across every process that opens the database.
_MIGRATION_LOCK = 0x65646765  # "edge"
URL_PREFIXES = ("postgresql://", "postgres://")
_INSERT = (f"INSERT INTO reports ({', '.join(COLUMNS)}) VALUES ({', '.join(['%s'] * len(COLUMNS))})"
           " ON CONFLICT (id) DO NOTHING RETURNING id")


def is_pg_url(target) -> bool:
    return isinstance(target, str) and target.startswith(URL_PREFIXES)


def redact(url: str) -> str:
    """``url`` without its password, for messages and logs."""
    return re.sub(r"(://[^:/@]*):[^@/]*@", r"\1:***@", url)


def _psycopg():
    try:
        import psycopg
    except ImportError:
        raise StoreError("PostgreSQL results need psycopg 3: pip install 'psycopg[binary]'") from None
    return psycopg


class _PgDialect(Dialect):
    name = "postgres"

    def __init__(self, cur):
        self.cur = cur

    def execute(self, sql: str, args: tuple = ()) -> None:
        self.cur.execute(sql.replace("?", "%s"), args)

    def fetchall(self, sql: str, args: tuple = ()) -> list:
        self.cur.execute(sql.replace("?", "%s"), args)
        return self.cur.fetchall()

    def table_exists(self, name: str) -> bool:
        self.cur.execute("SELECT to_regclass(%s)", (name,))
        return self.cur.fetchone()[0] is not None


class PgStore(GroupCommit):
    """Thread-safe report store on a PostgreSQL database given by URL."""

    dialect = "postgres"

    def __init__(self, url: str, *, readonly: bool = False, connect_timeout: int = 10):
        self.url = url
        self.path = redact(url)  # what messages show; never the password
        self.readonly = readonly
        self._timeout = connect_timeout
        self._init_queue()                   # _lock guards the writer connection
        self._read_lock = threading.Lock()   # the reader connection
        self._w = self._connect()
        self._r = None
        try:
            self.schema_version = self._prepare()
        except BaseException:
            self._w.close()
            raise

    # -- connections ---------------------------------------------------------
    def _connect(self):
        psycopg = _psycopg()
        try:
            return psycopg.connect(self.url, autocommit=True, connect_timeout=self._timeout,
                                   application_name="edgepipe")
        except psycopg.Error as e:
            raise StoreError(f"cannot connect to {self.path}: {one_line(e)}") from None

    def _writer(self):
        if self._w.closed or self._w.broken:
            self._w = self._connect()
        return self._w

    def _reader(self):
        if self._r is None or self._r.closed or self._r.broken:
            self._r = self._connect()
        return self._r

    def _prepare(self) -> int:
        psycopg = _psycopg()
        try:
            with self._w.transaction(), self._w.cursor() as cur:
                db = _PgDialect(cur)
                if self.readonly:
                    version = current_version(db)
                    check_version(version, self.path)
                    if version == 0:
                        raise StoreError(f"{self.path} holds no edgepipe results yet")
                    return version
                cur.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
                return migrate(db, self.path)
        except psycopg.Error as e:
            raise StoreError(f"cannot prepare the results schema in {self.path}: {one_line(e)}") from None

    def close(self) -> None:
        with self._lock:
            self._w.close()
        with self._read_lock:
            if self._r is not None:
                self._r.close()

    # -- writes --------------------------------------------------------------
    def _write(self, batch: list) -> None:
        psycopg = _psycopg()
        try:
            conn = self._writer()
            try:
                with conn.transaction(), conn.cursor() as cur:
                    for it in batch:
                        self._insert(cur, it)
            except psycopg.errors.DataError:
                # One bad row must not fail the rest: redo them one transaction each.
                for it in batch:
                    it.new, it.error = None, None
                    try:
                        with conn.transaction(), conn.cursor() as cur:
                            self._insert(cur, it)
                    except psycopg.errors.DataError as e:
                        it.error = Unstorable(f"the database refused a value: {one_line(e)}")
        except psycopg.Error as e:
            err = StoreError(f"cannot write to {self.path}: {one_line(e)}")
            for it in batch:
                it.new, it.error = None, err
        finally:
            for it in batch:
                it.done = True

    @staticmethod
    def _insert(cur, it: Pending) -> None:
        cur.execute(_INSERT, it.row)
        it.new = cur.fetchone() is not None
        if not it.new:
            cur.execute("SELECT body FROM reports WHERE id = %s", (it.row[0],))
            stored = cur.fetchone()
            if stored is not None and not same_report(stored[0], it.row[-1]):
                it.error = ReportConflict(f"report {it.row[0]} is already stored with a different body")

    # -- reads ---------------------------------------------------------------
    def _fetch(self, sql: str, args=()) -> list:
        psycopg = _psycopg()
        with self._read_lock:
            try:
                with self._reader().cursor() as cur:
                    cur.execute(sql, args)
                    return cur.fetchall()
            except psycopg.Error as e:
                raise StoreError(f"cannot read {self.path}: {one_line(e)}") from None

    def get(self, report_id: str) -> Optional[dict]:
        rows = self._fetch("SELECT body FROM reports WHERE id = %s", (report_id,))
        return json.loads(rows[0][0]) if rows else None

    def count(self) -> int:
        return int(self._fetch("SELECT COUNT(*) FROM reports")[0][0])

    def revision(self) -> tuple:
        """(count, newest received time): changes whenever any writer stores a report."""
        n, newest = self._fetch("SELECT COUNT(*), MAX(received) FROM reports")[0]
        return int(n), float(newest or 0.0)

    def query(self, *, since: Optional[str] = None, limit: Optional[int] = None, **filters) -> list:
        """Reports matching ``filters`` (store_schema.FILTERS), oldest first; ``limit`` keeps the newest."""
        select = select_sql(filters, since, limit, "%s", self.schema_version)
        if select is None:
            return []
        sql, args = select
        return [json.loads(r[0]) for r in reversed(self._fetch(sql, args))]

