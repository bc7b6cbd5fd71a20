"""`edgerun agent` on loopback when things die: native crashes, killed workers, timeouts, cancel, a killed agent.

Real HTTP server, real bundle store, a real worker process, a real crashing
external delegate (built with the system C compiler) and a real agent process
killed without warning. No TensorFlow.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from bundle_factory import make_bundle
from edgepipe.device.http import ClientError, request
from test_agent import TOKEN, call, put_bundle, tar_of, wait_job


# --------------------------------------------------------------------------- worker process, timeouts, cancel


@pytest.fixture
def agent(agent_server):
    return agent_server(token=TOKEN, keep_warm=2)


CRASH_DELEGATE_C = r"""
#include <stdint.h>
#include <stdlib.h>
/* Layout of TfLiteDelegate (tensorflow/lite/core/c/common.h). */
typedef struct D { void* data_; int (*Prepare)(void*, struct D*); void* copy_from; void* copy_to;
                   void* free_handle; int64_t flags; void* opaque_builder; } D;
static int prepare(void* ctx, D* d) { (void)ctx; (void)d; *(volatile int*)0 = 1; return 0; }
D* tflite_plugin_create_delegate(char** k, char** v, size_t n, void (*report)(const char*)) {
  D* d = (D*)calloc(1, sizeof(D));
  d->Prepare = prepare;
  return d;
}
void tflite_plugin_destroy_delegate(D* d) { free(d); }
"""


@pytest.fixture(scope="module")
def crash_delegate(c_library) -> Path:
    """A real external delegate library whose Prepare dereferences NULL: the runtime segfaults
    while building the interpreter, every time (malformed models do it only sometimes)."""
    return c_library("crash_delegate", CRASH_DELEGATE_C, "-O0")


def good_bundle(agent, tmp_path, name="tiny-fp32", model="float.tflite") -> str:
    data, sha = tar_of(make_bundle(tmp_path / name, model, name, "fp32"))
    put_bundle(agent, data, sha)
    return sha


def submit(agent, sha, **params) -> str:
    return call(agent, "POST", "/v1/jobs", body={"kind": "bench", "bundle": sha, **params})[1]["id"]


def wait_status(agent, job_id, status, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = call(agent, "GET", f"/v1/jobs/{job_id}")[1]
        if state["status"] == status and (status != "running" or state["stage"] == "running the benchmark"):
            return state
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} never became {status}: {state}")


def test_native_crash_fails_the_job_with_signal_and_stage_and_the_next_job_runs(agent, tmp_path,
                                                                                crash_delegate):
    bad = good_bundle(agent, tmp_path, "victim")
    pid = agent.agent.worker.pid
    state = wait_job(agent, submit(agent, bad, runs=5, delegate=str(crash_delegate)))
    assert state["status"] == "failed" and state["report"] is None
    assert state["error"].startswith("crashed with SIGSEGV while building the interpreter: the model is "
                                     "malformed or unsupported by "), state["error"]
    assert state["crash"]["signal"] == "SIGSEGV" and state["crash"]["stage"] == "building the interpreter"

    # The agent lives on with a new worker and runs the next job.
    sha = good_bundle(agent, tmp_path, "next", "int8_io.tflite")
    assert wait_job(agent, submit(agent, sha, runs=5))["status"] == "done"
    assert agent.agent.worker.pid not in (None, pid)
    info = call(agent, "GET", "/v1/info")[1]["agent"]
    assert info["crashes_contained"] == 1 and info["worker_restarts"] >= 1

    # The bundle whose job crashed is refused at once from now on, with the reason...
    with pytest.raises(ClientError) as e:
        submit(agent, bad, runs=5)
    assert e.value.status == 422 and "crashed with SIGSEGV" in str(e.value)
    assert "crashed with SIGSEGV" in call(agent, "GET", f"/v1/bundles/{bad}")[1]["refused"]
    # ...a plain re-upload does not lift that; a forced one does.
    data, _ = tar_of(tmp_path / "victim" / "victim")
    assert put_bundle(agent, data, bad)[0] == 200
    with pytest.raises(ClientError):
        submit(agent, bad, runs=5)
    status, body = call(agent, "PUT", f"/v1/bundles/{bad}?force=1", data=data, content_type="application/x-tar")
    assert status == 201 and body["refused"] is None
    assert wait_job(agent, submit(agent, bad, runs=5))["status"] == "done"


def test_a_worker_killed_mid_job_is_named_and_replaced(agent, tmp_path):
    import os
    import signal

    sha = good_bundle(agent, tmp_path)
    job = submit(agent, sha, runs=1, min_secs=60)
    wait_status(agent, job, "running")
    os.kill(agent.agent.worker.pid, signal.SIGSEGV)
    state = wait_job(agent, job)
    assert state["status"] == "failed"
    assert state["error"].startswith("crashed with SIGSEGV while "), state["error"]
    assert state["crash"]["stage"] in ("running the benchmark", "invoking the model")
    assert wait_job(agent, submit(agent, good_bundle(agent, tmp_path, "other", "int8_io.tflite"),
                                  runs=3))["status"] == "done"


def test_a_worker_killed_from_outside_does_not_condemn_the_bundle(agent, tmp_path):
    import signal

    sha = good_bundle(agent, tmp_path)
    job = submit(agent, sha, runs=1, min_secs=60)
    wait_status(agent, job, "running")
    os.kill(agent.agent.worker.pid, signal.SIGKILL)  # what the OOM killer does
    state = wait_job(agent, job)
    assert state["status"] == "failed" and state["crash"]["signal"] == "SIGKILL"
    assert state["error"].startswith("the worker was killed by SIGKILL while "), state["error"]
    assert "OOM" in state["error"] and agent.agent.store.refusal(sha) is None
    assert wait_job(agent, submit(agent, sha, runs=3))["status"] == "done"


def test_job_timeout_kills_the_worker_and_the_agent_goes_on(agent, tmp_path):
    sha = good_bundle(agent, tmp_path)
    state = wait_job(agent, submit(agent, sha, runs=1, min_secs=120, timeout=2))
    assert state["status"] == "failed"
    assert state["error"].startswith("timed out after 2 s while "), state["error"]
    assert state["crash"] is None
    assert agent.agent.store.refusal(sha) is None  # slow is not broken
    assert wait_job(agent, submit(agent, sha, runs=3))["status"] == "done"


def test_cancel_queued_and_running_jobs(agent, tmp_path):
    sha = good_bundle(agent, tmp_path)
    running = submit(agent, sha, runs=1, min_secs=120)
    queued = submit(agent, sha, runs=3)
    wait_status(agent, running, "running")
    status, body = call(agent, "DELETE", f"/v1/jobs/{queued}")
    assert status == 200 and body["status"] == "cancelled"
    t0 = time.monotonic()
    status, body = call(agent, "DELETE", f"/v1/jobs/{running}")
    assert status == 200 and body["status"] == "cancelled" and "cancelled while" in body["error"]
    assert time.monotonic() - t0 < 30
    with pytest.raises(ClientError) as e:
        call(agent, "DELETE", f"/v1/jobs/{running}")
    assert e.value.status == 409
    with pytest.raises(ClientError) as e:
        call(agent, "DELETE", "/v1/jobs/nope")
    assert e.value.status == 404
    assert call(agent, "GET", f"/v1/jobs/{queued}")[1]["started_at"] is None
    assert wait_job(agent, submit(agent, sha, runs=3))["status"] == "done"


# --------------------------------------------------------------------------- a restarted agent


def _start_agent(store: Path):
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if k != "EDGERUN_TOKEN"}
    env["PYTHONUNBUFFERED"] = "1"
    proc = subprocess.Popen([sys.executable, "-m", "edgepipe.device.cli", "agent", "--port", "0", "--store",
                             str(store)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=repo)
    line = proc.stdout.readline()
    assert "agent listening on http://127.0.0.1:" in line, line + proc.stderr.read()
    return proc, line.split()[3]


def _get(url, path):
    return request("GET", url + path)[1]


def _wait(url, job_id, pred, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = _get(url, f"/v1/jobs/{job_id}")
        if pred(state):
            return state
        time.sleep(0.05)
    raise AssertionError(f"job {job_id}: {state}")


@pytest.mark.slow
def test_a_restarted_agent_answers_for_every_job_it_accepted(tmp_path):
    import signal

    store = tmp_path / "store"
    data, sha = tar_of(make_bundle(tmp_path / "b", "float.tflite", "tiny-fp32", "fp32"))
    proc, url = _start_agent(store)
    try:
        request("PUT", f"{url}/v1/bundles/{sha}", data=data, content_type="application/x-tar")
        job = {"kind": "bench", "bundle": sha, "runs": 3}
        done = request("POST", url + "/v1/jobs", body=job)[1]["id"]
        _wait(url, done, lambda s: s["status"] == "done")
        running = request("POST", url + "/v1/jobs", body={**job, "min_secs": 120})[1]["id"]
        queued = request("POST", url + "/v1/jobs", body=job)[1]["id"]
        _wait(url, running, lambda s: s["stage"] == "running the benchmark")
        worker = _get(url, "/v1/info")["agent"]["worker_pid"]
    finally:
        proc.kill()  # no goodbye: like a power cut or the OOM killer
        proc.communicate(timeout=30)
    deadline = time.monotonic() + 30  # the worker dies with it, leaving nothing running
    while Path(f"/proc/{worker}").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not Path(f"/proc/{worker}").exists()

    proc, url = _start_agent(store)
    try:
        assert _get(url, f"/v1/jobs/{done}")["report"]["kind"] == "bench"
        state = _get(url, f"/v1/jobs/{running}")
        assert state["status"] == "failed" and "agent restarted" in state["error"]
        assert _wait(url, queued, lambda s: s["status"] in ("done", "failed"))["status"] == "done"
        assert {j["id"] for j in _get(url, "/v1/jobs")["jobs"]} == {done, running, queued}
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0 and "Traceback" not in err, err
