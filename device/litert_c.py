"""A ctypes binding to LiteRT's C API (``libLiteRt.so`` in the ``ai_edge_litert`` wheel), for its profiler.

The Python ``Interpreter`` exposes no profiler and the Python ``CompiledModel``
hides its native handle, but the wheel's ``libLiteRt.so`` exports the C
CompiledModel API with ``LiteRtCompiledModelGetProfiler`` and friends. This
module builds a compiled model through that C API with profiling enabled in
the runtime options, feeds it host arrays and reads the profiler's events.

Part of the runtime layer (with :mod:`edgepipe.device.runtime` and
:mod:`edgepipe.device.profiler`): nothing else loads native runtime code.
Nothing is loaded at import time.
"""
from __future__ import annotations

import ctypes as C
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from edgepipe.device.errors import EdgepipeError

_VP = C.c_void_p
_HW_CPU = 1  # kLiteRtHwAcceleratorCpu
_LOCK_WRITE = 1  # kLiteRtTensorBufferLockModeWrite
# Opaque option identifiers and their TOML payloads, as LiteRT's own option builders write them.
RUNTIME_OPTIONS_ID = b"runtime_options_string"
CPU_OPTIONS_ID = b"xnnpack"


class LiteRtCError(EdgepipeError):
    """The LiteRT C API is missing or refused a call; one line naming the call."""


class _Layout(C.Structure):
    """``LiteRtLayout`` (litert/c/litert_layout.h, ABI stable: 68 bytes)."""

    _fields_ = [("rank", C.c_uint, 7), ("has_strides", C.c_uint, 1), ("dims", C.c_int32 * 8),
                ("strides", C.c_uint32 * 8)]


class _TensorType(C.Structure):
    """``LiteRtRankedTensorType`` (litert/c/litert_model_types.h, ABI stable: 72 bytes)."""

    _fields_ = [("element_type", C.c_int), ("layout", _Layout)]


class _MemUsage(C.Structure):
    _fields_ = [("total_allocated", C.c_size_t), ("in_use_allocated", C.c_size_t), ("private_footprint", C.c_size_t)]


class _Event(C.Structure):
    """``ProfiledEventData`` (litert/c/litert_profiler_event.h)."""

    _fields_ = [("tag", C.c_char_p), ("event_type", C.c_int), ("start_us", C.c_uint64), ("elapsed_us", C.c_uint64),
                ("begin_mem", _MemUsage), ("end_mem", _MemUsage), ("metadata1", C.c_uint64),
                ("metadata2", C.c_uint64), ("source", C.c_int)]


@dataclass(frozen=True)
class Event:
    """One profiler event: what ran (tag), its kind (LiteRtProfilerEventType bit), microseconds, metadata."""

    tag: str
    kind: int
    start_us: int
    elapsed_us: int
    metadata1: int
    source: int


# name -> (restype, argtypes); LiteRtStatus is an int (0 = ok)
_SIGNATURES: Dict[str, Tuple[object, tuple]] = {
    "LiteRtCreateEnvironment": (C.c_int, (C.c_int, _VP, C.POINTER(_VP))),
    "LiteRtDestroyEnvironment": (None, (_VP,)),
    "LiteRtCreateModelFromBuffer": (C.c_int, (_VP, _VP, C.c_size_t, C.POINTER(_VP))),
    "LiteRtDestroyModel": (None, (_VP,)),
    "LiteRtCreateOptions": (C.c_int, (C.POINTER(_VP),)),
    "LiteRtDestroyOptions": (None, (_VP,)),
    "LiteRtSetOptionsHardwareAccelerators": (C.c_int, (_VP, C.c_int)),
    "LiteRtCreateOpaqueOptions": (C.c_int, (C.c_char_p, _VP, _VP, C.POINTER(_VP))),
    "LiteRtAddOpaqueOptions": (C.c_int, (_VP, _VP)),
    "LiteRtCreateCompiledModel": (C.c_int, (_VP, _VP, _VP, C.POINTER(_VP))),
    "LiteRtDestroyCompiledModel": (None, (_VP,)),
    "LiteRtGetModelSignature": (C.c_int, (_VP, C.c_size_t, C.POINTER(_VP))),
    "LiteRtGetNumSignatureInputs": (C.c_int, (_VP, C.POINTER(C.c_size_t))),
    "LiteRtGetNumSignatureOutputs": (C.c_int, (_VP, C.POINTER(C.c_size_t))),
    "LiteRtGetSignatureInputTensorByIndex": (C.c_int, (_VP, C.c_size_t, C.POINTER(_VP))),
    "LiteRtGetSignatureOutputTensorByIndex": (C.c_int, (_VP, C.c_size_t, C.POINTER(_VP))),
    "LiteRtGetTensorName": (C.c_int, (_VP, C.POINTER(C.c_char_p))),
    "LiteRtGetRankedTensorType": (C.c_int, (_VP, C.POINTER(_TensorType))),
    "LiteRtCompiledModelResizeInputTensor": (C.c_int, (_VP, C.c_size_t, C.c_size_t, C.POINTER(C.c_int),
                                                       C.c_size_t)),
    "LiteRtGetCompiledModelInputBufferRequirements": (C.c_int, (_VP, C.c_size_t, C.c_size_t, C.POINTER(_VP))),
    "LiteRtGetCompiledModelOutputBufferRequirements": (C.c_int, (_VP, C.c_size_t, C.c_size_t, C.POINTER(_VP))),
    "LiteRtCreateManagedTensorBufferFromRequirements": (C.c_int, (_VP, C.POINTER(_TensorType), _VP,
                                                                  C.POINTER(_VP))),
    "LiteRtDestroyTensorBuffer": (None, (_VP,)),
    "LiteRtGetTensorBufferSize": (C.c_int, (_VP, C.POINTER(C.c_size_t))),
    "LiteRtLockTensorBuffer": (C.c_int, (_VP, C.POINTER(_VP), C.c_int)),
    "LiteRtUnlockTensorBuffer": (C.c_int, (_VP,)),
    "LiteRtRunCompiledModel": (C.c_int, (_VP, C.c_size_t, C.c_size_t, C.POINTER(_VP), C.c_size_t, C.POINTER(_VP))),
    "LiteRtCompiledModelGetProfiler": (C.c_int, (_VP, C.POINTER(_VP))),
    "LiteRtStartProfiler": (C.c_int, (_VP,)),
    "LiteRtStopProfiler": (C.c_int, (_VP,)),
    "LiteRtResetProfiler": (C.c_int, (_VP,)),
    "LiteRtGetNumProfilerEvents": (C.c_int, (_VP, C.POINTER(C.c_int))),
    "LiteRtGetProfilerEvents": (C.c_int, (_VP, C.c_int, C.POINTER(_Event))),
}
_DESTRUCTOR = C.CFUNCTYPE(None, _VP)
_KEEP_PAYLOAD = _DESTRUCTOR(lambda _p: None)  # payloads are Python-owned buffers kept on the model object


def library_path() -> Optional[str]:
    """``libLiteRt.so`` inside the installed ``ai_edge_litert`` package, or None (found without importing it)."""
    import importlib.util

    try:
        spec = importlib.util.find_spec("ai_edge_litert")
    except (ImportError, ValueError):
        return None
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(folder, "libLiteRt.so")
        if os.path.isfile(path):
            return path
    return None


_LIB: Optional[C.CDLL] = None


def library() -> C.CDLL:
    """The loaded library with every function we call typed; raises :class:`LiteRtCError` when unusable."""
    global _LIB
    if _LIB is not None:
        return _LIB
    path = library_path()
    if path is None:
        raise LiteRtCError("LiteRT's C library (libLiteRt.so from ai-edge-litert) is not installed")
    try:
        lib = C.CDLL(path)
    except OSError as e:
        raise LiteRtCError(f"cannot load {path}: {e}") from None
    missing = [name for name in _SIGNATURES if not hasattr(lib, name)]
    if missing:
        raise LiteRtCError(f"{os.path.basename(path)} lacks {', '.join(missing[:3])}: this LiteRT has no C profiler")
    for name, (res, args) in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = res, list(args)
    _LIB = lib
    return lib


def _shape_for(shapes: Sequence, name: str, i: int) -> Optional[tuple]:
    """``shapes`` holds ``(tensor name, shape)`` pairs in the interpreter's order."""
    for n, shape in shapes:
        if n == name:
            return tuple(shape)
    return tuple(shapes[i][1]) if i < len(shapes) else None


def _check(status: int, call: str) -> None:
    if status != 0:
        raise LiteRtCError(f"LiteRT refused {call} (status {status})")


class CompiledModel:
    """A LiteRT compiled model on the CPU accelerator (XNNPACK + builtin kernels), optionally with its profiler.

    Not thread-safe; :meth:`close` (or ``with``) frees the native objects.
    """

    def __init__(self, data: bytes, *, threads: Optional[int] = None, profiling: bool = True,
                 input_shapes: Sequence = (), output_shapes: Sequence = ()):
        self._lib = library()
        self._data = C.create_string_buffer(data, len(data))  # the model reads from this buffer: keep it
        self._payloads: List[C.Array] = []
        self._env, self._model, self._opts, self._cm = _VP(), _VP(), _VP(), _VP()
        self._ins: List[_VP] = []
        self._outs: List[_VP] = []
        self.input_names: List[str] = []
        try:
            self._build(threads, profiling, input_shapes, output_shapes)
        except BaseException:
            self.close()
            raise

    def _build(self, threads: Optional[int], profiling: bool, in_shapes: Sequence, out_shapes: Sequence) -> None:
        lib = self._lib
        _check(lib.LiteRtCreateEnvironment(0, None, C.byref(self._env)), "creating the environment")
        _check(lib.LiteRtCreateModelFromBuffer(self._env, C.cast(self._data, _VP), len(self._data),
                                               C.byref(self._model)), "reading the model")
        _check(lib.LiteRtCreateOptions(C.byref(self._opts)), "creating options")
        _check(lib.LiteRtSetOptionsHardwareAccelerators(self._opts, _HW_CPU), "choosing the CPU accelerator")
        if profiling:
            self._add_opaque(RUNTIME_OPTIONS_ID, "enable_profiling = true\n")
        if threads:
            self._add_opaque(CPU_OPTIONS_ID, f"num_threads = {int(threads)}\n")
        _check(lib.LiteRtCreateCompiledModel(self._env, self._model, self._opts, C.byref(self._cm)),
               "compiling the model")
        sig = _VP()
        _check(lib.LiteRtGetModelSignature(self._model, 0, C.byref(sig)), "reading the model's signature")
        self._ins, self.input_names = self._buffers(sig, "Input", in_shapes)
        self._outs, _ = self._buffers(sig, "Output", out_shapes)
        self._in_arr = (_VP * len(self._ins))(*self._ins)
        self._out_arr = (_VP * len(self._outs))(*self._outs)

    def _add_opaque(self, ident: bytes, toml: str) -> None:
        payload = C.create_string_buffer(toml.encode())
        self._payloads.append(payload)
        opaque = _VP()
        _check(self._lib.LiteRtCreateOpaqueOptions(ident, C.cast(payload, _VP), C.cast(_KEEP_PAYLOAD, _VP),
                                                   C.byref(opaque)), "creating options")
        _check(self._lib.LiteRtAddOpaqueOptions(self._opts, opaque), "adding options")  # options own it now

    def _buffers(self, sig: _VP, side: str, shapes: Sequence) -> Tuple[List[_VP], List[str]]:
        """One managed host buffer per signature input/output, in signature order, with tensor names.

        Dynamic dimensions (a Keras batch of -1) take the shape the interpreter
        allocated (``shapes``: by tensor name, else by position); inputs are
        resized to it first so the outputs follow.
        """
        lib, low = self._lib, side.lower()
        n = C.c_size_t()
        _check(getattr(lib, f"LiteRtGetNumSignature{side}s")(sig, C.byref(n)), f"counting {low}s")
        bufs, names = [], []
        for i in range(n.value):
            tensor, name, ttype = _VP(), C.c_char_p(), _TensorType()
            get = getattr(lib, f"LiteRtGetSignature{side}TensorByIndex")
            _check(get(sig, i, C.byref(tensor)), f"reading {low} {i}")
            _check(lib.LiteRtGetTensorName(tensor, C.byref(name)), f"naming {low} {i}")
            _check(lib.LiteRtGetRankedTensorType(tensor, C.byref(ttype)), f"typing {low} {i}")
            names.append((name.value or b"").decode("utf-8", "replace"))
            self._fix_dynamic(ttype, _shape_for(shapes, names[-1], i), side, i)
            req, buf = _VP(), _VP()
            _check(getattr(lib, f"LiteRtGetCompiledModel{side}BufferRequirements")(self._cm, 0, i, C.byref(req)),
                   f"sizing {low} {i}")
            _check(lib.LiteRtCreateManagedTensorBufferFromRequirements(self._env, C.byref(ttype), req, C.byref(buf)),
                   f"allocating {low} {i}")
            bufs.append(buf)
        return bufs, names

    def _fix_dynamic(self, ttype: _TensorType, shape: Optional[tuple], side: str, i: int) -> None:
        lay = ttype.layout
        dims = [int(lay.dims[k]) for k in range(lay.rank)]
        if all(d >= 0 for d in dims):
            return
        if shape is None or len(shape) != len(dims):
            raise LiteRtCError(f"{side.lower()} {i} has dynamic dimensions {dims} and no concrete shape to use")
        for k, d in enumerate(shape):
            lay.dims[k] = int(d)
        if side == "Input":
            arr = (C.c_int * len(shape))(*[int(d) for d in shape])
            _check(self._lib.LiteRtCompiledModelResizeInputTensor(self._cm, 0, i, arr, len(shape)),
                   f"resizing input {i} to {tuple(shape)}")

    def set_inputs(self, arrays: Sequence[np.ndarray], names: Sequence[str] = ()) -> None:
        """Copy raw arrays into the inputs; matched by tensor name when ``names`` are given, else by position."""
        by_name = dict(zip(names, arrays))
        for i, buf in enumerate(self._ins):
            a = by_name.get(self.input_names[i])
            if a is None:
                a = arrays[i] if i < len(arrays) else None
            if a is not None:
                self._write(buf, np.ascontiguousarray(a), i)

    def _write(self, buf: _VP, a: np.ndarray, i: int) -> None:
        lib, size, addr = self._lib, C.c_size_t(), _VP()
        _check(lib.LiteRtGetTensorBufferSize(buf, C.byref(size)), f"sizing input {i}")
        if a.nbytes != size.value:
            raise LiteRtCError(f"input {i}: {a.nbytes} bytes given, the compiled model takes {size.value}")
        _check(lib.LiteRtLockTensorBuffer(buf, C.byref(addr), _LOCK_WRITE), f"writing input {i}")
        try:
            C.memmove(addr.value, a.ctypes.data, a.nbytes)
        finally:
            _check(lib.LiteRtUnlockTensorBuffer(buf), f"writing input {i}")

    def run(self) -> None:
        """One synchronous inference on the current inputs."""
        _check(self._lib.LiteRtRunCompiledModel(self._cm, 0, len(self._ins), self._in_arr, len(self._outs),
                                                self._out_arr), "running the model")

    def profiler(self) -> "Profiler":
        """The compiled model's own profiler (present only when built with ``profiling=True``)."""
        prof = _VP()
        _check(self._lib.LiteRtCompiledModelGetProfiler(self._cm, C.byref(prof)), "getting the profiler")
        if not prof.value:
            raise LiteRtCError("the compiled model has no profiler (profiling was not enabled)")
        return Profiler(self._lib, prof, self)

    def close(self) -> None:
        """Free buffers, compiled model, options, model and environment (idempotent)."""
        lib = self._lib
        for buf in self._ins + self._outs:
            lib.LiteRtDestroyTensorBuffer(buf)
        self._ins, self._outs = [], []
        for handle, free in ((self._cm, "LiteRtDestroyCompiledModel"), (self._opts, "LiteRtDestroyOptions"),
                             (self._model, "LiteRtDestroyModel"), (self._env, "LiteRtDestroyEnvironment")):
            if handle.value:
                getattr(lib, free)(handle)
                handle.value = None

    def __enter__(self) -> "CompiledModel":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Profiler:
    """A compiled model's profiler: start, stop, reset and read events (owned by the compiled model)."""

    def __init__(self, lib: C.CDLL, handle: _VP, owner: CompiledModel):
        self._lib, self._h, self._owner = lib, handle, owner

    def start(self) -> None:
        _check(self._lib.LiteRtStartProfiler(self._h), "starting the profiler")

    def stop(self) -> None:
        _check(self._lib.LiteRtStopProfiler(self._h), "stopping the profiler")

    def reset(self) -> None:
        _check(self._lib.LiteRtResetProfiler(self._h), "resetting the profiler")

    def events(self) -> List[Event]:
        """Every event recorded since the last reset, in recording order."""
        n = C.c_int()
        _check(self._lib.LiteRtGetNumProfilerEvents(self._h, C.byref(n)), "counting profiler events")
        if n.value <= 0:
            return []
        raw = (_Event * n.value)()
        _check(self._lib.LiteRtGetProfilerEvents(self._h, n.value, raw), "reading profiler events")
        return [Event((e.tag or b"").decode("utf-8", "replace"), int(e.event_type), int(e.start_us),
                      int(e.elapsed_us), int(e.metadata1), int(e.source)) for e in raw]


__all__ = ["CompiledModel", "Event", "LiteRtCError", "Profiler", "library", "library_path"]
