#!/usr/bin/env python3
"""Fleet scale: 100 simulated boards through the broker and over HTTP, on loopback.

Each board is the real agent front end (``MqttAgent`` on a private Mosquitto
with authentication, or ``AgentServer`` over HTTP) with a real bundle store,
but its job core is a stub that sleeps a known time per job and answers with a
copy of one real report (new id, the board's identity). The stub lives here,
never in the product: the figure measures orchestration, not inference.
Boards run as agents in a few processes. For each path the host runs one fleet
bench (``bench_broker`` / ``bench_fleet``) of JOBS jobs per board into a fresh
SQLite store and prints:

- wall time of the fleet bench / the slowest board's own time (sum of its job
  sleeps); target <= 1.2
- reports stored vs jobs sent (target: equal, 0 lost, 0 duplicated: every
  stored report names a distinct job)

    .venv/bin/python scripts/bench/fleet_scale.py [--boards 100] [--procs 4] [--jobs 8] [--job-secs 1.0]
        [--only mqtt|http]
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
import types
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))  # the private Mosquitto helper (tests/mqtt_broker.py)
MODEL = REPO / "tests" / "data" / "models" / "float.tflite"


# --------------------------------------------------------------------------- the stub (bench only)


class StubCore:
    """The job core's interface with a runner that sleeps ``job_secs`` per job."""

    def __init__(self, store, job_secs: float, template: dict, device: dict, on_change=None):
        self.store, self.job_secs, self.template, self.device = store, job_secs, template, device
        self.on_change, self.keep_warm, self.busy = on_change, 0, 0.0
        self.data = types.SimpleNamespace(max_bytes=0)  # no data uploads on a stub board
        self._jobs, self._q, self._lock = {}, queue.Queue(), threading.Lock()
        threading.Thread(target=self._run, daemon=True).start()

    def submit(self, spec, job_id=None):
        from edgepipe.device.jobs import Job, JobRefused

        if not self.store.has(spec.bundle):
            raise JobRefused(409, f"bundle {spec.bundle[:12]} is not on this device")
        job = Job(id=job_id or str(uuid.uuid4()), kind=spec.kind, bundle=spec.bundle, params=spec.params,
                  timeout=600.0)
        with self._lock:
            if job.id in self._jobs:
                raise JobRefused(409, "job exists")
            self._jobs[job.id] = job
            snap = dataclasses.replace(job)
        self._q.put(job.id)
        self._changed(snap)
        return snap

    def get(self, job_id):
        with self._lock:
            j = self._jobs.get(job_id)
            return dataclasses.replace(j) if j else None

    def list(self):
        with self._lock:
            return [dataclasses.replace(j) for j in self._jobs.values()]

    def cancel(self, job_id, wait=30.0):
        from edgepipe.device.jobs import JobRefused

        raise JobRefused(409, "stub jobs run to the end")

    def stats(self):
        q = sum(1 for j in self.list() if not j.status.final)
        return {"queued": q, "running": 0, "worker_pid": None, "worker_restarts": 0, "crashes_contained": 0,
                "default_timeout_s": 600.0}

    def queued(self):
        return self.stats()["queued"]

    def pinned(self):
        return set()

    def close(self):
        pass

    def _changed(self, snap):
        if self.on_change is not None:
            self.on_change(snap)

    def _run(self):
        from edgepipe.device.jobs import JobState

        while True:
            job = self._jobs[self._q.get()]
            with self._lock:
                job.status = JobState.RUNNING
                snap = dataclasses.replace(job)
            self._changed(snap)
            t0 = time.perf_counter()
            time.sleep(self.job_secs)
            self.busy += time.perf_counter() - t0
            rep = copy.deepcopy(self.template)
            rep["id"] = str(uuid.uuid4())
            rep["device"].update(self.device)
            rep.setdefault("settings", {})["agent_job"] = job.id
            with self._lock:
                job.report, job.status = rep, JobState.DONE
                snap = dataclasses.replace(job)
            self._changed(snap)


# --------------------------------------------------------------------------- board processes


def board_process(args) -> None:
    """Host ``args.count`` boards; print one ready line (HTTP: their URLs); on SIGTERM write busy times."""
    from edgepipe.device.bundle_store import BundleStore
    from edgepipe.device.identity import DeviceIdentity

    template = json.loads(Path(args.template).read_text())
    root = Path(args.workdir)
    boards, servers = [], []
    for i in range(args.first, args.first + args.count):
        ident = DeviceIdentity(id=f"ep-sim{i:013d}", name=f"sim-{i:03d}", tags=("sim",))
        device = {**ident.to_dict(), "hostname": f"sim-host-{i:03d}"}
        store = BundleStore(root / f"board{i}")
        if args.mode == "mqtt":
            from edgepipe.device.agent_mqtt import MqttAgent
            from edgepipe.device.mqtt import parse_broker

            front = MqttAgent(parse_broker(args.broker), ident, store.root, heartbeat=30.0)
            core = StubCore(store, args.job_secs, template, device, on_change=front.job_changed)
            front.attach(core)
            front.start()
            servers.append(front)
        else:
            from edgepipe.device.agent import AgentHandler, AgentServer
            from edgepipe.device.http import Server
            from edgepipe.device.httpconn import Limits

            core = StubCore(store, args.job_secs, template, device)
            srv = AgentServer.__new__(AgentServer)  # fewer worker threads than the product's default
            srv.agent, srv._info = core, (lambda d=device: dict(d))
            Server.__init__(srv, ("127.0.0.1", 0), AgentHandler, token=None, max_body=64 << 10,
                            limits=Limits(workers=4))
            srv.start_background()
            servers.append(srv)
        boards.append((ident.id, core))
    urls = [s.url for s in servers] if args.mode == "http" else []
    print(json.dumps({"ready": len(boards), "urls": urls}), flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    Path(args.out).write_text(json.dumps({bid: core.busy for bid, core in boards}))
    os._exit(0)


def start_boards(mode: str, n: int, procs: int, job_secs: float, template: Path, work: Path, broker: str = ""):
    per = -(-n // procs)
    out = []
    for p in range(procs):
        first, count = p * per, min(per, n - p * per)
        if count <= 0:
            break
        busy = work / f"{mode}-busy-{p}.json"
        cmd = [sys.executable, __file__, "--board-proc", mode, "--first", str(first), "--count", str(count),
               "--job-secs", str(job_secs), "--template", str(template), "--workdir", str(work / f"{mode}{p}"),
               "--out", str(busy), "--broker", broker]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        out.append((proc, busy))
    urls = []
    for proc, _ in out:
        line = proc.stdout.readline()
        if not line:
            raise SystemExit(f"a board process failed to start ({mode})")
        urls += json.loads(line)["urls"]
    return out, urls


def stop_boards(procs) -> dict:
    busy = {}
    for proc, path in procs:
        proc.send_signal(signal.SIGTERM)
    for proc, path in procs:
        proc.wait(60)
        busy.update(json.loads(path.read_text()))
    return busy


# --------------------------------------------------------------------------- the host


def measure(mode: str, args, packed, template: Path, work: Path) -> dict:
    from edgepipe.pipeline.store import Store

    settings = [{"runs": 1, "seed": k} for k in range(args.jobs)]
    broker = None
    if mode == "mqtt":
        from mqtt_broker import Mosquitto
        broker = Mosquitto().start()
    try:
        procs, urls = start_boards(mode, args.boards, args.procs, args.job_secs, template, work,
                                   broker.url if broker else "")
        store = Store(work / f"{mode}.db")
        try:
            t0 = time.perf_counter()
            if mode == "mqtt":
                from edgepipe.device.mqtt import parse_broker
                from edgepipe.pipeline.fleet_broker import bench_broker
                res = bench_broker(packed, parse_broker(broker.url), ["tag:sim"], settings=settings, store=store,
                                   job_timeout=300)
            else:
                from edgepipe.pipeline.fleet import bench_fleet
                res = bench_fleet(packed, urls, settings=settings, store=store, job_timeout=300)
            wall = time.perf_counter() - t0
        finally:
            busy = stop_boards(procs)
        rows = store.query()
        store.close()
    finally:
        if broker is not None:
            broker.stop()
    jobs = {(r.get("settings") or {}).get("agent_job") for r in rows}
    sent = args.boards * args.jobs
    return {"path": mode, "wall_s": wall, "slowest_board_s": max(busy.values()), "sent": sent,
            "ok": sum(o.status == "ok" for o in res.outcomes), "stored": len(rows),
            "lost": sent - len(jobs), "duplicated": len(rows) - len(jobs),
            "ratio": wall / max(max(busy.values()), 1e-9)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--boards", type=int, default=100)
    ap.add_argument("--procs", type=int, default=4)
    ap.add_argument("--jobs", type=int, default=8, help="jobs per board")
    ap.add_argument("--job-secs", type=float, default=1.0)
    ap.add_argument("--only", choices=("mqtt", "http"))
    ap.add_argument("--board-proc", choices=("mqtt", "http"), help=argparse.SUPPRESS)
    for hidden in ("--first", "--count"):
        ap.add_argument(hidden, type=int, default=0, help=argparse.SUPPRESS)
    for hidden in ("--template", "--workdir", "--out", "--broker"):
        ap.add_argument(hidden, default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.board_proc:
        args.mode = args.board_proc
        board_process(args)
        return
    from edgepipe.device.bench import run_bench
    from edgepipe.pipeline.remote import pack_bundle

    with tempfile.TemporaryDirectory(prefix="edgepipe-fleet-scale-") as tmp:
        work = Path(tmp)
        template = work / "template.json"
        template.write_text(json.dumps(run_bench(MODEL, runs=2, warmup=1)))
        packed = [pack_bundle(MODEL)]
        results = [measure(m, args, packed, template, work) for m in ("mqtt", "http") if args.only in (None, m)]
    print(f"\n{args.boards} boards x {args.jobs} jobs of {args.job_secs:g} s ({args.procs} board processes)")
    print(f"{'':24}" + "".join(f"{r['path']:>12}" for r in results))
    for key, label, f in (("wall_s", "fleet wall (s)", "{:.2f}"), ("slowest_board_s", "slowest board (s)", "{:.2f}"),
                          ("ratio", "ratio (target <= 1.2)", "{:.3f}"), ("sent", "jobs sent", "{}"),
                          ("ok", "jobs ok", "{}"), ("stored", "reports stored", "{}"), ("lost", "lost", "{}"),
                          ("duplicated", "duplicated", "{}")):
        print(f"{label:24}" + "".join(f"{f.format(r[key]):>12}" for r in results))
    bad = [r["path"] for r in results if r["lost"] or r["duplicated"] or r["stored"] != r["sent"]]
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
