"""`edgepipe report` with throughput-mode benches and --threads auto sweeps (real reports from the device code)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgepipe.device.bench import run_bench
from edgepipe.device.sweep import run_sweep
from edgepipe.device.throughput import run_throughput
from edgepipe.pipeline.cli import main as edgepipe
from edgepipe.pipeline.reporting import fastest, fmt, latest, row, thread_advice
from edgepipe.pipeline.store import Store

MODEL = Path(__file__).resolve().parents[1] / "data" / "models" / "float.tflite"
FAST = dict(runs=10, warmup=1, min_secs=0.05)


@pytest.fixture(scope="module")
def reports():
    lat = run_bench(MODEL, threads=1, **FAST)
    tput = run_throughput(MODEL, streams=2, threads=1, **FAST)
    sweep = run_sweep(MODEL, counts=[1, 2], **FAST)
    return [lat, tput] + sweep


@pytest.fixture
def db(tmp_path, reports):
    path = tmp_path / "results.db"
    with Store(path) as s:
        for r in reports:
            s.add(r)
    return path


def test_throughput_rows_are_their_own_configuration(reports):
    rows = latest(row(r) for r in reports)
    modes = sorted((r["threads"], r["mode"] or "-", r["streams"] or 0) for r in rows)
    # latency t=1 and t=2, throughput 2x1 and 1x2: the sweep's t=1 latency replaces the first bench (same key)
    assert modes == [(1, "-", 0), (1, "throughput", 2), (2, "-", 0), (2, "throughput", 1)]
    best = fastest(rows)  # from single-request rows only: a throughput p50 is per request under contention
    lat_rows = [r for r in rows if not r["mode"]]
    assert len(best) == 1 and f"at {fmt(min(r['p50'] for r in lat_rows))} ms p50" in best[0]


def test_thread_advice_names_the_sweeps_answer(reports):
    rows = [row(r) for r in reports]
    advice = thread_advice(rows)
    summary = reports[-1]["settings"]["thread_sweep"]
    assert len(advice) == 1 and "tried 1, 2" in advice[0]
    assert f"fastest request with {summary['best_latency']['threads']}" in advice[0]
    assert "most inferences/s with" in advice[0]


def test_edgepipe_report_shows_throughput_and_threads(db):
    res = CliRunner().invoke(edgepipe, ["report", "--db", str(db)])
    assert res.exit_code == 0, res.output
    assert "bench tput x2" in res.output and "bench tput x1" in res.output
    assert "threads (tried 1, 2): fastest request with" in res.output
    doc = json.loads(CliRunner().invoke(edgepipe, ["report", "--db", str(db), "--json"]).output)
    assert len(doc["threads"]) == 1
    assert {r["mode"] for r in doc["rows"]} == {None, "throughput"}
