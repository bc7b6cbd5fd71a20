"""The agent's job core: the queue, job states on disk, the worker.

Front ends (HTTP in :mod:`edgepipe.device.agent`, MQTT later) only call
:class:`JobCore`: ``submit``, ``get``, ``list``, ``cancel``, ``close``. Jobs
run one at a time in a child process (:mod:`edgepipe.device.worker`) so they
never skew each other's timings and a crashing model takes down only the
worker. Every state change is written to ``<store>/.jobs/<id>.json``
(atomically), so a restarted agent still answers for every job it accepted.
Requests are validated before they get here (:mod:`edgepipe.device.job_spec`).
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import os
import re
import sys
import threading
import uuid
from collections import deque
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Callable, Optional

from edgepipe.device.bundle_store import BundleStore
from edgepipe.device.data_store import DATA_DIR, DataStore
# Requests are validated in job_spec; re-exported so front ends keep importing them from here.
from edgepipe.device.job_spec import JobRefused, JobSpec, parse_job
from edgepipe.device.worker import JobRequest, Outcome, Result, WorkerHandle

DEFAULT_TIMEOUT = 600.0
MAX_JOBS_KEPT = 500  # finished jobs remembered (and answered for)
MAX_QUEUED = 200
JOBS_DIR = ".jobs"
_JOB_FILE_LIMIT = 8 << 20
JOB_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class JobState(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def final(self) -> bool:
        return self in (JobState.DONE, JobState.FAILED, JobState.CANCELLED)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")


@dataclass
class Job:
    id: str
    kind: str
    bundle: str
    params: dict
    timeout: float
    status: JobState = JobState.QUEUED
    queued_at: str = field(default_factory=_now)
    started_at: Optional[str] = None
    finished_at: Optional[str] = None
    stage: Optional[str] = None  # what the worker is doing (running jobs)
    report: Optional[dict] = None
    error: Optional[str] = None
    crash: Optional[dict] = None  # {"signal", "exit_status", "stage", "where"} when the worker died

    def to_dict(self, with_report: bool = True) -> dict:
        d = {"id": self.id, "kind": self.kind, "bundle": self.bundle, "params": self.params,
             "timeout": self.timeout, "status": self.status.value, "queued_at": self.queued_at,
             "started_at": self.started_at, "finished_at": self.finished_at, "stage": self.stage,
             "error": self.error, "crash": self.crash}
        if with_report:
            d["report"] = self.report
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Job":
        return cls(id=str(d["id"]), kind=d["kind"], bundle=d["bundle"], params=dict(d.get("params") or {}),
                   timeout=float(d.get("timeout") or DEFAULT_TIMEOUT), status=JobState(d["status"]),
                   queued_at=d.get("queued_at") or _now(), started_at=d.get("started_at"),
                   finished_at=d.get("finished_at"), stage=d.get("stage"), report=d.get("report"),
                   error=d.get("error"), crash=d.get("crash"))


class JobJournal:
    """One small JSON file per job, replaced atomically on every change."""

    def __init__(self, directory: Path):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)

    def save(self, job: Job) -> None:
        tmp = self.dir / f".{job.id}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(job.to_dict(), f, separators=(",", ":"))
        os.replace(tmp, self.dir / f"{job.id}.json")

    def delete(self, job_id: str) -> None:
        try:
            (self.dir / f"{job_id}.json").unlink()
        except FileNotFoundError:
            pass

    def load_all(self) -> list:
        """Every readable job, oldest first; unreadable files are dropped with a line on stderr."""
        jobs = []
        for p in self.dir.glob("*.json"):
            try:
                if p.stat().st_size > _JOB_FILE_LIMIT:
                    raise ValueError("file too large")
                jobs.append(Job.from_dict(json.loads(p.read_text("utf-8"))))
            except (OSError, ValueError, KeyError, TypeError) as e:
                print(f"agent: dropping unreadable job file {p.name}: {e}", file=sys.stderr)
                p.unlink(missing_ok=True)
        for p in self.dir.glob(".*.tmp"):
            p.unlink(missing_ok=True)
        return sorted(jobs, key=lambda j: j.queued_at)


class JobCore:
    """Queue + persisted job states + one worker process, shared by every front end.

    ``on_report(report)`` is called for every successful job (e.g. to forward it
    to a collector); ``on_change(job)`` for every state or stage change (a
    snapshot; e.g. MQTT progress events). Both run on the dispatcher thread.
    """

    def __init__(self, store: BundleStore, *, keep_warm: int = 2, default_timeout: float = DEFAULT_TIMEOUT,
                 on_report: Optional[Callable[[dict], None]] = None,
                 on_change: Optional[Callable[[Job], None]] = None, context=None):
        self.store = store
        self.keep_warm = keep_warm
        self.default_timeout = float(default_timeout)
        self.on_report, self.on_change = on_report, on_change
        self.journal = JobJournal(store.root / JOBS_DIR)
        self.worker = WorkerHandle(self.journal.dir / "worker.fault", keep_warm=keep_warm, context=context)
        self.crashes = 0  # jobs whose worker died under them (contained)
        self._jobs: "dict[str, Job]" = {}
        self._queue: "deque[str]" = deque()
        self._cancel: set = set()
        self._cv = threading.Condition()
        self._closed = False
        store.in_use = self.pinned  # bundles with queued/running jobs are never evicted
        # Evaluation data beside the bundles, bounded by the same limits (a quarter of the quota).
        self.data = DataStore(store.root / DATA_DIR, max_bytes=min(store.max_bytes, 64 << 20),
                              quota_bytes=max(store.quota_bytes // 4, 1))
        self.data.in_use = self.pinned_data
        self._recover()
        self._thread = threading.Thread(target=self._dispatch, name="edgerun-jobs", daemon=True)
        self._thread.start()

    # -- the API front ends use ------------------------------------------
    def submit(self, spec: JobSpec, job_id: Optional[str] = None) -> Job:
        """Queue a job; raises :class:`JobRefused` (409 no bundle, 422 refused bundle, 429 queue full).

        ``job_id`` lets a front end pick the id (the broker's host does, so a
        job delivered twice is recognised); a known id is refused with 409.
        """
        if job_id is not None and not JOB_ID_RE.match(job_id):  # it names a file in the journal
            raise JobRefused(400, "job id must be 1-64 letters, digits, '-' or '_'")
        refusal = self.store.refusal(spec.bundle)
        if refusal:
            raise JobRefused(422, f"bundle {spec.bundle[:12]} is refused on this device: {refusal} "
                                  "(upload it again with force to retry)")
        if not self.store.has(spec.bundle):
            raise JobRefused(409, f"bundle {spec.bundle[:12]} is not on this device; "
                                  f"PUT /v1/bundles/{spec.bundle} first")
        data = spec.params.get("data") if spec.kind == "evaluate" else None
        if data is not None and not self.data.has(data):
            raise JobRefused(409, f"data {data[:12]} is not on this device; PUT /v1/data/{data} first")
        timeout = spec.timeout or self.default_timeout + float(spec.params.get("min_secs") or 0)
        job = Job(id=job_id or str(uuid.uuid4()), kind=spec.kind, bundle=spec.bundle, params=spec.params,
                  timeout=timeout)
        with self._cv:
            if self._closed:
                raise JobRefused(503, "the agent is stopping")
            if job.id in self._jobs:
                raise JobRefused(409, f"job {job.id} already exists")
            if len(self._queue) >= MAX_QUEUED:
                raise JobRefused(429, f"{MAX_QUEUED} jobs are already queued; retry later")
            self._jobs[job.id] = job
            self.journal.save(job)
            self._queue.append(job.id)
            self._prune()
            self._cv.notify_all()
            snap = _copy(job)
        self.store.touch(spec.bundle)
        self._changed(snap)
        return snap

    def get(self, job_id: str) -> Optional[Job]:
        """A snapshot of the job, or None when this agent never accepted it (or forgot it)."""
        with self._cv:
            job = self._jobs.get(job_id)
            return _copy(job) if job else None

    def list(self) -> list:
        with self._cv:
            return [_copy(j) for j in self._jobs.values()]

    def cancel(self, job_id: str, wait: float = 30.0) -> Job:
        """Cancel a queued or running job (a running one kills the worker); returns its final state."""
        with self._cv:
            job = self._jobs.get(job_id)
            if job is None:
                raise JobRefused(404, "no such job")
            if job.status.final:
                raise JobRefused(409, f"job is already {job.status.value}")
            if job.status is JobState.QUEUED:
                self._queue.remove(job_id)
                self._end(job, JobState.CANCELLED, error="cancelled before it started")
                snap = _copy(job)
            else:
                self._cancel.add(job_id)
                self._cv.wait_for(lambda: job.status.final, timeout=wait)
                snap = _copy(job)
        self._changed(snap)
        return snap

    def pinned(self) -> set:
        """Bundles that queued or running jobs need."""
        with self._cv:
            return {j.bundle for j in self._jobs.values() if not j.status.final}

    def pinned_data(self) -> set:
        """Data blobs that queued or running evaluate jobs need."""
        with self._cv:
            return {j.params.get("data") for j in self._jobs.values() if not j.status.final and j.kind == "evaluate"}

    def stats(self) -> dict:
        with self._cv:
            states = [j.status for j in self._jobs.values()]
        return {"queued": states.count(JobState.QUEUED), "running": states.count(JobState.RUNNING),
                "worker_pid": self.worker.pid, "worker_restarts": self.worker.restarts,
                "crashes_contained": self.crashes, "default_timeout_s": self.default_timeout}

    def queued(self) -> int:
        """Jobs not finished yet (queued or running)."""
        s = self.stats()
        return s["queued"] + s["running"]

    def close(self) -> None:
        """Stop: a running job fails ("agent stopped"), queued jobs stay queued for the next start."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._thread.join(timeout=60)
        self.worker.stop()

    # -- internals -------------------------------------------------------
    def _recover(self) -> None:
        for job in self.journal.load_all():
            if job.status is JobState.RUNNING:
                self._end(job, JobState.FAILED, error="the agent restarted while the job was running")
            self._jobs[job.id] = job
            if job.status is JobState.QUEUED:
                self._queue.append(job.id)
        self._prune()

    def _dispatch(self) -> None:
        self.worker.start()
        while True:
            with self._cv:
                self._cv.wait_for(lambda: self._closed or self._queue)
                if self._closed:
                    return
                job = self._jobs[self._queue.popleft()]
                job.status, job.started_at = JobState.RUNNING, _now()
                self.journal.save(job)
                snap = _copy(job)
            self._changed(snap)
            self._finish(job, self._run(job))

    def _run(self, job: Job) -> Outcome:
        if not self.store.has(job.bundle):
            return Outcome(Result.FAILED, error=f"bundle {job.bundle[:12]} is no longer on this device")

        def on_stage(stage: str) -> None:
            with self._cv:
                job.stage = stage
                snap = _copy(job)
            self._changed(snap)

        params = job.params
        if job.kind == "evaluate":
            if not self.data.has(params["data"]):
                return Outcome(Result.FAILED, error=f"data {params['data'][:12]} is no longer on this device")
            params = {**params, "data_path": str(self.data.path(params["data"]))}
        req = JobRequest(job.id, job.kind, job.bundle, str(self.store.path(job.bundle)), params)
        return self.worker.run(req, timeout=job.timeout, on_stage=on_stage,
                               cancelled=lambda: self._closed or job.id in self._cancel)

    def _finish(self, job: Job, out: Outcome) -> None:
        state = {Result.DONE: JobState.DONE, Result.FAILED: JobState.FAILED}.get(out.result, JobState.CANCELLED)
        error = out.error
        if out.result is Result.CANCELLED and self._closed and job.id not in self._cancel:
            state, error = JobState.FAILED, "the agent stopped while the job was running"
        if out.crash is not None:
            self.crashes += 1
            if out.crash.by_the_model:  # refused until a forced upload; an OOM kill may not recur
                self.store.mark_refused(job.bundle, f"job {job.id} {error}")
            print(f"agent: job {job.id} (bundle {job.bundle[:12]}) {error}; worker restarted", file=sys.stderr)
        elif out.traceback:  # a bug in edgepipe, not a bad model: keep the evidence
            print(f"agent: job {job.id} failed: {error}\n{out.traceback}", file=sys.stderr, end="")
        with self._cv:
            job.report = out.report
            self._end(job, state, error=error,
                      crash=dataclasses.asdict(out.crash) if out.crash is not None else None)
            self._cancel.discard(job.id)
            self._cv.notify_all()
            snap = _copy(job)
        self._changed(snap)
        # An evaluate job's report is one batch of raw outputs: the host makes the eval report of it.
        if out.report is not None and self.on_report is not None and job.kind != "evaluate":
            try:
                self.on_report(out.report)
            except Exception as e:  # sending is best effort; the spool keeps it
                print(f"agent: forwarding the report of job {job.id} failed: {type(e).__name__}: {e}",
                      file=sys.stderr)

    def _end(self, job: Job, state: JobState, *, error: Optional[str] = None, crash: Optional[dict] = None) -> None:
        job.status, job.finished_at, job.error, job.crash = state, _now(), error, crash
        self.journal.save(job)

    def _prune(self) -> None:
        finished = [j.id for j in self._jobs.values() if j.status.final]
        for jid in finished[: max(0, len(self._jobs) - MAX_JOBS_KEPT)]:
            del self._jobs[jid]
            self.journal.delete(jid)

    def _changed(self, snap: Job) -> None:
        if self.on_change is not None:
            try:
                self.on_change(snap)
            except Exception as e:  # a front end's listener must not stop the queue
                print(f"agent: job listener failed: {type(e).__name__}: {e}", file=sys.stderr)


def _copy(job: Job) -> Job:
    return Job(**{f: getattr(job, f) for f in job.__dataclass_fields__})


__all__ = ["DEFAULT_TIMEOUT", "Job", "JobCore", "JobJournal", "JobRefused", "JobSpec", "JobState", "parse_job"]
