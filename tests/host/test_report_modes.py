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


# --------------------------------------------------------------------------- through the agent


@pytest.fixture
def agent(tmp_path):
    from edgepipe.device.agent import Agent, AgentServer
    from edgepipe.device.bundle_store import BundleStore

    srv = AgentServer(Agent(BundleStore(tmp_path / "store")), "127.0.0.1", 0, token="t0k")
    srv.start_background()
    yield srv
    srv.shutdown()
    srv.server_close()
    srv.agent.close()


def test_throughput_and_profile_jobs_go_through_the_agent_into_the_report(agent, tmp_path):
    from bundle_factory import make_bundle
    from edgepipe.pipeline.fleet import bench_fleet, expand_settings
    from edgepipe.pipeline.remote import pack_bundle

    bundle = pack_bundle(make_bundle(tmp_path / "b", "conv_stack_int8.tflite", "convs-int8", "int8"))
    base = dict(runs=10, warmup=1, min_secs=0.05)
    settings = (expand_settings(dict(base, mode="throughput", streams=2))
                + expand_settings(dict(base, profile_ops=True))
                + expand_settings(dict(base, mode="sideways")))
    db = tmp_path / "results.db"
    with Store(db) as store:
        result = bench_fleet([bundle], [agent.url], settings=settings, token="t0k", store=store, job_timeout=120)
    tput, prof, bad = result.outcomes
    assert tput.status == "ok" and tput.report["throughput"]["mode"] == "throughput"
    assert tput.report["throughput"]["streams"] == 2 and tput.report["throughput"]["frames"] >= 10
    assert prof.status == "ok" and prof.report["profile"]["available"] in (True, False)
    if prof.report["profile"]["available"]:
        assert 0.9 <= prof.report["profile"]["ops_vs_invoke"] <= 1.1
    assert bad.status != "ok" and "unknown bench mode 'sideways'" in bad.error
    res = CliRunner().invoke(edgepipe, ["report", "--db", str(db)])
    assert res.exit_code == 0 and "bench tput x2" in res.output, res.output
