"""The one module that talks to a TFLite runtime.

Backend fallback (``ai_edge_litert`` -> ``tflite_runtime`` -> ``tensorflow.lite``),
delegates (CPU/XNNPACK, Edge TPU, GPU, any external delegate library), tensor
specs and quantization. Everything else in ``device/`` receives a
:class:`LoadedModel` and works on numpy arrays.

The runtime is imported lazily (inside :func:`load_model`), never at module
import time, so ``edgerun --help`` and ``edgerun info`` stay fast and this
module imports on a machine with no runtime installed at all.
"""
from __future__ import annotations

import importlib
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from edgepipe.device import delegates as _dl
from edgepipe.device.delegates import (CpuFallback, RuntimeLoadError, find_delegates,  # noqa: F401 (re-exported)
                                       parse_delegate)
from edgepipe.device.errors import NATIVE_ERRORS, EdgepipeError
from edgepipe.device.flatcheck import known_crash
from edgepipe.device.tensorspec import TensorSpec  # noqa: F401 (re-exported)
from edgepipe.device.timing import now_ns, ns_to_ms


@dataclass(frozen=True)
class BackendInfo:
    """A TFLite runtime we know how to use; a table so errors and docs agree."""

    name: str  # what --backend takes and what reports say
    package: str  # top-level import name
    module: str  # module holding Interpreter / load_delegate
    dists: Tuple[str, ...]  # distribution names for the version lookup
    pip: str  # the install command suggested to users
    aliases: Tuple[str, ...] = ()


BACKENDS: Tuple[BackendInfo, ...] = (
    BackendInfo("ai_edge_litert", "ai_edge_litert", "ai_edge_litert.interpreter",
                ("ai-edge-litert", "ai-edge-litert-nightly"), "pip install ai-edge-litert",
                ("litert", "ai-edge-litert")),
    BackendInfo("tflite_runtime", "tflite_runtime", "tflite_runtime.interpreter",
                ("tflite-runtime", "tflite_runtime"), "pip install tflite-runtime",
                ("tflite-runtime", "tflite")),
    # Last resort: the full TensorFlow wheel (heavy, but often already there).
    BackendInfo("tensorflow.lite", "tensorflow", "tensorflow",
                ("tensorflow", "tensorflow-cpu", "tf-nightly", "tensorflow-aarch64"),
                "pip install tensorflow", ("tensorflow", "tf", "tf.lite")),
)


def _backend_by_name(name: str) -> BackendInfo:
    key = name.strip().lower()
    for b in BACKENDS:
        if key == b.name or key in b.aliases:
            return b
    names = ", ".join(b.name for b in BACKENDS)
    raise RuntimeLoadError(f"unknown backend {name!r}; choose one of: {names}")


def _dist_version(b: BackendInfo) -> Optional[str]:
    from importlib import metadata

    for dist in b.dists:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


def _installed(b: BackendInfo) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(b.package) is not None
    except (ImportError, ValueError):
        return False


def available_backends() -> List[Tuple[str, Optional[str]]]:
    """``[(name, version)]`` of installed runtimes in preference order.

    Cheap: looks for the packages without importing them (importing
    TensorFlow alone takes seconds).
    """
    return [(b.name, _dist_version(b)) for b in BACKENDS if _installed(b)]


def _no_backend_message(tried: Sequence[str]) -> str:
    cmds = "; ".join(f"'{b.pip}'" for b in BACKENDS)
    detail = f" (tried: {', '.join(tried)})" if tried else ""
    return (f"no TFLite runtime is installed{detail}; install one: {cmds} "
            "(on Raspberry Pi OS with numpy<2, 'pip install tflite-runtime' is the light choice)")


@dataclass
class _Backend:
    info: BackendInfo
    version: Optional[str]
    Interpreter: Any
    load_delegate: Any


def _import_backend(b: BackendInfo) -> _Backend:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    mod = importlib.import_module(b.module)
    if b.name == "tensorflow.lite":
        lite = mod.lite
        interp, load = lite.Interpreter, lite.experimental.load_delegate
    else:
        interp, load = mod.Interpreter, mod.load_delegate
    # The package's own __version__ first: importlib.metadata costs ~10 ms at start-up.
    version = getattr(sys.modules.get(b.package), "__version__", None) or _dist_version(b)
    return _Backend(b, version, interp, load)


_BACKEND_CACHE: Dict[str, _Backend] = {}
# Python wrappers that turn num_threads=None into 1 (tflite_runtime leaves the C++ default).
DEFAULTS_TO_ONE_THREAD = ("ai_edge_litert", "tensorflow.lite")


def get_backend(name: Optional[str] = None) -> _Backend:
    """Import the named runtime, or the first one installed in preference order."""
    if name:
        b = _backend_by_name(name)
        if b.name in _BACKEND_CACHE:
            return _BACKEND_CACHE[b.name]
        try:
            be = _import_backend(b)
        except ImportError as e:
            raise RuntimeLoadError(f"backend {b.name} is not usable ({e}); install it with '{b.pip}' "
                                   "or drop --backend to use whatever is installed") from None
        _BACKEND_CACHE[b.name] = be
        return be
    tried = []
    for b in BACKENDS:
        if b.name in _BACKEND_CACHE:
            return _BACKEND_CACHE[b.name]
        if not _installed(b):
            continue
        try:
            be = _import_backend(b)
        except ImportError as e:  # installed but broken (e.g. numpy ABI mismatch): try the next
            tried.append(f"{b.name}: {e}")
            continue
        _BACKEND_CACHE[b.name] = be
        return be
    raise RuntimeLoadError(_no_backend_message(tried))


# --------------------------------------------------------------------------- stages and model failures


class Stage(str, Enum):
    """What the runtime was doing with a model, worded to follow "while"."""

    READ = "reading the model"
    DELEGATE = "loading the delegate"
    BUILD = "building the interpreter"
    ALLOCATE = "allocating tensors"
    DETAILS = "reading the tensor details"
    SET_INPUTS = "setting the inputs"
    FIRST_INVOKE = "running the first invoke"
    WARMUP = "warming up"
    INVOKE = "invoking the model"
    RELEASE = "releasing the interpreter"


class ModelRunError(EdgepipeError):
    """The runtime refused a model it had loaded (prepare, invoke, input copy); names the model and the stage."""

    def __init__(self, model: str, stage: str, reason: str):
        self.model, self.stage, self.reason = model, str(getattr(stage, "value", stage)), reason
        super().__init__(f"{model}: the runtime failed while {self.stage}: {reason}")


StageHook = Optional[Callable[[str], None]]


@contextmanager
def model_stage(model: str, stage: "Stage | str", hook: StageHook = None) -> Iterator[None]:
    """Run a block as one stage: tell ``hook`` first, turn the runtime's RuntimeError/ValueError into one line.

    Wrap whole loops, not single invokes: the timed loop must stay bare.
    """
    if hook is not None:
        hook(getattr(stage, "value", stage))
    try:
        yield
    except NATIVE_ERRORS as e:
        raise ModelRunError(model, stage, _dl._one_line(str(e)) or type(e).__name__) from None


# --------------------------------------------------------------------------- loaded model


class LoadedModel:
    """An allocated interpreter plus its tensor specs and load timings.

    ``invoke`` is the runtime's own bound method (no wrapper frame), so a
    timed loop over it measures the runtime, not us.
    """

    def __init__(self, interpreter: Any, *, path: str, backend: str, backend_version: Optional[str],
                 delegate: str, threads: Optional[int], load_ms: Dict[str, Optional[float]],
                 cpu_fallback: Optional[CpuFallback], model_size: int, delegate_library: Optional[str] = None,
                 model_content: Optional[bytes] = None):
        self.interpreter = interpreter
        self.path = path
        self.backend = backend
        self.backend_version = backend_version
        self.delegate = delegate
        self.delegate_library = delegate_library
        self.threads = threads
        self.load_ms = load_ms
        self.cpu_fallback = cpu_fallback
        self.model_size = model_size
        self._content = model_content  # the interpreter reads from this buffer: keep it alive
        self.inputs: Tuple[TensorSpec, ...] = tuple(
            TensorSpec.from_detail(d) for d in interpreter.get_input_details())
        self.outputs: Tuple[TensorSpec, ...] = tuple(
            TensorSpec.from_detail(d) for d in interpreter.get_output_details())
        self.invoke = interpreter.invoke
        self._set = interpreter.set_tensor
        self._get = interpreter.get_tensor

    def __repr__(self) -> str:
        return (f"LoadedModel({os.path.basename(self.path)!r}, backend={self.backend}, "
                f"delegate={self.delegate}, threads={self.threads})")

    def set_input(self, i: int, array: np.ndarray) -> None:
        """Copy a raw array (already this input's dtype and shape) into input ``i``."""
        self._set(self.inputs[i].index, array)

    def get_output(self, i: int) -> np.ndarray:
        """A copy of output ``i``'s raw values (quantized ints stay ints)."""
        return self._get(self.outputs[i].index)

    def predict(self, float_inputs: Sequence[Any]) -> List[np.ndarray]:
        """Run once on float inputs; returns float32 outputs (quantization handled here)."""
        if len(float_inputs) != len(self.inputs):
            raise ValueError(f"model takes {len(self.inputs)} input(s), got {len(float_inputs)}")
        for spec, x in zip(self.inputs, float_inputs):
            a = spec.quantize(x)
            if a.shape != spec.shape:
                if a.size != int(np.prod(spec.shape)):
                    raise ValueError(f"input {spec.name!r}: expected shape {spec.shape}, got {a.shape}")
                a = a.reshape(spec.shape)
            self._set(spec.index, a)
        self.invoke()
        return [spec.dequantize(self._get(spec.index)) for spec in self.outputs]

    def first_invoke(self) -> float:
        """Invoke once on the current inputs and record it as ``load_ms['first_invoke']`` (ms)."""
        with model_stage(self.path, Stage.FIRST_INVOKE):
            t0 = now_ns()
            self.invoke()
            ms = ns_to_ms(now_ns() - t0)
        self.load_ms["first_invoke"] = ms
        return ms

    def tensor_infos(self) -> tuple:
        """(inputs, outputs) as the manifest's ``TensorInfo`` tuples."""
        from edgepipe.device.bundle import TensorInfo

        return tuple(tuple(TensorInfo.from_dict(t.to_dict()) for t in ts) for ts in (self.inputs, self.outputs))

    def runtime_dict(self) -> dict:
        """The report's ``runtime`` block."""
        return {
            "backend": self.backend,
            "version": self.backend_version,
            "delegate": self.delegate,
            "threads": self.threads,
            "cpu_fallback_ops": self.cpu_fallback.cpu_ops if self.cpu_fallback else None,
        }


# --------------------------------------------------------------------------- loading


def _check_flatbuffer(path: str, data: bytes) -> None:
    """Reject files that are not sound TFLite models before native code sees them
    (some runtimes segfault on a truncated buffer instead of raising)."""
    from edgepipe.device.flatcheck import problem

    if len(data) < 16:
        raise RuntimeLoadError(f"{path}: not a TFLite model (only {len(data)} bytes)")
    if data[4:8] != b"TFL3":
        raise RuntimeLoadError(f"{path}: not a TFLite model (missing the 'TFL3' identifier; "
                               "is it a SavedModel/Keras file or a corrupt download?)")
    why = problem(data)
    if why:
        raise RuntimeLoadError(f"{path}: corrupt or truncated TFLite model ({len(data)} bytes: {why}); "
                               "copy or convert it again")


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise RuntimeLoadError(f"{path}: no such file") from None
    except OSError as e:
        raise RuntimeLoadError(f"{path}: cannot read ({e.strerror or e})") from None
    _check_flatbuffer(path, data)  # part of reading: ~1 ms per 2 MB of model
    return data


def _build(path: str, be: _Backend, plan: Any, data: bytes, threads: Optional[int], load_ms: dict,
           quiet: bool, hook: StageHook) -> Tuple[Any, Optional[list]]:
    """Delegate, interpreter and allocation (the native steps); ``(interpreter, op details)``."""
    stage = hook or (lambda s: None)
    with _dl.capture_stderr(quiet) as captured:
        stage(Stage.DELEGATE.value)
        t0 = now_ns()
        native_delegate = _dl.load(plan, be.load_delegate, captured)
        load_ms["delegate"] = ns_to_ms(now_ns() - t0) if native_delegate is not None else 0.0
        kwargs: Dict[str, Any] = {"model_content": data}
        if threads is not None:
            kwargs["num_threads"] = threads
        if native_delegate is not None:
            kwargs["experimental_delegates"] = [native_delegate]
        stage(Stage.BUILD.value)
        t0 = now_ns()
        try:
            interp = be.Interpreter(**kwargs)
            load_ms["interpreter_build"] = ns_to_ms(now_ns() - t0)
            ops = _dl.op_details(interp) if plan.kind != "cpu" else None
            stage(Stage.ALLOCATE.value)
            t0 = now_ns()
            interp.allocate_tensors()
        except NATIVE_ERRORS as e:
            raise _dl.explain_build_error(path, plan, data, e, captured.text()) from None
        load_ms["allocate"] = ns_to_ms(now_ns() - t0)
    return interp, ops


def load_model(model_path: os.PathLike, *, backend: Optional[str] = None, delegate: str = "cpu",
               threads: Optional[int] = None, edgetpu_device: Optional[str] = None,
               delegate_options: Optional[dict] = None, quiet: bool = True,
               on_stage: StageHook = None) -> LoadedModel:
    """Read, build, delegate and allocate a model; raises :class:`RuntimeLoadError`.

    ``delegate``: ``cpu`` / ``xnnpack`` (the runtime's default CPU path),
    ``edgetpu`` (optionally ``edgetpu:usb``, ``edgetpu:pci:0``...), ``gpu``, or
    a path to an external delegate library. ``load_ms`` gets file_read (read +
    structural check), interpreter_build, delegate (library load + device open), allocate;
    ``first_invoke`` is left None for the caller (it needs real inputs).
    ``on_stage`` is told each :class:`Stage` value before it starts (a crash
    probe uses it to say where the runtime died).
    """
    path = os.fspath(model_path)
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise RuntimeLoadError(f"threads must be a positive integer, got {threads!r}")
    plan = parse_delegate(delegate, edgetpu_device=edgetpu_device, options=delegate_options)
    be = get_backend(backend)
    load_ms: Dict[str, Optional[float]] = {"file_read": None, "interpreter_build": None, "delegate": None,
                                           "allocate": None, "first_invoke": None}
    if on_stage is not None:
        on_stage(Stage.READ.value)
    t0 = now_ns()
    data = _read(path)
    load_ms["file_read"] = ns_to_ms(now_ns() - t0)
    crash = known_crash(be.info.name, be.version, data)
    if crash:
        raise RuntimeLoadError(f"{path}: {crash}")
    interp, ops = _build(path, be, plan, data, threads, load_ms, quiet, on_stage)
    fallback = _dl.cpu_fallback(ops, plan, data)
    if threads is None and be.info.name in DEFAULTS_TO_ONE_THREAD:
        threads = 1  # report what ran: these wrappers pass num_threads=1 when given None
    with model_stage(path, Stage.DETAILS, on_stage):
        return LoadedModel(interp, path=path, backend=be.info.name, backend_version=be.version,
                           delegate=plan.label, threads=threads, load_ms=load_ms, cpu_fallback=fallback,
                           model_size=len(data), delegate_library=plan.library, model_content=data)


def backend_pip_commands() -> List[str]:
    """The install command for each supported runtime (for help texts and errors)."""
    return [b.pip for b in BACKENDS]


__all__ = [
    "BACKENDS", "BackendInfo", "CpuFallback", "LoadedModel", "ModelRunError", "RuntimeLoadError", "Stage",
    "TensorSpec", "available_backends", "backend_pip_commands", "find_delegates", "get_backend", "load_model",
    "model_stage", "parse_delegate",
]

# Platform used by the delegate tables; exposed for tests.
PLATFORM = sys.platform
