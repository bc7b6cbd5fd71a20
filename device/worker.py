"""The agent's job worker: a child process that loads models and runs jobs.

A malformed model can crash the native runtime (SIGSEGV inside
``allocate_tensors``) or hang it; running jobs in a child keeps that away
from the agent. The child keeps loaded interpreters warm between jobs and
tells the parent which stage it is in before each step, so a crash, a timeout
or a cancel can be described ("crashed with SIGSEGV while allocating
tensors") and the worker replaced without losing the agent.

Child -> parent messages (tuples): ``("stage", text)``, ``("backend", name,
version)``, ``("done", report)``, ``("failed", reason, expected, traceback)``.
Parent -> child: a :class:`JobRequest`, or None to exit.
"""
from __future__ import annotations

import collections
import faulthandler
import multiprocessing
import os
import re
import signal
import threading
import time
import traceback
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Callable, Optional

from edgepipe.device.errors import EdgepipeError, one_line

# Stages of our own, worded like edgepipe.device.runtime.Stage (which names the load stages)
# to follow "while" in a failed job's reason.
READING_BUNDLE = "reading the bundle"
FIRST_INVOKE = "running the first invoke"
STARTING = "starting the worker"
KIND_STAGE = {"bench": "running the benchmark", "run": "running over the source",
              "evaluate": "running the evaluation"}
_FRAME_RE = re.compile(r'^\s*File "(?P<file>[^"]+)", line (?P<line>\d+) in (?P<func>\S+)')
FAULT_DUMP_LIMIT = 64 << 10


@dataclass(frozen=True)
class JobRequest:
    """What the worker needs to run one job (picklable)."""

    id: str
    kind: str
    bundle: str
    bundle_dir: str
    params: dict


class Result(str, Enum):
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


# Signals a process raises on itself when native code goes wrong (others come from outside).
NATIVE_CRASH_SIGNALS = ("SIGSEGV", "SIGBUS", "SIGILL", "SIGFPE", "SIGABRT", "SIGSYS", "SIGTRAP")


@dataclass(frozen=True)
class Crash:
    """How the worker died during a job."""

    signal: Optional[str]  # "SIGSEGV"; None when it exited with a status instead
    exit_status: Optional[int]
    stage: str
    where: Optional[str] = None  # "runtime.py:385 load_model" from the fault dump

    @property
    def by_the_model(self) -> bool:
        """The runtime crashed or exited on its own (not killed from outside, e.g. by the OOM killer)."""
        return self.signal is None or self.signal in NATIVE_CRASH_SIGNALS


@dataclass(frozen=True)
class Outcome:
    """The end of one job as the parent saw it."""

    result: Result
    report: Optional[dict] = None
    error: Optional[str] = None
    expected: bool = True  # False: a bug in edgepipe (traceback logged)
    traceback: Optional[str] = None
    crash: Optional[Crash] = None
    timed_out: bool = False


# --------------------------------------------------------------------------- the child


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


def load_for(bundle_dir: Path, params: dict, stage: Callable[[str], None], tell_backend: Callable) -> object:
    """Load the model a job needs, the way `edgerun bench` would, naming each stage."""
    from edgepipe.device.bench import model_for
    from edgepipe.device.bundle import load_bundle
    from edgepipe.device.runtime import get_backend, load_model

    stage(READING_BUNDLE)
    b = load_bundle(bundle_dir)
    delegate = params.get("delegate") or "cpu"
    be = get_backend(params.get("backend"))
    tell_backend(be.info.name, be.version)
    return load_model(model_for(b, delegate), backend=be.info.name, delegate=delegate,
                      threads=params.get("threads"), on_stage=stage)


def execute_job(kind: str, bundle_dir: Path, params: dict, loaded) -> dict:
    """Run one job with an already-loaded model; returns the report."""
    if kind == "bench":  # latency (warm model, optional per-op profile) or throughput (its own streams)
        from edgepipe.device.throughput import bench_job
        return bench_job(bundle_dir, params, loaded)
    if kind == "evaluate":  # the host's preprocessed inputs through the board's runtime
        from edgepipe.device.evaluate_job import evaluate_job
        return evaluate_job(bundle_dir, params, loaded)
    from edgepipe.device.runner import run_source
    kw = {k: params[k] for k in ("pipeline", "max_frames") if k in params}
    return run_source(bundle_dir, params["source"], threads=params.get("threads"),
                      delegate=params.get("delegate") or "cpu", loaded=loaded, **kw)


def run_request(req: JobRequest, warm: WarmCache, stage: Callable[[str], None],
                tell_backend: Callable) -> dict:
    """Load (or reuse) the model and run the job; returns the report with agent fields."""
    bundle_dir, p = Path(req.bundle_dir), req.params
    key = (req.bundle, p.get("backend"), p.get("delegate") or "cpu", p.get("threads"))
    loaded, warm_hit = warm.get(key, lambda: load_for(bundle_dir, p, stage, tell_backend))
    tell_backend(getattr(loaded, "backend", None), getattr(loaded, "backend_version", None))
    try:
        if not warm_hit:
            # The executor sees a pre-loaded model and skips the first-invoke
            # timing; its cost (weight packing, delegate preparation) does not
            # depend on the input values.
            stage(FIRST_INVOKE)
            loaded.first_invoke()
        stage(KIND_STAGE[req.kind])
        report = execute_job(req.kind, bundle_dir, p, loaded)
    except BaseException:
        warm.drop(key)  # an interpreter in an unknown state is not reused
        raise
    report.setdefault("runtime", {})["load"] = "warm" if warm_hit else "cold"
    if not warm_hit and getattr(loaded, "load_ms", None):
        report["load_ms"] = dict(loaded.load_ms)
    elif warm_hit:
        report["load_ms"] = None  # it was paid by an earlier job, reported there
    settings = report.get("settings") or {}
    settings.update({"agent_job": req.id, "bundle_tar_sha256": req.bundle})
    report["settings"] = settings
    return report


def worker_main(conn, alive, keep_warm: int, fault_path: str) -> None:
    """The child's loop: one job at a time until None or the agent goes away.

    ``alive`` is a pipe the agent never writes to: it reads EOF when the agent
    dies, even while a job keeps this process busy, and then the worker exits
    rather than finishing a job nobody will ask about.
    """
    # Ctrl-C in a terminal and systemd's SIGTERM reach the whole process group
    # or cgroup; the agent decides when its worker stops (and its job with it).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    threading.Thread(target=_exit_with_agent, args=(alive,), name="agent-watch", daemon=True).start()
    fault = open(fault_path, "w")  # kept open for the life of the process
    faulthandler.enable(file=fault, all_threads=False)
    _preload_backend()
    warm = WarmCache(keep_warm)
    while True:
        try:
            req = conn.recv()
            if req is None:
                return
            _serve(conn, warm, req)
        except (EOFError, OSError):  # the agent went away
            return


def _exit_with_agent(alive) -> None:
    try:
        alive.poll(None)  # returns at EOF: the agent closed its end or died
    except (OSError, EOFError):
        pass
    os._exit(0)


def _preload_backend() -> None:
    """Import the runtime while idle so the first job after a restart does not pay for it."""
    try:
        from edgepipe.device.runtime import get_backend
        get_backend(None)
    except Exception:  # noqa: BLE001 - the job that needs it reports why it is missing
        pass


def _serve(conn, warm: WarmCache, req: JobRequest) -> None:
    def stage(text: str) -> None:
        conn.send(("stage", text))

    def tell_backend(name, version) -> None:
        conn.send(("backend", name, version))

    try:
        report = run_request(req, warm, stage, tell_backend)
    except EdgepipeError as e:
        conn.send(("failed", one_line(e), True, None))
    except Exception as e:  # a bug: the parent logs the traceback, the job fails
        conn.send(("failed", f"{type(e).__name__}: {one_line(e)}", False, traceback.format_exc()))
    else:
        conn.send(("done", report))


# --------------------------------------------------------------------------- the parent side


def default_context():
    """forkserver where available: a restarted worker is forked from a warm, single-threaded server."""
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
    if ctx.get_start_method() == "forkserver":
        # Missing modules are skipped: only the runtime installed here gets imported.
        ctx.set_forkserver_preload(["edgepipe.device.worker", "edgepipe.device.bench", "edgepipe.device.runner",
                                    "edgepipe.device.runtime", "ai_edge_litert.interpreter",
                                    "tflite_runtime.interpreter"])
    return ctx


class WorkerHandle:
    """The parent's side of one worker process; replaced after a crash, timeout or cancel."""

    def __init__(self, fault_path: Path, *, keep_warm: int = 2, context=None):
        self.fault_path = Path(fault_path)
        self.keep_warm = keep_warm
        self._ctx = context or default_context()
        self._proc = None
        self._conn = None
        self._alive = None  # our end of the worker's liveness pipe; never written
        self.restarts = 0  # workers replaced after a crash, timeout or cancel

    @property
    def pid(self) -> Optional[int]:
        return self._proc.pid if self._proc is not None and self._proc.is_alive() else None

    def start(self) -> None:
        """Start a worker unless one is alive."""
        if self._proc is not None and self._proc.is_alive():
            return
        self._discard()
        parent, child = self._ctx.Pipe()
        alive_r, alive_w = self._ctx.Pipe(duplex=False)
        proc = self._ctx.Process(target=worker_main, args=(child, alive_r, self.keep_warm, str(self.fault_path)),
                                 name="edgerun-job-worker", daemon=True)
        proc.start()
        child.close()
        alive_r.close()
        self._proc, self._conn, self._alive = proc, parent, alive_w

    def stop(self, timeout: float = 5.0) -> None:
        """Ask the worker to exit; kill it if it does not."""
        if self._proc is None:
            return
        try:
            self._conn.send(None)
        except (OSError, EOFError):
            pass
        self._proc.join(timeout)
        self.kill()

    def kill(self) -> None:
        if self._proc is not None and self._proc.is_alive():
            self._proc.kill()
            self._proc.join(10)
        self._discard()

    def _discard(self) -> None:
        for c in (self._conn, self._alive):
            if c is not None:
                c.close()
        self._proc, self._conn, self._alive = None, None, None

    def run(self, req: JobRequest, *, timeout: float, cancelled: Callable[[], bool],
            on_stage: Callable[[str], None] = lambda s: None) -> Outcome:
        """Run ``req`` in the worker; never raises for anything the job does."""
        self._send(req)
        stage, backend = STARTING, None
        deadline = time.monotonic() + timeout
        while True:
            if cancelled():  # the next job starts a new worker (none at all when the agent is stopping)
                self.kill()
                self.restarts += 1
                return Outcome(Result.CANCELLED, error=f"cancelled while {stage}")
            left = deadline - time.monotonic()
            if left <= 0:
                self._replace()
                return Outcome(Result.FAILED, timed_out=True,
                               error=f"timed out after {timeout:g} s while {stage}; the worker was restarted")
            try:
                if not self._conn.poll(min(left, 0.2)):
                    continue
                msg = self._conn.recv()
            except (EOFError, OSError):
                return self._crashed(stage, backend)
            if msg[0] == "stage":
                stage = msg[1]
                on_stage(stage)
            elif msg[0] == "backend":
                backend = msg[1:] if msg[1] else backend
            elif msg[0] == "done":
                return Outcome(Result.DONE, report=msg[1])
            else:
                _, reason, expected, tb = msg
                return Outcome(Result.FAILED, error=reason, expected=expected, traceback=tb)

    def _send(self, req: JobRequest) -> None:
        for attempt in (1, 2):  # a worker that died while idle is replaced once
            self.start()
            try:
                self._conn.send(req)
                return
            except (OSError, EOFError):
                if attempt == 2:
                    raise
                self._replace()

    def _replace(self) -> None:
        self.kill()
        self.restarts += 1
        self.start()

    def _crashed(self, stage: str, backend) -> Outcome:
        proc = self._proc
        proc.join(10)
        code = proc.exitcode
        sig = _signal_name(-code) if code is not None and code < 0 else None
        crash = Crash(signal=sig, exit_status=None if sig else code, stage=stage,
                      where=_fault_frame(self.fault_path))
        self._replace()
        return Outcome(Result.FAILED, error=crash_reason(crash, backend), crash=crash)


def crash_reason(crash: Crash, backend=None) -> str:
    """One line: how the worker died, in which stage, and what it most likely means."""
    runtime = " ".join(str(x) for x in backend if x) if backend else "the runtime"
    if not crash.by_the_model:
        hint = " (out of memory? the kernel's OOM killer sends SIGKILL)" if crash.signal == "SIGKILL" else ""
        return f"the worker was killed by {crash.signal} while {crash.stage}{hint}"
    how = f"crashed with {crash.signal}" if crash.signal else f"the worker exited with status {crash.exit_status}"
    return f"{how} while {crash.stage}: the model is malformed or unsupported by {runtime}"


def _signal_name(num: int) -> str:
    try:
        return signal.Signals(num).name
    except ValueError:
        return f"signal {num}"


def _fault_frame(path: Path) -> Optional[str]:
    """``interpreter.py:575 allocate_tensors``: the innermost frame of the worker's faulthandler dump."""
    try:
        with open(path, "r", encoding="utf-8", errors="replace") as f:
            text = f.read(FAULT_DUMP_LIMIT)
    except OSError:
        return None
    for m in map(_FRAME_RE.match, text.splitlines()):
        if m:
            return f"{os.path.basename(m['file'])}:{m['line']} {m['func']}"
    return None


__all__ = ["NATIVE_CRASH_SIGNALS", "Crash", "JobRequest", "Outcome", "Result", "WarmCache", "WorkerHandle", "crash_reason",
           "default_context", "execute_job", "load_for", "run_request", "worker_main"]
