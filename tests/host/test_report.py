"""`edgepipe report`: tables, latest-per-configuration, --json/--save, --compare gate, --html."""
from __future__ import annotations

import json
import re

import pytest
from click.testing import CliRunner

from edgepipe.device.report import new_report
from edgepipe.pipeline.cli import main as edgepipe
from edgepipe.pipeline.reporting import compare, latest, quantized_slower, row
from edgepipe.pipeline.store import Store

P50 = {  # device -> recipe -> p50 ms; int8 is slower than fp32 on "pi3" (the classic complaint)
    "pi5": {"fp32": 20.0, "fp16": 20.3, "dynamic": 15.0, "int8": 8.0},
    "pi3": {"fp32": 50.0, "fp16": 50.5, "dynamic": 61.0, "int8": 40.0},
}


def make(device, recipe, p50, threads=4, delegate="cpu", load="cold"):
    r = new_report("bench", device={"hostname": device, "governor": "performance"},
                   runtime={"backend": "ai_edge_litert", "version": "2.3.0", "delegate": delegate,
                            "threads": threads, "load": load},
                   model={"name": f"mnv2-{recipe}", "recipe": recipe, "sha256": recipe[:1] * 64, "size": 3_500_000},
                   load_ms={"file_read": 1.0, "interpreter_build": 12.0, "delegate": 0.0, "allocate": 3.0,
                            "first_invoke": 2 * p50} if load == "cold" else None,
                   latency_ms={"n": 100, "mean": p50 * 1.02, "std": 0.5, "min": p50 * 0.9, "p50": p50,
                               "p90": p50 * 1.1, "p99": p50 * 1.3, "max": p50 * 1.6},
                   throughput={"fps": 1000 / p50, "mode": "sequential", "workers": 1, "frames": 100})
    return r


@pytest.fixture
def db(tmp_path):
    path = tmp_path / "results.db"
    with Store(path) as s:
        for dev, recipes in P50.items():
            for recipe, p50 in recipes.items():
                s.add(make(dev, recipe, p50 * 1.5))  # an older, slower measurement...
                s.add(make(dev, recipe, p50))        # ...superseded by the newest one
        s.add(make("pi5", "int8", 9.0, threads=1))   # another thread count: its own configuration
    return path


def run(*args):
    res = CliRunner().invoke(edgepipe, ["report", *map(str, args)])
    return res


def test_latest_rows_and_quantized_slower_warning(db):
    with Store(db) as s:
        rows = latest(row(r) for r in s.query())
    assert len(rows) == 9
    assert {(r["device"], r["recipe"], r["threads"]): r["p50"] for r in rows}[("pi3", "int8", 4)] == 40.0
    warns = quantized_slower(rows)
    # dynamic on pi3 is 22% slower than fp32; fp16 is within the 5% margin.
    assert len(warns) == 1 and "pi3" in warns[0] and "dynamic is slower than fp32" in warns[0]


def test_report_tables_and_json(db):
    res = run("--db", db)
    assert res.exit_code == 0, res.output
    assert re.search(r"pi3 +mnv2 +int8 +bench +cpu +4 +40\.00", res.output)
    assert "warning: pi3: mnv2 dynamic is slower than fp32" in res.output
    assert "pi5: fastest mnv2 is int8" in res.output
    assert "mnv2 p50 ms" in res.output  # the device x recipe pivot
    res = run("--db", db, "--json", "--device", "pi5")
    doc = json.loads(res.stdout)
    assert doc["schema"] == "edgepipe.reportset/1" and {r["device"] for r in doc["rows"]} == {"pi5"}
    assert len(doc["rows"]) == 5 and doc["warnings"] == []
    assert len(json.loads(run("--db", db, "--json", "--all").stdout)["rows"]) == 17


def test_compare_gate(db, tmp_path):
    base = tmp_path / "baseline.json"
    res = run("--db", db, "--save", base)
    assert res.exit_code == 0 and json.loads(base.read_text())["reports"]
    assert run("--db", db, "--compare", base).exit_code == 0  # same data: no regression

    with Store(db) as s:
        s.add(make("pi5", "int8", 8.0 * 1.25))   # 25% slower than the baseline
        s.add(make("pi3", "fp32", 50.0 * 1.05))  # within 10%
    res = run("--db", db, "--compare", base, "--tolerance", "0.10")
    assert res.exit_code == 1
    assert "REGRESSED" in res.output and "1 p50 regression(s)" in res.output
    assert run("--db", db, "--compare", base, "--tolerance", "0.3").exit_code == 0
    doc = json.loads(run("--db", db, "--compare", base, "--json").stdout)
    statuses = {(e["device"], e["recipe"], e["threads"]): e["status"] for e in doc["comparison"]["entries"]}
    assert statuses[("pi5", "int8", 4)] == "regressed" and statuses[("pi3", "fp32", 4)] == "same"
    # A JSON list of raw reports is a baseline too.
    raw = tmp_path / "raw.json"
    raw.write_text(json.dumps([make("pi5", "int8", 5.0)]))
    assert run("--db", db, "--compare", raw).exit_code == 1


def test_compare_statuses():
    a = [row(make("d", "fp32", 10.0)), row(make("d", "int8", 10.0))]
    b = [row(make("d", "fp32", 7.0)), row(make("d", "fp16", 10.0))]
    st = {e["recipe"]: e["status"] for e in compare(b, a, 0.1)}
    assert st == {"fp32": "improved", "fp16": "new", "int8": "missing"}


def test_html_is_one_self_contained_page(db, tmp_path):
    out = tmp_path / "out" / "report.html"
    base = tmp_path / "b.json"
    run("--db", db, "--save", base)
    res = run("--db", db, "--html", out, "--compare", base)
    assert res.exit_code == 0, res.output
    page = out.read_text()
    assert page.count("<svg") >= 2 and "<script" not in page
    assert not re.search(r"""(src|href)=['"]?(https?:|//|[a-z0-9_./-]+\.(png|js|css))""", page)
    for title in ("Latest p50 (ms) per device", "Invoke latency", "End-to-end frame latency",
                  "Cold start", "Comparison with the baseline"):
        assert title in page
    assert "dynamic is slower than fp32" in page


def test_bad_inputs_are_one_line_errors(tmp_path, db):
    res = run("--db", tmp_path / "missing.db")
    assert res.exit_code == 1 and "no results database" in res.output and "Traceback" not in res.output
    bad = tmp_path / "bad.json"
    bad.write_text("{nope")
    res = run("--db", db, "--compare", bad)
    assert res.exit_code == 1 and "not a readable JSON report set" in res.output


def test_accuracy_from_eval_reports_sits_next_to_latency(db):
    ev = new_report("eval", device={"hostname": "workstation"},
                    runtime={"backend": "ai_edge_litert", "delegate": "cpu", "threads": None},
                    model={"name": "mnv2-int8", "recipe": "int8", "sha256": "i" * 64, "size": 3_500_000})
    ev["accuracy"] = {"top1": 0.7, "agreement": {"top1_agreement": 0.96}, "images": 50}
    with Store(db) as s:
        s.add(ev)
    res = run("--db", db)
    assert res.exit_code == 0, res.output
    assert re.search(r"pi5 +mnv2 +int8 +bench +cpu +4 +8\.00 .* 0\.700 +0\.960", res.output), res.output
    assert re.search(r"workstation +mnv2 +int8 +0\.700 +0\.960", res.output)


def test_report_reads_the_database_read_only_and_refuses_what_is_not_one(tmp_path, db):
    """`edgepipe report` never writes: a 0-byte file stays 0 bytes, a corrupt header is not rewritten."""
    empty = tmp_path / "empty.db"
    empty.write_bytes(b"")
    res = run("--db", empty)
    assert res.exit_code == 1 and "not an edgepipe results database" in res.output, res.output
    assert "Traceback" not in res.output and len(res.output.strip().splitlines()) == 1
    assert empty.stat().st_size == 0 and not (tmp_path / "empty.db-wal").exists()

    corrupt = tmp_path / "corrupt.db"
    junk = b"this is not SQLite" + bytes(range(256)) * 20
    corrupt.write_bytes(junk)
    res = run("--db", corrupt)
    assert res.exit_code == 1 and "not a readable results database" in res.output, res.output
    assert len(res.output.strip().splitlines()) == 1
    assert corrupt.read_bytes() == junk
    assert run("--db", db, "--compare", corrupt).exit_code == 1  # a .db baseline is opened read-only too

    before = db.read_bytes()  # a real database: read, byte for byte unchanged
    assert run("--db", db).exit_code == 0
    assert db.read_bytes() == before


def test_video_and_photo_runs_are_two_configurations_with_stage_timings(tmp_path):
    from results_factory import demo_reports

    db = tmp_path / "r.db"
    with Store(db) as s:
        s.add_many(demo_reports())
    res = run("--db", db, "--kind", "run")
    assert res.exit_code == 0, res.output
    assert "video:vtest_short.avi" in res.output and "images:images" in res.output
    assert re.search(r"video:vtest_short\.avi +2\.70 +1\.35 +4\.05 +0\.900 +9\.00", res.output), res.output
