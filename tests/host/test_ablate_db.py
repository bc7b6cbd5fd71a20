"""`edgepipe ablate --db`: every point's bench/eval reports in the results store, listed by `edgepipe report`."""
from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgepipe.pipeline.cli import main

REPO = Path(__file__).resolve().parents[2]
FM_TEST = REPO / "sample_data" / "fashion_mnist" / "test"
MODEL = REPO / "tests" / "data" / "models" / "float.tflite"

SPEC = f"""
name = "dbt"
[model]
source = "sample:fashion_mnist"
preprocess = "unit"
[data]
dir = "{FM_TEST}"
limit = 10
calib_limit = 10
[axes]
recipe = ["fp32"]
threads = [1, 2]
[bench]
runs = 5
warmup = 1
"""


def _report_rows(db: Path) -> list:
    r = CliRunner().invoke(main, ["report", "--db", str(db), "--json"])
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)["rows"]


@pytest.fixture(scope="module")
def pg():
    from pgcluster import PgCluster, missing_reason

    if missing_reason():
        pytest.skip(missing_reason())
    with PgCluster() as cluster:
        yield cluster


@pytest.fixture(params=["sqlite", "postgres"])
def new_db(request, tmp_path):
    """Makes fresh empty databases of one kind: a SQLite path or a postgresql:// URL."""
    if request.param == "sqlite":
        return lambda: str(tmp_path / f"{uuid.uuid4().hex[:8]}.db")
    cluster = request.getfixturevalue("pg")
    return lambda: cluster.create_db("a" + uuid.uuid4().hex[:12])


def test_point_reports_are_kept_and_stored_once(tmp_path, new_db):
    """Fast: real bench reports through the keep callback into a real store (SQLite and PostgreSQL)."""
    from edgepipe.device.bench import run_bench
    from edgepipe.pipeline.ablate_store import PointReports
    from edgepipe.pipeline.store import open_store

    reps = [run_bench(MODEL, threads=t, runs=3, warmup=1) for t in (1, 2)]
    with open_store(new_db()) as store:
        keep = PointReports(tmp_path / "out", store)
        keep("fp32 t1", [reps[0]])
        keep("fp32 t2", [reps[1], reps[0]])  # e.g. an eval report shared by a bundle's points: once
        assert (keep.tally.new, keep.tally.known, keep.tally.failed) == (2, 0, 0)
        again = PointReports(tmp_path / "out", store)  # a re-run: the point comes from the cache
        again("fp32 t1", None)
        assert (again.tally.new, again.tally.known) == (0, 1) and store.count() == 2
    with open_store(new_db()) as store:  # a later run with --db stores the kept reports
        keep = PointReports(tmp_path / "out", store)
        keep("fp32 t1", None)
        keep("fp32 t2", None)
        keep("never measured", None)
        assert keep.tally.new == 2 and store.count() == 2
    (tmp_path / "out" / "reports").joinpath(PointReports(tmp_path / "out").path("x").name).write_text("[1")
    assert PointReports(tmp_path / "out").load("x") == []  # a cut file is no reports, not an error


def test_bad_db_fails_before_any_work(tmp_path):
    spec = tmp_path / "spec.toml"
    spec.write_text(SPEC, encoding="utf-8")
    not_db = tmp_path / "notes.txt"
    not_db.write_text("not a database, just text " * 100)
    r = CliRunner().invoke(main, ["ablate", str(spec), "--out", str(tmp_path / "o"), "--db", str(not_db)])
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert r.output.strip().splitlines()[-1].startswith("Error: --db: ")
    assert not (tmp_path / "o" / "points.jsonl").exists()


@pytest.mark.slow
@pytest.mark.host
def test_ablate_db_stores_points_that_report_lists(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEPIPE_CACHE", str(tmp_path / "cache"))
    spec = tmp_path / "spec.toml"
    spec.write_text(SPEC, encoding="utf-8")
    out, db = tmp_path / "out", tmp_path / "results.db"
    r = CliRunner().invoke(main, ["ablate", str(spec), "--out", str(out), "--db", str(db), "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["stored"]["new"] == 3 and doc["stored"]["failed"] == 0  # 2 bench (t1, t2) + 1 eval (the bundle)
    rows = _report_rows(db)
    bench = sorted((x for x in rows if x["kind"] == "bench"), key=lambda x: x["threads"])
    assert [(x["recipe"], x["threads"]) for x in bench] == [("fp32", 1), ("fp32", 2)]
    by_threads = {x["point"]["threads"]: x["p50_ms"] for x in doc["results"]}
    assert [x["p50"] for x in bench] == [pytest.approx(by_threads[1]), pytest.approx(by_threads[2])]
    assert [x["recipe"] for x in rows if x["kind"] == "eval"] == ["fp32"]

    # Resumed with a second database: every point is cached, its kept reports are stored there too.
    db2 = tmp_path / "team.db"
    r = CliRunner().invoke(main, ["ablate", str(spec), "--out", str(out), "--db", str(db2)])
    assert r.exit_code == 0, r.output
    assert f"stored 3 new report(s) in {db2}" in r.stdout
    assert len(_report_rows(db2)) == len(rows)
    # And again into the first one: nothing is stored twice.
    r = CliRunner().invoke(main, ["ablate", str(spec), "--out", str(out), "--db", str(db)])
    assert r.exit_code == 0 and "stored 0 new report(s)" in r.stdout and "(3 already there)" in r.stdout
