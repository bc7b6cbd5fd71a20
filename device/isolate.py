"""Load a model in a child process first, so a native crash is described instead of killing us.

A malformed model can make the runtime's native code crash (SIGSEGV inside
``allocate_tensors``) or abort, and no Python ``except`` catches that. The
probe loads the model the way a run would (same backend, delegate and
threads), sets zero inputs, invokes once and releases the interpreter, in a
``python -m edgepipe.device.isolate`` child that reports each stage before it
starts on a private pipe. If the child dies by a signal, the last stage it
announced is where the runtime crashed.

:func:`probe_model` returns a :class:`ProbeResult`; :func:`crash_reason`
words a crash as one line; :func:`keep_fault_reports` keeps Python's
``faulthandler`` writing to the real stderr even while the loader redirects
fd 2 to collect the runtime's chatter.
"""
from __future__ import annotations

import faulthandler
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import IO, Optional

from edgepipe.device.errors import EdgepipeError, one_line

PROBE_TIMEOUT_S = 120.0  # a big model on a small board loads in seconds; this only stops a hung runtime
MESSAGE_LIMIT = 64 << 10  # bytes read from the child's pipe and stderr
_EXPECTED_EXIT = 3  # the child's status for "the runtime refused the model" (it sent the reason)
_FAULT_FILE: Optional[IO] = None


@dataclass(frozen=True)
class ProbeResult:
    """What loading a model in a child process showed.

    ``stage`` is the :class:`edgepipe.device.runtime.Stage` value the child was
    in when it failed (None when ``ok``); ``signal`` the name of the signal
    that killed it ("SIGSEGV"), None when it exited; ``reason`` a one-line
    description of the failure; ``expected`` is True when the runtime refused
    the model with an error (no crash), so the same error happens in-process.
    """

    ok: bool
    stage: Optional[str] = None
    signal: Optional[str] = None
    reason: Optional[str] = None
    expected: bool = False
    backend: Optional[str] = None
    version: Optional[str] = None
    exit_status: Optional[int] = None
    elapsed_ms: float = 0.0
    fault_log: str = ""  # the child's stderr (faulthandler dump, runtime messages), bounded

    @property
    def crashed(self) -> bool:
        """The child died by a signal, hung, or exited without saying why."""
        return not self.ok and not self.expected


class ModelCrashError(EdgepipeError):
    """The model crashes (or hangs) the runtime; probing it in a child process kept us alive."""

    def __init__(self, model: str, result: ProbeResult):
        self.model, self.result = model, result
        super().__init__(f"{model} {crash_reason(result)}")


class ModelRefusedError(EdgepipeError):
    """The runtime refused the model in the probe with an error of its own (the message is the child's)."""


def crash_reason(result: ProbeResult) -> str:
    """``crashed the runtime with SIGSEGV while allocating tensors: the model is malformed or unsupported
    by ai_edge_litert 2.3.0`` (one line, no model name) for a failed probe."""
    runtime = " ".join(x for x in (result.backend, result.version) if x) or "this runtime"
    stage = result.stage or "starting"
    if result.expected:
        return f"failed while {stage}: {result.reason}"
    if result.signal:
        how = f"crashed the runtime with {result.signal}"
    elif result.reason:
        how = result.reason
    else:
        how = f"made the runtime exit with status {result.exit_status}"
    return f"{how} while {stage}: the model is malformed or unsupported by {runtime}"


def keep_fault_reports() -> None:
    """Send Python's fault dump (on SIGSEGV, SIGABRT, ...) to a copy of the current stderr.

    The loader points fd 2 at a temporary file while the runtime builds the
    interpreter; ``faulthandler`` writing to fd 2 would then be lost with it.
    Safe to call more than once.
    """
    global _FAULT_FILE
    if _FAULT_FILE is not None:
        return
    try:
        sys.stderr.flush()
        _FAULT_FILE = os.fdopen(os.dup(2), "w")
    except (OSError, ValueError):  # no real fd 2 (embedded interpreters, some test runners)
        return
    faulthandler.enable(file=_FAULT_FILE, all_threads=False)


def probe_model(model_path: os.PathLike, *, backend: Optional[str] = None, delegate: str = "cpu",
                threads: Optional[int] = None, edgetpu_device: Optional[str] = None,
                timeout_s: float = PROBE_TIMEOUT_S) -> ProbeResult:
    """Load, allocate, invoke once and release ``model_path`` in a child process; never raises for the model.

    Costs one interpreter start plus one model load (~0.25 s for a small
    model on a desktop CPU).
    """
    t0 = time.monotonic()
    if "/" in delegate or os.sep in delegate:  # a delegate library given by (maybe relative) path
        delegate = os.path.abspath(delegate)
    args = {"path": os.path.abspath(model_path), "backend": backend, "delegate": delegate, "threads": threads,
            "edgetpu_device": edgetpu_device}
    read_fd, write_fd = os.pipe()
    # An empty working directory: `python -m` puts it first on sys.path, where a
    # user's own `edgepipe/` folder would otherwise shadow the installed package.
    with tempfile.TemporaryFile() as err, tempfile.TemporaryDirectory(prefix="edgerun-probe-") as cwd:
        try:
            proc = subprocess.Popen([sys.executable, "-m", "edgepipe.device.isolate", str(write_fd),
                                     json.dumps(args)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=err, pass_fds=(write_fd,), env=_child_env(), cwd=cwd)
        finally:
            os.close(write_fd)
        with os.fdopen(read_fd, "rb") as pipe:
            messages, timed_out = _read_messages(pipe, proc, timeout_s)
        err.seek(0)
        fault_log = err.read(MESSAGE_LIMIT).decode("utf-8", "replace")
    return _result(messages, proc.returncode, timed_out, timeout_s, fault_log, (time.monotonic() - t0) * 1e3)


def needs_probe(model_path: os.PathLike) -> Optional[str]:
    """Why ``model_path`` should be probed in a child before loading it here, or None.

    A model the structural check refuses needs no probe (loading refuses it
    cleanly); one it passes but whose graph looks wrong (see
    :func:`edgepipe.device.flatcheck.doubts`) does.
    """
    from edgepipe.device.flatcheck import problem
    from edgepipe.device.graphcheck import doubts

    try:
        with open(model_path, "rb") as f:
            data = f.read()
    except OSError:
        return None  # loading says what is wrong with the file
    if len(data) < 8 or problem(data):
        return None
    found = doubts(data)
    return found[0] if found else None


def preflight(model_path: os.PathLike, *, isolate: Optional[bool] = None, backend: Optional[str] = None,
              delegate: str = "cpu", threads: Optional[int] = None,
              edgetpu_device: Optional[str] = None) -> Optional[ProbeResult]:
    """Probe ``model_path`` in a child when asked (``isolate`` True), or when it looks malformed (None).

    Returns the probe's result when one ran and passed; raises
    :class:`ModelCrashError` when the model crashed or hung the child and
    :class:`ModelRefusedError` when the runtime refused it with an error.
    """
    if isolate is False or (isolate is None and needs_probe(model_path) is None):
        return None
    result = probe_model(model_path, backend=backend, delegate=delegate, threads=threads,
                         edgetpu_device=edgetpu_device)
    if result.ok:
        return result
    if result.expected:
        raise ModelRefusedError(result.reason or f"{os.fspath(model_path)}: failed while {result.stage}")
    raise ModelCrashError(os.fspath(model_path), result)


def _child_env() -> dict:
    env = dict(os.environ)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    env["PYTHONFAULTHANDLER"] = "1"  # the dump lands in the captured stderr (fault_log)
    return env


def _read_messages(pipe, proc: subprocess.Popen, timeout_s: float):
    """The child's JSON lines until it closes the pipe; kills it after ``timeout_s``."""
    import selectors

    messages, buf, deadline = [], b"", time.monotonic() + timeout_s
    with selectors.DefaultSelector() as sel:
        sel.register(pipe, selectors.EVENT_READ)
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not sel.select(left):
                proc.kill()
                proc.wait()
                return messages, True
            chunk = os.read(pipe.fileno(), 4096)
            if not chunk:
                break
            buf = (buf + chunk)[-MESSAGE_LIMIT:]
            *lines, buf = buf.split(b"\n")
            messages.extend(_decode(ln) for ln in lines if ln.strip())
    try:
        proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:  # closed its pipe but hangs on exit (a destructor)
        proc.kill()
        proc.wait()
        return messages, True
    return messages, False


def _decode(line: bytes) -> dict:
    try:
        msg = json.loads(line)
    except ValueError:
        return {}
    return msg if isinstance(msg, dict) else {}


def _result(messages, status: int, timed_out: bool, timeout_s: float, fault_log: str,
            elapsed_ms: float) -> ProbeResult:
    info: dict = {}
    for m in messages:
        info.update(m)
    common = dict(stage=info.get("stage"), backend=info.get("backend"), version=info.get("version"),
                  exit_status=status, elapsed_ms=elapsed_ms, fault_log=fault_log)
    if timed_out:
        return ProbeResult(False, reason=f"did not finish within {timeout_s:g} s (the runtime hangs)", **common)
    if status == 0 and info.get("ok"):
        return ProbeResult(True, **dict(common, stage=None))
    if status < 0:
        return ProbeResult(False, signal=_signal_name(-status), **common)
    if status == _EXPECTED_EXIT and info.get("error"):
        return ProbeResult(False, reason=str(info["error"]), expected=True, **common)
    return ProbeResult(False, reason=info.get("error"), **common)


def _signal_name(num: int) -> str:
    try:
        return signal.Signals(num).name
    except ValueError:
        return f"signal {num}"


# --------------------------------------------------------------------------- the child


def _child(fd: int, args: dict) -> int:
    """Load, invoke once, release; one JSON line per stage on ``fd``; exit 0, or 3 with the reason."""
    import gc

    out = os.fdopen(fd, "w", buffering=1)

    def send(**msg) -> None:
        out.write(json.dumps(msg) + "\n")
        out.flush()

    try:
        from edgepipe.device.runtime import Stage, get_backend, load_model, model_stage

        be = get_backend(args.get("backend"))
        send(backend=be.info.name, version=be.version)
        loaded = load_model(args["path"], backend=be.info.name, delegate=args.get("delegate") or "cpu",
                            threads=args.get("threads"), edgetpu_device=args.get("edgetpu_device"),
                            quiet=False, on_stage=lambda s: send(stage=s))
        send(stage=Stage.SET_INPUTS.value)
        with model_stage(loaded.path, Stage.SET_INPUTS):
            for i, spec in enumerate(loaded.inputs):
                loaded.set_input(i, _zeros(spec))
        send(stage=Stage.FIRST_INVOKE.value)
        loaded.first_invoke()
        send(stage=Stage.RELEASE.value)
        del loaded
        gc.collect()
    except EdgepipeError as e:
        send(error=one_line(e))
        return _EXPECTED_EXIT
    except Exception as e:  # noqa: BLE001 - a bug of ours or an odd runtime error: reported, not expected
        send(error=f"{type(e).__name__}: {one_line(e)}")
        return 1
    send(ok=True)
    return 0


def _zeros(spec):
    import numpy as np

    return np.zeros(tuple(max(int(d), 1) for d in spec.shape), dtype=spec.np_dtype)


def _main(argv) -> int:
    faulthandler.enable()  # to the child's stderr, which the parent keeps as fault_log
    return _child(int(argv[0]), json.loads(argv[1]))


__all__ = ["ModelCrashError", "ModelRefusedError", "ProbeResult", "crash_reason", "keep_fault_reports",
           "needs_probe", "preflight", "probe_model"]

if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
