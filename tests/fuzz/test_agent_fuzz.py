"""Seeded model mutants pushed through a real `edgerun agent` on loopback, a good job between them.

Each mutant (one field of a small real model changed, see ``fuzz.mutate``) is
uploaded as a plain-model bundle and benched; after every ``GOOD_EVERY``
mutants a known-good bundle is benched too. The agent runs as its own process
(`python -m edgepipe.device.cli agent --port 0`), as on a board. What must hold:

* 0 agent deaths: the same agent process answers from the first request to
  the last, and stops cleanly on SIGTERM;
* 0 lost jobs: every job id it accepted answers with a final state at the end,
  every good job is ``done``, every failed job has a one-line reason;
* 0 tracebacks in the agent's output.

The figures (mutants tried, uploads and jobs refused, jobs failed, worker
crashes contained, time) are printed; run with ``-s`` to see them.
"""
from __future__ import annotations

import hashlib
import io
import os
import signal
import subprocess
import sys
import tarfile
import time
from collections import Counter
from pathlib import Path

import pytest

from bundle_factory import make_bundle
from edgepipe.device.http import ClientError, request
from edgepipe.device.jobs import MAX_JOBS_KEPT
from fuzz.mutate import default_models, make_mutants

pytestmark = [pytest.mark.host, pytest.mark.slow]

SEED = int(os.environ.get("EDGEPIPE_FUZZ_SEED", "20240611"))
MUTANTS = int(os.environ.get("EDGEPIPE_FUZZ_MUTANTS", "500"))  # a longer run: EDGEPIPE_FUZZ_MUTANTS=2000
GOOD_EVERY = 3
JOB = {"kind": "bench", "runs": 3, "warmup": 1}
AGENT_JOB_TIMEOUT_S = 30  # a hung runtime is killed by the agent after this
WAIT_S = 120  # per job, from the host's side: generous for a busy 2-core box
TOTAL_S = 600  # the whole loop; the run normally takes about a minute
FINAL = ("done", "failed", "cancelled")


def _tar(members: dict) -> tuple:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in sorted(members.items()):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    data = buf.getvalue()
    return data, hashlib.sha256(data).hexdigest()


class Agent:
    """A real `edgerun agent` process on loopback; its output goes to a file we read at the end."""

    def __init__(self, tmp: Path):
        self.log = tmp / "agent.log"
        repo = Path(__file__).resolve().parents[2]
        env = {k: v for k, v in os.environ.items() if k != "EDGERUN_TOKEN"}
        env["PYTHONUNBUFFERED"] = "1"
        self.out = open(self.log, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "edgepipe.device.cli", "agent", "--port", "0", "--store", str(tmp / "store"),
             "--job-timeout", str(AGENT_JOB_TIMEOUT_S)],
            env=env, stdout=self.out, stderr=subprocess.STDOUT, text=True, cwd=repo)
        deadline = time.monotonic() + 60
        while "agent listening on" not in self.log.read_text():
            assert self.proc.poll() is None and time.monotonic() < deadline, self.log.read_text()
            time.sleep(0.05)
        self.url = self.log.read_text().split("agent listening on ")[1].split()[0]

    def call(self, method: str, path: str, **kw):
        return request(method, self.url + path, timeout=60, **kw)

    def put(self, data: bytes, sha: str):
        return self.call("PUT", f"/v1/bundles/{sha}", data=data, content_type="application/x-tar")

    def wait(self, job_id: str) -> dict:
        deadline = time.monotonic() + WAIT_S
        while True:
            state = self.call("GET", f"/v1/jobs/{job_id}")[1]
            if state["status"] in FINAL or time.monotonic() > deadline:
                return state
            time.sleep(0.01)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.out.close()
        return self.proc.returncode


def test_mutants_through_a_loopback_agent(tmp_path):
    mutants = make_mutants(default_models(), tmp_path / "mutants", count=MUTANTS, seed=SEED)
    good_dir = make_bundle(tmp_path / "good", "float.tflite", "tiny-fp32", "fp32")
    good = _tar({p.name: p.read_bytes() for p in good_dir.iterdir()})
    agent = Agent(tmp_path)
    pid = agent.proc.pid
    figures: Counter = Counter()
    accepted: dict = {}  # job id -> "mutant" | "good"
    stages: Counter = Counter()
    t0 = time.monotonic()
    try:
        agent.put(*good)
        for n, m in enumerate(mutants):
            assert time.monotonic() - t0 < TOTAL_S, f"fuzz loop over {TOTAL_S} s after {n} mutants"
            figures["mutants tried"] += 1
            data, sha = _tar({"model.tflite": m.path.read_bytes()})
            state = _push(agent, data, sha, figures, accepted)
            if state is not None:
                _count_mutant_job(m, state, figures, stages)
            if n % GOOD_EVERY == GOOD_EVERY - 1:
                job = agent.call("POST", "/v1/jobs", body={**JOB, "bundle": good[1]})[1]
                accepted[job["id"]] = "good"
                state = agent.wait(job["id"])
                figures["good jobs"] += 1
                assert state["status"] == "done", (m.path.name, m.description, state)
        info = agent.call("GET", "/v1/info")[1]["agent"]
        lost = _lost_jobs(agent, accepted)
        alive = agent.proc.poll() is None
    finally:
        code = agent.stop()
    log = agent.log.read_text()
    elapsed = time.monotonic() - t0
    figures["agent deaths"] = 0 if alive else 1
    figures["lost jobs"] = len(lost)
    figures["tracebacks in agent output"] = log.count("Traceback (most recent call last)")
    print(f"\nagent fuzz: {MUTANTS} mutants, seed {SEED}, {elapsed:.0f} s, worker restarts "
          f"{info['worker_restarts']}, agent says crashes contained {info['crashes_contained']}")
    for key in sorted(figures):
        print(f"  {key:<34} {figures[key]}")
    for key, count in stages.most_common():
        print(f"  crash: {key:<40} {count}")
    assert alive and agent.proc.pid == pid, log[-3000:]
    assert code == 0 and "agent stopped" in log, log[-3000:]
    assert not lost, lost
    assert figures["tracebacks in agent output"] == 0, log[-5000:]
    assert figures["good jobs"] == MUTANTS // GOOD_EVERY
    assert info["crashes_contained"] == figures["worker crashes contained"]


def _count_mutant_job(m, state: dict, figures: Counter, stages: Counter) -> None:
    """Check one mutant job's final state (one-line error) and count what happened to it."""
    figures[f"mutant jobs {state['status']}"] += 1
    assert state["status"] in FINAL, f"{m.path.name}: {state}"
    if state["status"] == "failed":
        assert state["error"] and "\n" not in state["error"], state["error"]
    if state.get("crash"):
        figures["worker crashes contained"] += 1
        stages[f"{state['crash']['signal']} while {state['crash']['stage']}"] += 1
        print(f"  contained: {m.path.name} ({m.description}): {state['error']}")
    if "timed out" in (state.get("error") or ""):
        figures["jobs timed out (worker killed)"] += 1


def _lost_jobs(agent: Agent, accepted: dict) -> list:
    """Accepted jobs that no longer answer as finished (the agent remembers the last MAX_JOBS_KEPT)."""
    lost = []
    for job_id in list(accepted)[-MAX_JOBS_KEPT:]:
        try:
            if agent.call("GET", f"/v1/jobs/{job_id}")[1]["status"] not in FINAL:
                lost.append(job_id)
        except ClientError:
            lost.append(job_id)
    return lost


def _push(agent: Agent, data: bytes, sha: str, figures: Counter, accepted: dict):
    """Upload a mutant and bench it; None when the agent refused it (counted)."""
    try:
        agent.put(data, sha)
    except ClientError as e:
        assert e.status is not None and 400 <= e.status < 500, e  # refused with a reason, not dropped
        figures[f"uploads refused ({e.status})"] += 1
        return None
    try:
        job = agent.call("POST", "/v1/jobs", body={**JOB, "bundle": sha})[1]
    except ClientError as e:
        assert e.status == 422, e  # a bundle identical to one that crashed before
        figures["jobs refused (crashed before)"] += 1
        return None
    accepted[job["id"]] = "mutant"
    return agent.wait(job["id"])
