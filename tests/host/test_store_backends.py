"""The results store on SQLite and on a real PostgreSQL server: one contract, versioned migrations,
concurrent collectors on one database with 0 lost and 0 duplicated reports."""
from __future__ import annotations

import json
import sqlite3
import threading
import uuid

import pytest
from pgcluster import PgCluster, missing_reason

from edgepipe.device.http import ClientError, request
from edgepipe.device.report import new_report
from edgepipe.pipeline import store_schema
from edgepipe.pipeline.collector import CollectorServer
from edgepipe.pipeline.store import open_store
from edgepipe.pipeline.store_schema import LATEST, ReportConflict, SchemaTooNew, StoreError, Unstorable

TOKEN = "pg-token"


@pytest.fixture(scope="module")
def pg():
    why = missing_reason()
    if why:
        pytest.skip(why)
    with PgCluster() as cluster:
        yield cluster


@pytest.fixture(params=["sqlite", "postgres"])
def target(request, tmp_path):
    """A fresh, empty database of each kind."""
    if request.param == "sqlite":
        return str(tmp_path / "results.db")
    cluster = request.getfixturevalue("pg")
    return cluster.create_db("t" + uuid.uuid4().hex[:12])


def rep(host="pi-1", dev_id=None, name=None, recipe="int8", kind="bench", p50=10.0, threads=4, source=None):
    dev = {"hostname": host}
    if dev_id:
        dev.update(id=dev_id, name=name)
    r = new_report(kind, device=dev, runtime={"backend": "ai_edge_litert", "delegate": "cpu", "threads": threads},
                   model={"name": f"mnv2-{recipe}", "recipe": recipe, "sha256": "a" * 64, "size": 1000},
                   latency_ms={"n": 10, "mean": p50, "std": 0.1, "min": p50 * 0.9, "p50": p50, "p90": p50 * 1.1,
                               "p99": p50 * 1.2, "max": p50 * 1.5})
    if source:
        r["input"] = {"kind": "video", "source": source}
    return r


def test_same_contract_on_both(target):
    with open_store(target) as s:
        assert s.schema_version == LATEST
        a = rep(dev_id="dev-aaaaaaaa", name="bench-a", source="clips/cars.avi")
        assert s.add(a) is True
        assert s.add(json.loads(json.dumps(a))) is False  # same body again: a duplicate, not an error
        with pytest.raises(ReportConflict):
            s.add(dict(a, created="2000-01-01T00:00:00+00:00"))
        with pytest.raises(Unstorable):
            s.add(rep(threads=2 ** 70))
        with pytest.raises(Unstorable):
            s.add(rep(host="bad\x00host"))
        s.add(rep(host="pi-2"))  # no device id: keeps its hostname identity
        assert s.count() == 2
        for dev in ("dev-aaaaaaaa", "bench-a", "pi-1"):
            assert [r["id"] for r in s.query(device=dev)] == [a["id"]]
        assert len(s.query(device="pi-2")) == 1 and s.query(device="nobody") == []
        assert [r["id"] for r in s.query(source="video:cars.avi")] == [a["id"]]
        assert len(s.query(limit=1)) == 1 and s.get(a["id"]) == a
        before = s.revision()
        s.add(rep(host="pi-3"))
        assert s.revision() != before


def test_one_bad_report_never_fails_its_batch(target):
    with open_store(target) as s:
        good = [rep(host=f"pi-{i}") for i in range(40)]
        bad = [rep(threads=2 ** 70) for _ in range(5)] + [rep(host="nul\x00")]
        errors, results = [], []

        def send(r):
            try:
                results.append(s.add(r))
            except StoreError as e:
                errors.append(e)

        threads = [threading.Thread(target=send, args=(r,)) for r in good + bad]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(errors) == len(bad) and all(isinstance(e, Unstorable) for e in errors)
        assert results.count(True) == len(good) and s.count() == len(good)


def test_legacy_sqlite_database_is_migrated_and_keeps_hostname_identity(tmp_path):
    db = tmp_path / "old.db"
    old = rep(host="raspberrypi")
    newer = rep(host="lab-pi5", dev_id="dev-bbbbbbbb", name="pi5", source="photos/")
    con = sqlite3.connect(db)
    con.executescript(store_schema.MIGRATIONS[0].sqlite[0] + ";")
    for r in (old, newer):  # rows written by the version-1 store, ids already in the newer body
        con.execute("INSERT INTO reports (id, created, received, kind, hostname, model, recipe, sha256, delegate,"
                    " threads, body) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                    (r["id"], r["created"], 1.0, "bench", r["device"]["hostname"], r["model"]["name"], "int8",
                     "a" * 64, "cpu", 4, json.dumps(r)))
    con.execute("PRAGMA user_version=1")
    con.commit()
    con.close()
    with open_store(str(db)) as s:
        assert s.schema_version == LATEST
        assert [r["id"] for r in s.query(device="raspberrypi")] == [old["id"]]
        assert [r["id"] for r in s.query(device="dev-bbbbbbbb")] == [newer["id"]]
        assert [r["id"] for r in s.query(source="video:photos")] == [newer["id"]]
    con = sqlite3.connect(db)
    versions = [v for (v,) in con.execute("SELECT version FROM schema_migrations ORDER BY version")]
    con.close()
    assert versions == list(range(1, LATEST + 1))


def test_newer_schema_is_refused_in_one_line(target):
    with open_store(target) as s:
        s.add(rep())
    if target.startswith("postgresql://"):
        import psycopg

        with psycopg.connect(target, autocommit=True) as c:
            c.execute("INSERT INTO schema_migrations VALUES (99, 'future', 'now')")
    else:
        con = sqlite3.connect(target)
        con.execute("INSERT INTO schema_migrations VALUES (99, 'future', 'now')")
        con.commit()
        con.close()
    with pytest.raises(SchemaTooNew, match="upgrade edgepipe") as e:
        open_store(target)
    assert "\n" not in str(e.value)


def test_postgres_unreachable_is_one_line():
    with pytest.raises(StoreError, match="cannot connect") as e:
        open_store("postgresql://nobody:secret@127.0.0.1:1/none")
    assert "secret" not in str(e.value)


@pytest.mark.slow
def test_concurrent_collectors_on_one_postgres_database(pg):
    """3 collectors, 24 senders; every report delivered twice through different collectors."""
    url = pg.create_db("fleet")
    servers = [CollectorServer(open_store(url), "127.0.0.1", 0, token=TOKEN) for _ in range(3)]
    for srv in servers:
        srv.start_background()
    sent, failures = [], []
    lock = threading.Lock()

    def sender(k: int) -> None:
        for i in range(20):
            r = rep(host=f"pi-{k:02d}", dev_id=f"dev-{k:08d}", p50=5.0 + i)
            with lock:
                sent.append(r["id"])
            for hop in (k + i, k + i + 1):  # a lost reply makes the device send again, maybe elsewhere
                try:
                    request("POST", servers[hop % 3].url + "/v1/reports", body=r, token=TOKEN, timeout=30)
                except ClientError as e:
                    failures.append(str(e))

    threads = [threading.Thread(target=sender, args=(k,)) for k in range(24)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not failures, failures[:3]
        with open_store(url) as s:
            stored = [r["id"] for r in s.query(limit=10000)]
        assert len(stored) == len(set(stored)) == len(sent)   # 0 duplicated
        assert set(stored) == set(sent)                        # 0 lost
    finally:
        for srv in servers:
            srv.shutdown()
            srv.server_close()
            srv.store.close()
