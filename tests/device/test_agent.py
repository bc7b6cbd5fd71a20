"""`edgerun agent` on loopback: tokens, bundle uploads, the job lifecycle, warm loads.

Real HTTP server, real bundle store, real bench (edgepipe.device.bench.run_bench) on the
tiny committed models. No TensorFlow, no pipeline imports.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tarfile
import time
from pathlib import Path

import pytest

from edgepipe.device.agent import Agent, AgentServer
from edgepipe.device.bundle_store import BundleStore, UploadError
from bundle_factory import make_bundle
from edgepipe.device.http import ClientError, request

MODELS = Path(__file__).resolve().parents[1] / "data" / "models"
TOKEN = "s3cret-token"


def tar_of(directory: Path = None, members=None) -> tuple:
    """(bytes, sha256) of a tar of ``directory`` or of raw ``members`` [(TarInfo, bytes)]."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        if directory is not None:
            for f in sorted(directory.iterdir()):
                tar.add(f, arcname=f.name)
        for info, data in members or ():
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    data = buf.getvalue()
    return data, hashlib.sha256(data).hexdigest()


@pytest.fixture
def agent(agent_server):
    return agent_server(token=TOKEN, keep_warm=2)


def call(server, method, path, token=TOKEN, **kw):
    return request(method, server.url + path, token=token, **kw)


def put_bundle(server, data, sha, **kw):
    return call(server, "PUT", f"/v1/bundles/{sha}", data=data, content_type="application/x-tar", **kw)


def wait_job(server, job_id, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _, state = call(server, "GET", f"/v1/jobs/{job_id}")
        if state["status"] in ("done", "failed"):
            return state
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not finish")


def test_token_is_enforced_and_healthz_is_public(agent):
    with pytest.raises(ClientError) as e:
        call(agent, "GET", "/v1/info", token=None)
    assert e.value.status == 401
    with pytest.raises(ClientError) as e:
        call(agent, "GET", "/v1/info", token="wrong")
    assert e.value.status == 403
    assert call(agent, "GET", "/healthz", token=None)[0] == 200
    status, info = call(agent, "GET", "/v1/info")
    assert status == 200 and info["bundles"] == [] and "agent" in info


def test_refuses_to_listen_beyond_loopback_without_token(tmp_path):
    worker = Agent(BundleStore(tmp_path / "s"))
    try:
        with pytest.raises(ValueError, match="without a token"):
            AgentServer(worker, "0.0.0.0", 0, token=None)
    finally:
        worker.close()


def test_upload_is_verified_and_redeploy_is_a_noop(agent, tmp_path):
    bdir = make_bundle(tmp_path / "b", "float.tflite", "tiny-fp32", "fp32")
    data, sha = tar_of(bdir)
    status, body = put_bundle(agent, data, sha)
    assert status == 201 and body["new"] is True and body["name"] == "tiny-fp32"
    stored = Path(agent.agent.store.path(sha))
    mtime = (stored / "model.tflite").stat().st_mtime_ns
    status, body = put_bundle(agent, data, sha)
    assert status == 200 and body["new"] is False
    assert (stored / "model.tflite").stat().st_mtime_ns == mtime
    assert call(agent, "GET", f"/v1/bundles/{sha}")[1]["recipe"] == "fp32"
    assert [b["sha256"] for b in call(agent, "GET", "/v1/bundles")[1]["bundles"]] == [sha]


def _refused(agent, data, sha, status, match):
    with pytest.raises(ClientError) as e:
        put_bundle(agent, data, sha)
    assert e.value.status == status, e.value
    assert match in str(e.value)
    with pytest.raises(ClientError) as e:  # nothing was stored
        call(agent, "GET", f"/v1/bundles/{sha}")
    assert e.value.status == 404


def test_bad_uploads_are_refused_and_agent_keeps_serving(agent, tmp_path):
    bdir = make_bundle(tmp_path / "b", "float.tflite", "tiny-fp32", "fp32")
    data, sha = tar_of(bdir)
    other = hashlib.sha256(b"something else").hexdigest()
    _refused(agent, data, other, 400, "digest mismatch")

    evil = tarfile.TarInfo("../../escape.txt")
    evil.size = 3
    _refused(agent, *tar_of(members=[(evil, b"bad")]), 422, "'..'")

    link = tarfile.TarInfo("model.tflite")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    _refused(agent, *tar_of(members=[(link, None)]), 422, "links")

    absolute = tarfile.TarInfo("/tmp/abs.txt")
    absolute.size = 1
    _refused(agent, *tar_of(members=[(absolute, b"x")]), 422, "absolute")

    big = bytes(2 << 20)  # store cap is 1 MiB
    _refused(agent, big, hashlib.sha256(big).hexdigest(), 413, "exceeds")

    junk = tarfile.TarInfo("readme.txt")
    junk.size = 2
    _refused(agent, *tar_of(members=[(junk, b"hi")]), 422, "not a bundle")

    # A manifest whose digest does not match the model: corrupt in transit or tampered.
    (bdir / "model.tflite").write_bytes((MODELS / "int8_io.tflite").read_bytes())
    _refused(agent, *tar_of(bdir), 422, "does not match")

    with pytest.raises(ClientError) as e:
        put_bundle(agent, b"x", "not-a-digest")
    assert e.value.status == 400
    assert not list((tmp_path / "escape.txt").parent.glob("escape.txt"))
    assert call(agent, "GET", "/healthz")[0] == 200


def test_bad_job_requests(agent, tmp_path):
    missing = hashlib.sha256(b"nope").hexdigest()
    cases = [
        ({"kind": "bench", "bundle": missing}, 409, "PUT /v1/bundles"),
        ({"kind": "dance", "bundle": missing}, 400, "kind"),
        ({"kind": "bench", "bundle": "zz"}, 400, "sha256"),
        ({"kind": "bench", "bundle": missing, "runz": 3}, 400, "unknown bench job parameter"),
        ({"kind": "bench", "bundle": missing, "runs": "many"}, 400, "runs must be int"),
        ({"kind": "bench", "bundle": missing, "runs": 0}, 400, ">= 1"),
        ({"kind": "run", "bundle": missing}, 400, "needs a source"),
    ]
    for body, status, match in cases:
        with pytest.raises(ClientError) as e:
            call(agent, "POST", "/v1/jobs", body=body)
        assert e.value.status == status and match in str(e.value), (body, e.value)
    with pytest.raises(ClientError) as e:
        call(agent, "POST", "/v1/jobs", data=b"{not json")
    assert e.value.status == 400
    with pytest.raises(ClientError) as e:
        call(agent, "GET", "/v1/jobs/does-not-exist")
    assert e.value.status == 404


def test_job_lifecycle_warm_reuse_and_one_at_a_time(agent, tmp_path):
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((Path(__file__).resolve().parents[2] / "device" / "schemas"
                         / "report.schema.json").read_text())
    bdir = make_bundle(tmp_path / "b", "int8_io.tflite", "tiny-int8-io", "int8-io")
    data, sha = tar_of(bdir)
    put_bundle(agent, data, sha)

    params = {"kind": "bench", "bundle": sha, "runs": 20, "warmup": 2, "seed": 1}
    ids = []
    for extra in ({}, {}, {"threads": 1}):
        status, job = call(agent, "POST", "/v1/jobs", body={**params, **extra})
        assert status == 202 and job["status"] in ("queued", "running")
        ids.append(job["id"])
    states = [wait_job(agent, i) for i in ids]
    for s in states:
        assert s["status"] == "done", s["error"]
        jsonschema.validate(s["report"], schema)
        assert s["report"]["kind"] == "bench" and s["report"]["latency_ms"]["n"] >= 20
        assert s["report"]["model"]["name"] == "tiny-int8-io"
    loads = [s["report"]["runtime"]["load"] for s in states]
    # Same bundle + settings reuse the interpreter; other threads -> a new, cold load.
    assert loads == ["cold", "warm", "cold"]
    cold = states[0]["report"]["load_ms"]
    assert cold["first_invoke"] is not None and cold["interpreter_build"] is not None
    assert states[1]["report"]["load_ms"] is None
    # One at a time: each job started after the previous one finished.
    for a, b in zip(states, states[1:]):
        assert a["finished_at"] <= b["started_at"]
    listed = call(agent, "GET", "/v1/jobs")[1]["jobs"]
    assert {j["id"] for j in listed} == set(ids) and all("report" not in j for j in listed)


def test_failing_job_is_reported_and_next_job_runs(agent, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    shutil.copy(MODELS / "not_a_model.tflite", bad / "model.tflite")  # no manifest: plain model
    data, sha = tar_of(bad)
    put_bundle(agent, data, sha)
    _, job = call(agent, "POST", "/v1/jobs", body={"kind": "bench", "bundle": sha, "runs": 5})
    state = wait_job(agent, job["id"])
    assert state["status"] == "failed" and state["report"] is None
    assert state["error"] and "\n" not in state["error"]

    good = make_bundle(tmp_path / "g", "float.tflite", "tiny-fp32", "fp32")
    data, sha = tar_of(good)
    put_bundle(agent, data, sha)
    _, job = call(agent, "POST", "/v1/jobs", body={"kind": "bench", "bundle": sha, "runs": 5})
    assert wait_job(agent, job["id"])["status"] == "done"


def test_run_job_over_real_photos(agent, tmp_path):
    photos = Path(__file__).resolve().parents[2] / "sample_data" / "images"
    if not photos.is_dir():
        pytest.fail(f"{photos} is missing: the sample photos are part of the repository")
    bdir = make_bundle(tmp_path / "b", "float.tflite", "tiny-fp32", "fp32")
    data, sha = tar_of(bdir)
    put_bundle(agent, data, sha)
    body = {"kind": "run", "bundle": sha, "source": str(photos), "max_frames": 3, "pipeline": False}
    state = wait_job(agent, call(agent, "POST", "/v1/jobs", body=body)[1]["id"])
    assert state["status"] == "done", state["error"]
    rep = state["report"]
    assert rep["kind"] == "run" and rep["runtime"]["load"] == "cold"
    assert rep["throughput"]["frames"] == 3 and rep["load_ms"]["first_invoke"] is not None
    # A source that does not exist fails the job with a reason, not the agent.
    body["source"] = str(tmp_path / "nothing-here")
    state = wait_job(agent, call(agent, "POST", "/v1/jobs", body=body)[1]["id"])
    assert state["status"] == "failed" and state["error"]


def test_agent_command_refuses_open_bind_without_token(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from edgepipe.device.cli import main as edgerun

    monkeypatch.delenv("EDGERUN_TOKEN", raising=False)
    res = CliRunner().invoke(edgerun, ["agent", "--host", "0.0.0.0", "--port", "0",
                                       "--store", str(tmp_path / "store")])
    assert res.exit_code == 1 and "without a token" in res.output
    assert res.exception is None or isinstance(res.exception, SystemExit)


@pytest.mark.slow
def test_agent_command_serves_and_stops_cleanly(tmp_path):
    import os
    import signal
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if k not in ("EDGERUN_TOKEN",)}
    env["PYTHONUNBUFFERED"] = "1"
    cmd = [sys.executable, "-m", "edgepipe.device.cli", "agent", "--port", "0", "--store", str(tmp_path / "store")]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=repo)
    try:
        line = proc.stdout.readline()
        assert "agent listening on http://127.0.0.1:" in line, line + proc.stderr.read()
        url = line.split()[3]
        status, info = request("GET", url + "/v1/info")  # loopback without a token: allowed
        assert status == 200 and info["bundles"] == [] and info["edgerun"]
        assert "backends" in info and "delegates" in info and info["hostname"]
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "agent stopped" in out


@pytest.mark.slow  # 10-45 s under arm64 emulation (process start-ups); nothing here depends on the CPU or runtime
def test_port_in_use_is_a_one_line_error(tmp_path):
    """A failed bind must not trip over half-built server state (it used to raise AttributeError)."""
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        proc = subprocess.run([sys.executable, "-m", "edgepipe.device.cli", "agent", "--port", str(port),
                               "--store", str(tmp_path / "store")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(f"Error: cannot listen on 127.0.0.1:{port}")


def test_job_parameters_are_bounded(agent, tmp_path):
    sha = hashlib.sha256(b"any").hexdigest()
    for params, match in (({"min_secs": 1e9}, "min_secs must be"), ({"runs": 10**9}, "runs must be"),
                          ({"timeout": 0}, "timeout must be"), ({"timeout": 1e7}, "timeout must be"),
                          ({"input": "x" * 10000}, "longer than")):
        with pytest.raises(ClientError) as e:
            call(agent, "POST", "/v1/jobs", body={"kind": "bench", "bundle": sha, **params})
        assert e.value.status == 400 and match in str(e.value), (params, e.value)


# --------------------------------------------------------------------------- a bounded store


def _bundle_tars(tmp_path) -> list:
    out = []
    for model in ("float.tflite", "int8_io.tflite", "two_outputs.tflite"):
        name = model.split(".")[0]
        out.append(tar_of(make_bundle(tmp_path / "q", model, name, "fp32")))
    return out


def test_store_quota_evicts_least_recently_used_bundles_no_job_needs(tmp_path):
    (a, sa), (b, sb), (c, sc) = _bundle_tars(tmp_path)
    probe = BundleStore(tmp_path / "probe")
    sizes = {}
    for data, sha in ((a, sa), (b, sb), (c, sc)):
        probe.put(sha, io.BytesIO(data), len(data))
        sizes[sha] = probe.describe(sha)["size"]
    quota = sizes[sa] + sizes[sb] + max(sizes.values()) // 2  # two fit, three do not
    store = BundleStore(tmp_path / "store", quota_bytes=quota)
    store.put(sa, io.BytesIO(a), len(a))
    store.put(sb, io.BytesIO(b), len(b))
    os.utime(store.path(sa), (1, 1))
    os.utime(store.path(sb), (2, 2))
    store.touch(sa)  # a was used just now: b is the least recently used
    store.put(sc, io.BytesIO(c), len(c))
    assert store.has(sa) and store.has(sc) and not store.has(sb)
    assert store.used_bytes() <= quota

    # Bundles with queued or running jobs are never evicted: then there is no room.
    store.in_use = lambda: {sa, sc}
    with pytest.raises(UploadError) as e:
        store.put(sb, io.BytesIO(b), len(b))
    assert e.value.status == 507 and "retry later" in e.value.reason
    assert store.has(sa) and store.has(sc) and not store.has(sb)
    # The quota and the used bytes survive a restart (sizes are measured on disk).
    assert BundleStore(tmp_path / "store", quota_bytes=quota).used_bytes() == store.used_bytes()


def test_expanded_size_and_tar_conflicts_are_refused_with_a_reason(agent, tmp_path):
    bdir = make_bundle(tmp_path / "b", "float.tflite", "tiny-fp32", "fp32")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for f in sorted(bdir.iterdir()):
            tar.add(f, arcname=f.name)
        pad = tarfile.TarInfo("padding.bin")
        pad.size = 3 << 20  # the store's cap is 1 MiB; the upload is a few KB
        tar.addfile(pad, io.BytesIO(bytes(pad.size)))
    data = buf.getvalue()
    assert len(data) < 64 << 10
    _refused(agent, data, hashlib.sha256(data).hexdigest(), 413, "unpacks to more than")

    as_file = tarfile.TarInfo("model.tflite")
    as_file.size = 1
    inside = tarfile.TarInfo("model.tflite/x")
    inside.size = 1
    data, sha = tar_of(members=[(as_file, b"x"), (inside, b"y")])
    with pytest.raises(ClientError) as e:
        put_bundle(agent, data, sha)
    assert e.value.status == 422, e.value
    assert str(tmp_path) not in str(e.value) and "/store" not in str(e.value)
    assert call(agent, "GET", "/healthz")[0] == 200
