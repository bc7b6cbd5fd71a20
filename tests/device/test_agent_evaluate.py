"""`evaluate` jobs on a loopback agent: .npy data blobs (bounded, checked), raw outputs back.

Real HTTP server, real stores, real runtime on the tiny committed models. No TensorFlow.
"""
from __future__ import annotations

import hashlib
import io
import time

import numpy as np
import pytest

from edgepipe.device.evaluate_job import MAX_OUTPUT_VALUES, decode_array
from edgepipe.device.http import ClientError, request
from edgepipe.device.runtime import load_model
from bundle_factory import make_bundle
from test_agent import tar_of

TOKEN = "eval-token"


@pytest.fixture
def agent(agent_server):
    return agent_server(token=TOKEN, quota_bytes=4 << 20, keep_warm=1)


def call(server, method, path, **kw):
    return request(method, server.url + path, token=TOKEN, **kw)


def npy(x) -> tuple:
    buf = io.BytesIO()
    np.save(buf, x, allow_pickle=True)
    data = buf.getvalue()
    return data, hashlib.sha256(data).hexdigest()


def put_data(server, data, sha):
    return call(server, "PUT", f"/v1/data/{sha}", data=data, content_type="application/octet-stream")


def wait(server, job_id, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = call(server, "GET", f"/v1/jobs/{job_id}")[1]
        if state["status"] in ("done", "failed", "cancelled"):
            return state
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not finish")


def shipped(agent, tmp_path, model="int8_io.tflite"):
    d = make_bundle(tmp_path / "b", model, "tiny", "int8-io")
    data, sha = tar_of(d)
    call(agent, "PUT", f"/v1/bundles/{sha}", data=data, content_type="application/x-tar")
    return d, sha


def test_evaluate_job_returns_the_same_outputs_as_a_local_run(agent, tmp_path):
    d, sha = shipped(agent, tmp_path)
    lm = load_model(d / "model.tflite")
    spec = lm.inputs[0]
    x = np.random.default_rng(0).uniform(-1, 1, (7, *spec.shape[1:])).astype(np.float32)
    data, dsha = npy(x)
    status, desc = put_data(agent, data, dsha)
    assert status == 201 and desc["shape"] == [7, *spec.shape[1:]] and desc["dtype"] == "float32"
    assert put_data(agent, data, dsha)[1]["new"] is False  # same bytes: stored once
    job = call(agent, "POST", "/v1/jobs", body={"kind": "evaluate", "bundle": sha, "data": dsha})[1]
    state = wait(agent, job["id"])
    assert state["status"] == "done", state
    rep = state["report"]
    assert rep["kind"] == "eval" and rep["device"]["hostname"] and rep["latency_ms"]["n"] == 7
    got = decode_array(rep["outputs"]["npy_b64"])
    want = np.stack([lm.predict([x[i:i + 1]])[0].reshape(-1) for i in range(7)])
    np.testing.assert_array_equal(got, want.astype(np.float32))
    assert len(rep["outputs"]["latency_ms"]) == 7


def test_data_bounds_and_refusals_come_with_a_reason(agent, tmp_path):
    d, sha = shipped(agent, tmp_path)
    # larger than the device's limit (min of the bundle limit and 64 MB): 413 before a byte is stored
    big, bsha = npy(np.zeros((300, 1024), np.float32))
    with pytest.raises(ClientError) as e:
        put_data(agent, big, bsha)
    assert e.value.status == 413 and "limit" in str(e.value)
    # pickled objects, not a .npy, a lying header, a wrong digest: 422/400, nothing stored
    for data, why, status in [(npy(np.array([{"a": 1}], dtype=object))[0], "dtype", 422),
                              (b"not an array at all", "not a .npy", 422),
                              (npy(np.zeros((4, 8), np.float32))[0][:-4], "header says", 422)]:
        with pytest.raises(ClientError) as e:
            put_data(agent, data, hashlib.sha256(data).hexdigest())
        assert e.value.status == status and why in str(e.value), e.value
    good, gsha = npy(np.zeros((2, 8), np.float32))
    with pytest.raises(ClientError) as e:
        put_data(agent, good, "0" * 64)
    assert e.value.status == 400 and "digest mismatch" in str(e.value)
    assert not list((tmp_path / "store" / ".data").glob("*"))
    # jobs: data missing from the request (400) or from the device (409)
    with pytest.raises(ClientError) as e:
        call(agent, "POST", "/v1/jobs", body={"kind": "evaluate", "bundle": sha})
    assert e.value.status == 400 and "needs data" in str(e.value)
    with pytest.raises(ClientError) as e:
        call(agent, "POST", "/v1/jobs", body={"kind": "evaluate", "bundle": sha, "data": gsha})
    assert e.value.status == 409 and "PUT /v1/data/" in str(e.value)
    # data that does not fit the model: the job fails with one line, the agent carries on
    put_data(agent, good, gsha)
    job = call(agent, "POST", "/v1/jobs", body={"kind": "evaluate", "bundle": sha, "data": gsha})[1]
    state = wait(agent, job["id"])
    assert state["status"] == "failed" and "the model takes" in state["error"], state
    assert "\n" not in state["error"]


def test_outputs_too_large_to_return_are_refused(agent_server, tmp_path):
    server = agent_server(token=TOKEN, max_bytes=8 << 20, keep_warm=0)
    d, sha = shipped(server, tmp_path, "seg_halves.tflite")  # 3072 output values per image
    lm = load_model(d / "model.tflite")
    rows = MAX_OUTPUT_VALUES // int(np.prod(lm.outputs[0].shape[1:])) + 1
    data, dsha = npy(np.zeros((rows, *lm.inputs[0].shape[1:]), np.float32))
    put_data(server, data, dsha)
    state = wait(server, call(server, "POST", "/v1/jobs",
                              body={"kind": "evaluate", "bundle": sha, "data": dsha})[1]["id"])
    assert state["status"] == "failed" and "send fewer images per job" in state["error"], state


def test_data_store_evicts_least_recently_used_blobs_no_job_needs(tmp_path):
    from edgepipe.device.bundle_store import UploadError
    from edgepipe.device.data_store import DataStore

    blobs = [npy(np.full((4, 256), i, np.float32)) for i in range(3)]  # ~4.2 KB each
    store = DataStore(tmp_path / "data", max_bytes=8 << 10, quota_bytes=9 << 10)
    pinned = set()
    store.in_use = lambda: pinned
    for data, sha in blobs[:2]:
        assert store.put(sha, io.BytesIO(data), len(data)) is True
    pinned.add(blobs[0][1])  # a queued job needs the oldest: the other one goes
    store.put(blobs[2][1], io.BytesIO(blobs[2][0]), len(blobs[2][0]))
    assert [store.has(s) for _, s in blobs] == [True, False, True]
    pinned.add(blobs[2][1])  # everything in use: no room, a reason, nothing half-written
    data, sha = blobs[1]
    with pytest.raises(UploadError) as e:
        store.put(sha, io.BytesIO(data), len(data))
    assert e.value.status == 507 and "retry later" in e.value.reason
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == sorted(f"{s}.npy" for s in
                                                                          (blobs[0][1], blobs[2][1]))
    assert np.load(store.path(blobs[0][1]), allow_pickle=False)[0, 0] == 0
