"""`edgepipe evaluate --device URL`: accuracy measured by a loopback `edgerun agent`.

The agent is a real subprocess (its own job worker, runtime and stores); the
host preprocesses, ships batches, computes the metrics and stores the report.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from test_evaluate import world  # noqa: F401 - the tiny quadrant model, its bundles and labelled images

pytestmark = pytest.mark.host
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def agent_url(tmp_path, monkeypatch):
    from edgepipe.device.identity import load_identity

    monkeypatch.setenv("EDGERUN_STATE", str(tmp_path / "state"))  # the board's own identity, named
    load_identity(name="loopback-board")
    env = {k: v for k, v in os.environ.items() if k != "EDGERUN_TOKEN"}
    env["PYTHONUNBUFFERED"] = "1"
    proc = subprocess.Popen([sys.executable, "-m", "edgepipe.device.cli", "agent", "--port", "0", "--store",
                             str(tmp_path / "store")], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        line = proc.stdout.readline()
        assert "agent listening on http://127.0.0.1:" in line, line + proc.stderr.read()
        yield line.split()[3]
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def edgepipe(*args):
    from edgepipe.pipeline.cli import main

    return CliRunner().invoke(main, [str(a) for a in args])


def test_board_evaluation_matches_local_and_shows_in_report(world, agent_url, tmp_path):  # noqa: F811
    from edgepipe.pipeline.evaluate import evaluate_bundles
    from edgepipe.pipeline.store import Store

    fp32, int8 = world["bundles"]["fp32"], world["bundles"]["int8"]
    local = {r.recipe: r for r in evaluate_bundles([fp32, int8], world["data"])}
    db = tmp_path / "results.db"
    # 13 images in batches of 5: three jobs per bundle
    res = edgepipe("evaluate", fp32, int8, "--data", world["data"], "--device", agent_url, "--batch", 5,
                   "--db", db, "--json")
    assert res.exit_code == 0, res.output
    out = {r["recipe"]: r for r in json.loads(res.stdout)["results"]}
    for recipe in ("fp32", "int8"):
        board, here = out[recipe], local[recipe]
        assert board["images"] == here.images == 13
        assert board["accuracy"] == pytest.approx(here.accuracy)
        assert board["agreement"]["top1_agreement"] == here.agreement["top1_agreement"]
        assert board["agreement"]["mean_abs"] == pytest.approx(here.agreement["mean_abs"], abs=1e-6)
        dev = board["device"]
        assert dev["url"] == agent_url and not dev["partial"] and dev["images_done"] == 13
        assert dev["info"]["name"] == "loopback-board" and dev["latency_ms"]["n"] == 13
    with Store(db) as s:
        reps = s.query()
    assert sorted(r["model"]["recipe"] for r in reps) == ["fp32", "int8"]
    for r in reps:
        assert r["kind"] == "eval" and r["device"]["name"] == "loopback-board"
        assert r["accuracy"]["partial"] is False and r["accuracy"]["images_done"] == 13
        assert r["settings"]["board_ms_per_image"]["n"] == 13 and len(r["settings"]["agent_jobs"]) == 3
    rep = edgepipe("report", "--db", db)
    assert rep.exit_code == 0, rep.output
    lines = [ln.split() for ln in rep.stdout.splitlines() if ln.startswith("loopback-board")]
    assert [ln[:3] + ln[5:6] for ln in lines] == [["loopback-board", "tiny", "fp32", "cpu"],
                                                  ["loopback-board", "tiny", "int8", "cpu"]], rep.stdout
    assert all(float(ln[3]) == pytest.approx(local["int8"].accuracy["top1"], abs=1e-3) for ln in lines)


def test_a_device_that_drops_out_leaves_a_partial_result(world, tmp_path):  # noqa: F811
    """A real in-process agent that stops after the first batch: the images done are kept, marked partial."""
    from edgepipe.device.agent import Agent, AgentServer
    from edgepipe.device.bundle_store import BundleStore
    from edgepipe.pipeline.evaluate import evaluate_bundles
    from edgepipe.pipeline.remote import AgentClient
    from edgepipe.pipeline.remote_eval import DeviceRunner, device_eval_report

    core = Agent(BundleStore(tmp_path / "store"))
    srv = AgentServer(core, "127.0.0.1", 0)
    srv.start_background()

    class DropsOut(AgentClient):
        def wait(self, job_id, **kw):
            state = super().wait(job_id, **kw)
            srv.shutdown()  # the board goes away once it has answered the first batch
            srv.server_close()
            return state

    try:
        runner = DeviceRunner(DropsOut(srv.url, timeout=5), batch=4)
        int8 = world["bundles"]["int8"]
        (res,) = evaluate_bundles([int8], world["data"], runner=runner)
    finally:
        core.close()
    run = runner.runs[str(res.path)]
    assert res.images == 4 and run.images_done == 4 and run.images_total == 13
    assert "device stopped answering" in run.stopped
    assert res.agreement["n"] == 4 and "top1" in res.accuracy
    rep = device_eval_report(res, world["data"], run)
    assert rep["accuracy"]["partial"] is True and rep["accuracy"]["images_done"] == 4
    assert any(w.startswith("partial: 4 of 13 images") for w in rep["warnings"])
    from edgepipe.device.report import check_reports

    check_reports(rep)


def test_unreachable_device_is_one_line(world, tmp_path):  # noqa: F811
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    res = edgepipe("evaluate", world["bundles"]["int8"], "--data", world["data"], "--quiet",
                   "--device", f"http://127.0.0.1:{port}")
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert len(res.output.strip().splitlines()) == 1 and "--device" in res.output, res.output
    res = edgepipe("evaluate", world["bundles"]["int8"], "--data", world["data"], "--delegate", "edgetpu")
    assert res.exit_code == 2 and "--delegate needs --device" in res.output
