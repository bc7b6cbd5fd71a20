"""`edgerun agent`: the device side of `edgepipe bench`.

HTTP routes (DESIGN.md): ``GET /v1/info``, ``PUT /v1/bundles/{sha256}`` (tar
body), ``GET /v1/bundles[/{sha256}]``, ``POST /v1/jobs``, ``GET /v1/jobs[/{id}]``,
``GET /healthz``. Jobs run one at a time on a single worker thread so they never
skew each other's timings; loaded interpreters stay warm between jobs that use
the same bundle and settings, and each report says whether its load was cold
or warm.
"""
from __future__ import annotations

import collections
import datetime as _dt
import queue
import threading
import traceback
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from edgepipe.device.bundle_store import BundleStore, UploadError, check_digest
from edgepipe.device.http import HTTPError_, JSONHandler, Server, check_bind

DEFAULT_PORT = 8751
# Failures with a one-line reason for the user; anything else also gets a
# traceback on the agent's stderr (the journal under systemd).
_EXPECTED_ERRORS = ("BundleError", "RuntimeLoadError", "BenchError", "RunError", "SourceError", "InputError",
                    "ValueError")
MAX_JOBS_KEPT = 500

# Job parameters: name -> (type check, description). Unknown keys are refused
# so a typo never silently runs with defaults.
_INT = (int,)
_NUM = (int, float)
BENCH_PARAMS = {"threads": _INT, "delegate": (str,), "runs": _INT, "warmup": _INT, "min_secs": _NUM,
                "input": (str,), "backend": (str,), "seed": _INT}
RUN_PARAMS = {"threads": _INT, "delegate": (str,), "backend": (str,), "source": (str,),
              "pipeline": (bool,), "max_frames": _INT}


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")


@dataclass
class Job:
    id: str
    kind: str
    bundle: str
    params: dict
    status: str = "queued"  # queued -> running -> done | failed
    queued_at: str = field(default_factory=_now)
    started_at: Optional[str] = None
    finished_at: Optional[str] = None
    report: Optional[dict] = None
    error: Optional[str] = None

    def to_dict(self, with_report: bool = True) -> dict:
        d = {"id": self.id, "kind": self.kind, "bundle": self.bundle, "params": self.params,
             "status": self.status, "queued_at": self.queued_at, "started_at": self.started_at,
             "finished_at": self.finished_at, "error": self.error}
        if with_report:
            d["report"] = self.report
        return d


def parse_job(doc) -> tuple:
    """Validate a POST /v1/jobs body; returns ``(kind, bundle, params)``."""
    if not isinstance(doc, dict):
        raise HTTPError_(400, "job must be a JSON object")
    kind = doc.get("kind")
    if kind not in ("bench", "run"):
        raise HTTPError_(400, "job kind must be 'bench' or 'run'")
    bundle = doc.get("bundle")
    try:
        check_digest(bundle if isinstance(bundle, str) else "")
    except UploadError as e:
        raise HTTPError_(400, f"bundle: {e.reason}") from None
    allowed = BENCH_PARAMS if kind == "bench" else RUN_PARAMS
    params = {}
    for key, value in doc.items():
        if key in ("kind", "bundle"):
            continue
        if key not in allowed:
            raise HTTPError_(400, f"unknown {kind} job parameter {key!r} (known: {', '.join(sorted(allowed))})")
        if value is None:
            continue
        types = allowed[key]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise HTTPError_(400, f"{key} must be {'/'.join(t.__name__ for t in types)}")
        if key in ("threads", "runs", "max_frames") and value < 1:
            raise HTTPError_(400, f"{key} must be >= 1")
        if key in ("warmup", "min_secs") and value < 0:
            raise HTTPError_(400, f"{key} must be >= 0")
        params[key] = value
    if kind == "run" and "source" not in params:
        raise HTTPError_(400, "a run job needs a source (DIR, FILE, VIDEO, camera[:N] or picamera)")
    return kind, bundle, params


class WarmCache:
    """Loaded interpreters keyed by (bundle, backend, delegate, threads), LRU."""

    def __init__(self, size: int = 2):
        self.size = max(0, int(size))
        self._items: "collections.OrderedDict" = collections.OrderedDict()

    def get(self, key, load: Callable[[], object]) -> tuple:
        """Return ``(loaded, warm)``; loads (cold) and caches on a miss."""
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key], True
        loaded = load()
        if self.size:
            self._items[key] = loaded
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return loaded, False

    def drop(self, key) -> None:
        self._items.pop(key, None)


def load_for(bundle_dir: Path, params: dict):
    """Load the model a job needs, the way `edgerun bench` would."""
    from edgepipe.device.bundle import load_bundle
    from edgepipe.device.runtime import load_model

    b = load_bundle(bundle_dir)
    delegate = params.get("delegate") or "cpu"
    path = b.model_path
    if delegate.split(":")[0].lower() == "edgetpu" and b.edgetpu_model_path() is not None:
        path = b.edgetpu_model_path()
    return load_model(path, backend=params.get("backend"), delegate=delegate,
                      threads=params.get("threads"))


def execute_job(kind: str, bundle_dir: Path, params: dict, loaded) -> dict:
    """Run one job with an already-loaded model; returns the report."""
    if kind == "bench":
        from edgepipe.device.bench import run_bench
        kw = {k: params[k] for k in ("runs", "warmup", "min_secs", "input", "seed") if k in params}
        return run_bench(bundle_dir, threads=params.get("threads"), delegate=params.get("delegate") or "cpu",
                         backend=params.get("backend"), loaded=loaded, **kw)
    from edgepipe.device.runner import run_source
    kw = {k: params[k] for k in ("pipeline", "max_frames") if k in params}
    return run_source(bundle_dir, params["source"], threads=params.get("threads"),
                      delegate=params.get("delegate") or "cpu", loaded=loaded, **kw)


class Agent:
    """Job queue + worker thread + warm interpreters + bundle store."""

    def __init__(self, store: BundleStore, *, keep_warm: int = 2,
                 on_report: Optional[Callable[[dict], None]] = None,
                 loader: Callable = load_for, executor: Callable = execute_job):
        self.store = store
        self.warm = WarmCache(keep_warm)
        self.on_report = on_report
        self._loader, self._executor = loader, executor
        self._jobs: "collections.OrderedDict[str, Job]" = collections.OrderedDict()
        self._lock = threading.Lock()
        self._queue: "queue.Queue[Optional[Job]]" = queue.Queue()
        self._worker = threading.Thread(target=self._work, name="edgerun-agent-worker", daemon=True)
        self._worker.start()

    # -- API used by the HTTP handler ---------------------------------
    def submit(self, kind: str, bundle: str, params: dict) -> Job:
        if not self.store.has(bundle):
            raise HTTPError_(409, f"bundle {bundle[:12]} is not on this device; PUT /v1/bundles/{bundle} first")
        job = Job(id=str(uuid.uuid4()), kind=kind, bundle=bundle, params=params)
        with self._lock:
            self._jobs[job.id] = job
            finished = [j for j in self._jobs.values() if j.status in ("done", "failed")]
            for old in finished[: max(0, len(self._jobs) - MAX_JOBS_KEPT)]:
                del self._jobs[old.id]
        self._queue.put(job)
        return job

    def job(self, job_id: str) -> Optional[Job]:
        with self._lock:
            return self._jobs.get(job_id)

    def jobs(self) -> list:
        with self._lock:
            return list(self._jobs.values())

    def queued(self) -> int:
        with self._lock:
            return sum(1 for j in self._jobs.values() if j.status in ("queued", "running"))

    def close(self) -> None:
        self._queue.put(None)
        self._worker.join(timeout=30)

    # -- the worker ---------------------------------------------------
    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            job.status, job.started_at = "running", _now()
            try:
                job.report = self._run(job)
                job.status = "done"
            except Exception as e:  # a failed job must not stop the agent
                job.error = _one_line(e)
                job.status = "failed"
                if type(e).__name__ not in _EXPECTED_ERRORS:
                    traceback.print_exc()
            finally:
                job.finished_at = _now()
            if job.report is not None and self.on_report is not None:
                try:
                    self.on_report(job.report)
                except Exception:  # sending is best effort; the spool keeps it
                    traceback.print_exc()

    def _run(self, job: Job) -> dict:
        bundle_dir = self.store.path(job.bundle)
        p = job.params
        key = (job.bundle, p.get("backend"), p.get("delegate") or "cpu", p.get("threads"))
        loaded, warm = self.warm.get(key, lambda: self._loader(bundle_dir, p))
        try:
            if not warm and hasattr(loaded, "first_invoke"):
                # The executor sees a pre-loaded model and would skip the
                # first-invoke timing; its cost (weight packing, delegate
                # preparation) does not depend on the input values.
                loaded.first_invoke()
            report = self._executor(job.kind, bundle_dir, p, loaded)
        except Exception:
            self.warm.drop(key)  # an interpreter in an unknown state is not reused
            raise
        report.setdefault("runtime", {})["load"] = "warm" if warm else "cold"
        if not warm and getattr(loaded, "load_ms", None):
            report["load_ms"] = dict(loaded.load_ms)
        elif warm:
            report["load_ms"] = None  # it was paid by an earlier job, reported there
        settings = report.get("settings") or {}
        settings.update({"agent_job": job.id, "bundle_tar_sha256": job.bundle})
        report["settings"] = settings
        return report


def _one_line(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0] if msg else ''}"[:500]


class AgentHandler(JSONHandler):
    def route(self, method, path, query):
        srv: AgentServer = self.server  # type: ignore[assignment]
        agent = srv.agent
        parts = [p for p in path.split("/") if p]
        if path == "/healthz":
            return 200, {"ok": True, "service": "edgerun-agent"}
        if parts[:1] != ["v1"] or len(parts) < 2:
            raise HTTPError_(404, f"no route for {method} {path}")
        res = parts[1]
        if res == "info" and len(parts) == 2 and method == "GET":
            return 200, srv.info()
        if res == "bundles":
            if len(parts) == 2 and method == "GET":
                return 200, {"bundles": agent.store.list()}
            if len(parts) == 3:
                return self._bundle(method, parts[2], agent)
        if res == "jobs":
            if len(parts) == 2 and method == "POST":
                kind, bundle, params = parse_job(self.read_json(64 << 10))
                job = agent.submit(kind, bundle, params)
                return 202, job.to_dict(with_report=False)
            if len(parts) == 2 and method == "GET":
                return 200, {"jobs": [j.to_dict(with_report=False) for j in agent.jobs()]}
            if len(parts) == 3 and method == "GET":
                job = agent.job(parts[2])
                if job is None:
                    raise HTTPError_(404, "no such job")
                return 200, job.to_dict()
        raise HTTPError_(404 if method in ("GET", "HEAD") else 405, f"no route for {method} {path}")

    def _bundle(self, method, sha, agent):
        try:
            check_digest(sha)
            if method in ("GET", "HEAD"):
                d = agent.store.describe(sha)
                if d is None:
                    raise HTTPError_(404, "bundle not on this device")
                return 200, d
            if method != "PUT":
                raise HTTPError_(405, f"{method} not allowed on bundles")
            n = self.body_length(limit=agent.store.max_bytes)
            if agent.store.has(sha):
                self._drain(n)
                return 200, {**agent.store.describe(sha), "new": False}
            try:
                _, new = agent.store.put(sha, self.rfile, n)
            finally:
                self._body_done = True
            return (201 if new else 200), {**agent.store.describe(sha), "new": new}
        except UploadError as e:
            raise HTTPError_(e.status, e.reason) from None

    def _drain(self, n: int) -> None:
        while n > 0:
            chunk = self.rfile.read(min(n, 1 << 16))
            if not chunk:
                break
            n -= len(chunk)
        self._body_done = True


class AgentServer(Server):
    def __init__(self, agent: Agent, host: str = "127.0.0.1", port: int = DEFAULT_PORT, *,
                 token: Optional[str] = None, info: Optional[Callable[[], dict]] = None):
        check_bind(host, token)
        self.agent = agent
        self._info = info
        super().__init__((host, port), AgentHandler, token=token, max_body=64 << 10)

    def info(self) -> dict:
        base = dict(self._info()) if self._info else {}
        base.update({"agent": {"queued": self.agent.queued(), "keep_warm": self.agent.warm.size,
                               "max_bundle_bytes": self.agent.store.max_bytes},
                     "bundles": self.agent.store.list()})
        return base
