"""`edgepipe bench` against real agents on loopback, one of them dead.

Two `edgerun agent`s run in this process on ephemeral ports with the real
bundle store and the real bench; a third URL has nothing listening.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgepipe.device.agent import Agent, AgentServer
from edgepipe.device.bundle_store import BundleStore
from bundle_factory import make_bundle
from edgepipe.device.http import ClientError
from edgepipe.pipeline.cli import main as edgepipe
from edgepipe.pipeline.remote import AgentClient, pack_bundle
from edgepipe.pipeline.store import Store

MODELS = Path(__file__).resolve().parents[1] / "data" / "models"
TOKEN = "fleet-token"


@pytest.fixture
def bundles(tmp_path):
    return [make_bundle(tmp_path / "b", "float.tflite", "tiny-fp32", "fp32"),
            make_bundle(tmp_path / "b", "int8_io.tflite", "tiny-int8-io", "int8-io")]


@pytest.fixture
def agents(tmp_path):
    servers = []
    for i in range(2):
        worker = Agent(BundleStore(tmp_path / f"store{i}"))
        srv = AgentServer(worker, "127.0.0.1", 0, token=TOKEN)
        srv.start_background()
        servers.append(srv)
    yield servers
    for srv in servers:
        srv.shutdown()
        srv.server_close()
        srv.agent.close()


def dead_url():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"http://127.0.0.1:{port}"


def bench(*args):
    return CliRunner().invoke(edgepipe, ["bench", *map(str, args)])


def test_fleet_bench_with_a_dead_device(agents, bundles, tmp_path):
    db = tmp_path / "results.db"
    dead = dead_url()
    common = ["--token", TOKEN, "--db", db, "--runs", 10, "--warmup", 1]
    res = bench(*bundles, "--device", agents[0].url, "--device", dead, "--device", agents[1].url, *common)
    assert res.exit_code == 1, res.output  # not everything succeeded...
    out = res.stdout
    live = [a.url.split("//")[1] for a in agents]
    for label in live:  # ...but both live devices ran both recipes
        for recipe in ("fp32", "int8-io"):
            assert any(label in ln and f" {recipe} " in ln for ln in out.splitlines()), out
    assert f"FAILED  {dead.split('//')[1]}  tiny-fp32: device unreachable" in out
    assert "4/6 jobs succeeded on 3 device(s)" in out
    assert "down" in res.output  # progress lines (stderr)
    with Store(db) as s:
        reps = s.query()
    assert len(reps) == 4 and {r["runtime"]["load"] for r in reps} == {"cold"}
    assert {r["model"]["recipe"] for r in reps} == {"fp32", "int8-io"}

    # Again on the live devices only: nothing re-uploaded, warm interpreters, exit 0.
    res = bench(*bundles, "--device", agents[0].url, "--device", agents[1].url, *common, "--json")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["ok"] and len(doc["outcomes"]) == 4
    assert all(o["uploaded"] is False and o["stored"] is True for o in doc["outcomes"])
    assert {o["report"]["runtime"]["load"] for o in doc["outcomes"]} == {"warm"}
    with Store(db) as s:
        assert s.count() == 8


def test_failing_job_is_reported_and_the_rest_continue(agents, bundles, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    shutil.copy(MODELS / "not_a_model.tflite", broken / "model.tflite")
    res = bench(broken, *bundles, "--device", agents[0].url, "--token", TOKEN, "--no-db", "--runs", 5)
    assert res.exit_code == 1
    assert "FAILED" in res.stdout and "2/3 jobs succeeded" in res.stdout
    assert "Traceback" not in res.output


def test_wrong_token_and_bad_arguments(agents, bundles, tmp_path):
    res = bench(bundles[0], "--device", agents[0].url, "--token", "nope", "--no-db")
    assert res.exit_code == 1 and "403" in res.stdout
    res = bench(tmp_path, "--device", agents[0].url, "--no-db")
    assert res.exit_code == 1 and "not a bundle" in res.output
    res = bench(bundles[0], "--device", "pi.local:8751", "--no-db")
    assert res.exit_code == 2 and "http" in res.output


def test_bundle_tar_is_deterministic_and_upload_is_skipped_when_present(agents, bundles):
    a, b = pack_bundle(bundles[0]), pack_bundle(bundles[0])
    assert a.data == b.data and a.sha256 == b.sha256 and a.name == "tiny-fp32" and a.recipe == "fp32"
    client = AgentClient(agents[0].url, token=TOKEN)
    assert client.upload(a) is True and client.upload(a) is False
    assert client.info()["bundles"][0]["sha256"] == a.sha256


def test_thread_matrix_uploads_once_per_bundle(agents, bundles, tmp_path):
    res = bench(*bundles, "--device", agents[0].url, "--token", TOKEN, "--no-db", "--runs", 5,
                "--threads", "1,2", "--json")
    assert res.exit_code == 0, res.output
    outs = json.loads(res.stdout)["outcomes"]
    assert [(o["bundle"], o["setting"].get("threads")) for o in outs] == [
        ("tiny-fp32", 1), ("tiny-fp32", 2), ("tiny-int8-io", 1), ("tiny-int8-io", 2)]
    assert [o["uploaded"] for o in outs] == [True, False, True, False]
    assert [o["report"]["runtime"]["threads"] for o in outs] == [1, 2, 1, 2]
    res = bench(*bundles, "--device", agents[0].url, "--no-db", "--threads", "1,x")
    assert res.exit_code == 2 and "not a number" in res.output


# --------------------------------------------------------------------------- refusals and crashes are rows, not a dead device


def _agent(store_dir, **store_kw):
    worker = Agent(BundleStore(store_dir, **store_kw))
    srv = AgentServer(worker, "127.0.0.1", 0, token=TOKEN)
    srv.start_background()
    return srv


def _stop(srv):
    srv.shutdown()
    srv.server_close()
    srv.agent.close()


def test_a_bundle_too_large_for_a_device_is_refused_and_the_device_carries_on(bundles, tmp_path):
    big = make_bundle(tmp_path / "big", "float.tflite", "tiny-big", "fp32")
    (big / "extra.bin").write_bytes(os.urandom(300 << 10))
    srv = _agent(tmp_path / "store", max_bytes=100 << 10)
    try:
        res = bench(big, *bundles, "--device", srv.url, "--token", TOKEN, "--no-db", "--runs", 3)
        assert res.exit_code == 1
        label = srv.url.split("//")[1]
        assert f"REFUSED {label}  tiny-big: bundle too large for this device" in res.stdout, res.output
        assert "2/3 jobs succeeded" in res.stdout and "stopped answering" not in res.output
        assert "Traceback" not in res.output

        # The device's own answer (413 with a JSON reason) for a client that does not look first.
        with pytest.raises(ClientError) as e:
            AgentClient(srv.url, token=TOKEN).upload(pack_bundle(big))
        assert e.value.status == 413 and "exceeds" in e.value.payload["error"]
        assert AgentClient(srv.url, token=TOKEN).alive()
    finally:
        _stop(srv)


def test_a_crashed_worker_is_a_failed_row_and_the_bundle_is_refused_until_forced(agents, bundles):
    srv = agents[0]
    label = srv.url.split("//")[1]

    def kill_first_job():
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if any(j.stage == "running the benchmark" for j in srv.agent.list()):
                os.kill(srv.agent.worker.pid, signal.SIGSEGV)
                return
            time.sleep(0.02)

    killer = threading.Thread(target=kill_first_job, daemon=True)
    killer.start()
    res = bench(*bundles, "--device", srv.url, "--token", TOKEN, "--no-db", "--runs", 3, "--min-secs", 2, "--json")
    killer.join()
    assert res.exit_code == 1
    outs = json.loads(res.stdout)["outcomes"]
    assert [o["status"] for o in outs] == ["failed", "ok"], outs
    assert outs[0]["error"].startswith("crashed with SIGSEGV while running the benchmark"), outs[0]["error"]
    assert outs[0]["crash"]["signal"] == "SIGSEGV"

    # Next time the device refuses that bundle at once, says why, and still runs the other one.
    res = bench(*bundles, "--device", srv.url, "--token", TOKEN, "--no-db", "--runs", 3)
    assert res.exit_code == 1
    assert f"REFUSED {label}  tiny-fp32: bundle refused by the device: " in res.stdout
    assert "crashed with SIGSEGV" in res.stdout and "--force" in res.stdout and "1/2 jobs" in res.stdout
    res = bench(*bundles, "--device", srv.url, "--token", TOKEN, "--no-db", "--runs", 3, "--force")
    assert res.exit_code == 0, res.output


def test_a_job_over_the_host_timeout_is_cancelled_on_the_device(agents, bundles):
    srv = agents[0]
    res = bench(*bundles, "--device", srv.url, "--token", TOKEN, "--no-db", "--runs", 3, "--min-secs", 60,
                "--timeout", 2, "--json")
    assert res.exit_code == 1
    outs = json.loads(res.stdout)["outcomes"]
    assert all(o["status"] == "failed" and "did not finish within 2 s (cancelled on the device)" in o["error"]
               for o in outs), outs
    assert [j.status.value for j in srv.agent.list()] == ["cancelled", "cancelled"]
