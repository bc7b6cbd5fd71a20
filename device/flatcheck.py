"""Structural check of a .tflite flatbuffer before any native code reads it.

Older runtimes (tflite-runtime 2.14, the one Raspberry Pi OS users get with
numpy<2) build an interpreter from a buffer *without* verifying it, so a
truncated or corrupt download segfaults the process instead of raising. This
walks the parts of the TFLite schema the interpreter dereferences (model,
operator codes, subgraphs, tensors, operators, buffers, metadata, signatures)
and checks that every table, vector and string lies inside the file and that
tensor/buffer/opcode indices are in range. Pure Python, a few ms for a
MobileNet-sized model.
"""
from __future__ import annotations

import struct
from typing import Callable, Dict, List, Optional, Tuple
from edgepipe.device.errors import EdgepipeError

_U8, _U16, _I32, _U32 = struct.Struct("<B"), struct.Struct("<H"), struct.Struct("<i"), struct.Struct("<I")
_U64 = struct.Struct("<Q")


class FlatbufferError(EdgepipeError, ValueError):
    """The file is not a well-formed TFLite model; the message says where."""


class _Reader:
    def __init__(self, data: bytes):
        self.data = data
        self.n = len(data)

    def need(self, pos: int, size: int, what: str) -> None:
        if pos < 0 or size < 0 or pos + size > self.n:
            raise FlatbufferError(f"{what} at byte {pos} (+{size}) lies outside the {self.n}-byte file")

    def u32(self, pos: int, what: str) -> int:
        self.need(pos, 4, what)
        return _U32.unpack_from(self.data, pos)[0]

    def deref(self, pos: int, what: str) -> int:
        """Follow a uoffset stored at ``pos``."""
        return pos + self.u32(pos, what)

    def table(self, pos: int, what: str) -> Dict[int, int]:
        """Field id -> absolute position of the field, for the fields present."""
        self.need(pos, 4, what)
        vt = pos - _I32.unpack_from(self.data, pos)[0]
        self.need(vt, 4, f"{what} vtable")
        vsize, tsize = _U16.unpack_from(self.data, vt)[0], _U16.unpack_from(self.data, vt + 2)[0]
        if vsize < 4 or vsize % 2:
            raise FlatbufferError(f"{what}: malformed vtable at byte {vt}")
        self.need(vt, vsize, f"{what} vtable")
        self.need(pos, tsize, what)
        fields = {}
        for i in range((vsize - 4) // 2):
            off = _U16.unpack_from(self.data, vt + 4 + 2 * i)[0]
            if off:
                if off >= max(tsize, 4):
                    raise FlatbufferError(f"{what}: field {i} outside its table")
                fields[i] = pos + off
        return fields

    def vector(self, pos: int, elem: int, what: str) -> Tuple[int, int]:
        """(start of elements, count) of the vector referenced at ``pos``."""
        v = self.deref(pos, what)
        count = self.u32(v, f"{what} length")
        self.need(v + 4, count * elem, what)
        return v + 4, count

    def string(self, pos: int, what: str) -> None:
        self.vector(pos, 1, what)

    def tables(self, pos: int, what: str, check: Callable[[int, str], None]) -> int:
        start, count = self.vector(pos, 4, what)
        for i in range(count):
            check(self.deref(start + 4 * i, what), f"{what}[{i}]")
        return count

    def ints(self, pos: int, what: str) -> list:
        start, count = self.vector(pos, 4, what)
        return list(struct.unpack_from(f"<{count}i", self.data, start)) if count else []


def check_tflite(data: bytes) -> None:
    """Raise :class:`FlatbufferError` unless ``data`` is a structurally sound TFLite model."""
    _Checker(data).model()


class _Checker:
    """One walk over the model; each method checks one table kind (named as in schema.fbs)."""

    def __init__(self, data: bytes):
        self.data = data
        self.r = _Reader(data)
        self.n_buffers = 0
        self.n_codes = 0

    def model(self) -> None:
        r = self.r
        if r.n < 8 or self.data[4:8] != b"TFL3":
            raise FlatbufferError("missing the 'TFL3' file identifier")
        model = r.table(r.deref(0, "root"), "model")
        if 4 in model:
            self.n_buffers = r.tables(model[4], "buffers", self.buffer)
        if 1 in model:
            self.n_codes = r.tables(model[1], "operator_codes", self.opcode)
        if 2 not in model:
            raise FlatbufferError("model has no subgraphs")
        r.tables(model[2], "subgraphs", self.subgraph)
        if 3 in model:
            r.string(model[3], "description")
        if 6 in model:
            r.tables(model[6], "metadata", self.metadata)
        if 7 in model:
            r.tables(model[7], "signature_defs", self.signature)

    def buffer(self, pos: int, what: str) -> None:
        f = self.r.table(pos, what)
        if 0 in f:
            self.r.vector(f[0], 1, f"{what}.data")
        if 1 in f and 2 in f:  # > 2 GB models keep data after the flatbuffer
            self.r.need(f[1], 16, what)
            off, size = _U64.unpack_from(self.data, f[1])[0], _U64.unpack_from(self.data, f[2])[0]
            if off > 1 and off + size > self.r.n:
                raise FlatbufferError(f"{what}: external data ({size} bytes at {off}) past the end of the file")

    def opcode(self, pos: int, what: str) -> None:
        f = self.r.table(pos, what)
        if 1 in f:
            self.r.string(f[1], f"{what}.custom_code")

    def subgraph(self, pos: int, what: str) -> None:
        r = self.r
        f = r.table(pos, what)
        n_tensors = r.tables(f[0], f"{what}.tensors", self.tensor) if 0 in f else 0
        for fid, name in ((1, "inputs"), (2, "outputs")):
            if fid in f:
                _in_range(r.ints(f[fid], f"{what}.{name}"), n_tensors, f"{what}.{name}")
        if 3 in f:
            r.tables(f[3], f"{what}.operators", lambda p, w: self.operator(p, w, n_tensors))
        if 4 in f:
            r.string(f[4], f"{what}.name")

    def tensor(self, pos: int, what: str) -> None:
        r = self.r
        t = r.table(pos, what)
        for fid, name in ((0, "shape"), (7, "shape_signature")):
            if fid in t:
                r.vector(t[fid], 4, f"{what}.{name}")
        if 2 in t and r.u32(t[2], what) >= max(self.n_buffers, 1):
            raise FlatbufferError(f"{what}: buffer index out of range")
        if 3 in t:
            r.string(t[3], f"{what}.name")
        if 4 in t:
            q = r.table(r.deref(t[4], what), f"{what}.quantization")
            for fid, size in ((0, 4), (1, 4), (2, 4), (3, 8)):
                if fid in q:
                    r.vector(q[fid], size, f"{what}.quantization")

    def operator(self, pos: int, what: str, n_tensors: int) -> None:
        r = self.r
        o = r.table(pos, what)
        if 0 in o and r.u32(o[0], what) >= self.n_codes:
            raise FlatbufferError(f"{what}: opcode index out of range")
        for fid in (1, 2, 8):
            if fid in o:
                _in_range(r.ints(o[fid], what), n_tensors, what)
        if 4 in o:  # builtin options: a table whose layout depends on the op
            r.table(r.deref(o[4], what), f"{what}.builtin_options")
        if 5 in o:
            r.vector(o[5], 1, f"{what}.custom_options")

    def metadata(self, pos: int, what: str) -> None:
        f = self.r.table(pos, what)
        if 0 in f:
            self.r.string(f[0], f"{what}.name")

    def signature(self, pos: int, what: str) -> None:
        f = self.r.table(pos, what)
        for fid in (0, 1):
            if fid in f:
                self.r.tables(f[fid], what, lambda p, w: _tensor_map(self.r, p, w))
        if 2 in f:
            self.r.string(f[2], f"{what}.key")


def _in_range(values, n_tensors: int, where: str) -> None:
    for v in values:
        if v < -1 or v >= n_tensors:
            raise FlatbufferError(f"{where}: tensor index {v} out of range")


def _tensor_map(r: _Reader, pos: int, what: str) -> None:
    f = r.table(pos, what)
    if 0 in f:
        r.string(f[0], f"{what}.name")


def problem(data: bytes) -> Optional[str]:
    """The first structural problem of ``data`` as one line, or None when it looks sound."""
    try:
        check_tflite(data)
    except FlatbufferError as e:
        return str(e)
    except (struct.error, IndexError, OverflowError) as e:  # defensive: never let a bad file escape as a crash
        return f"malformed flatbuffer ({e})"
    return None


# TFLite schema enums used below (tensorflow/lite/schema/schema.fbs).
FULLY_CONNECTED = 9
CUSTOM = 32
TENSOR_TYPES = {0: "float32", 1: "float16", 2: "int32", 3: "uint8", 4: "int64", 6: "bool", 7: "int16",
                9: "int8", 10: "float64"}


def _opcodes(r: _Reader, model: Dict[int, int]) -> List[Tuple[int, Optional[str]]]:
    """``(builtin code, custom code)`` per operator_codes entry."""
    codes = []
    if 1 in model:
        start, count = r.vector(model[1], 4, "operator_codes")
        for i in range(count):
            f = r.table(r.deref(start + 4 * i, "operator_codes"), "opcode")
            dep = _U8.unpack_from(r.data, f[0])[0] if 0 in f else 0
            new = _I32.unpack_from(r.data, f[3])[0] if 3 in f else 0
            custom = None
            if 1 in f:
                s, n = r.vector(f[1], 1, "custom_code")
                custom = r.data[s:s + n].decode("utf-8", "replace")
            codes.append((max(dep, new), custom))
    return codes


def operators(data: bytes) -> list:
    """The main subgraph's ops as ``{"code", "custom", "inputs", "input_types"}`` dicts.

    Call only on data that passed :func:`check_tflite`. ``code`` is the
    builtin operator number; ``input_types`` are numpy dtype names (None for
    an absent optional input, index -1).
    """
    r = _Reader(data)
    model = r.table(r.deref(0, "root"), "model")
    codes = _opcodes(r, model)
    start, _ = r.vector(model[2], 4, "subgraphs")
    sg = r.table(r.deref(start, "subgraphs"), "subgraph")
    types = []
    if 0 in sg:
        ts, tn = r.vector(sg[0], 4, "tensors")
        for i in range(tn):
            t = r.table(r.deref(ts + 4 * i, "tensors"), "tensor")
            types.append(TENSOR_TYPES.get(_U8.unpack_from(data, t[1])[0] if 1 in t else 0, "other"))
    out = []
    if 3 in sg:
        os_, on = r.vector(sg[3], 4, "operators")
        for i in range(on):
            o = r.table(r.deref(os_ + 4 * i, "operators"), "operator")
            code, custom = codes[r.u32(o[0], "opcode") if 0 in o else 0]
            ins = r.ints(o[1], "inputs") if 1 in o else []
            out.append({"code": code, "custom": custom, "inputs": ins,
                        "input_types": [types[j] if j >= 0 else None for j in ins]})
    return out


def known_crash(backend: str, version: Optional[str], data: bytes, machine: Optional[str] = None) -> Optional[str]:
    """Why ``backend`` is known to crash (segfault, not raise) on this model here, or None.

    tflite-runtime 2.14 (the last release, what Raspberry Pi OS users with
    numpy<2 get) reads a null bias in int8 FULLY_CONNECTED on ARM; recent
    converters drop all-zero biases and ``Dense(use_bias=False)`` has none.
    """
    import platform

    machine = (machine or platform.machine()).lower()
    if backend != "tflite_runtime" or not machine.startswith(("aarch64", "arm")):
        return None
    try:
        major, minor = (int(x) for x in (version or "0.0").split(".")[:2])
    except ValueError:
        return None
    if (major, minor) > (2, 14):
        return None
    for op in operators(data):
        if op["code"] == FULLY_CONNECTED and op["input_types"][:1] == ["int8"] and (
                len(op["inputs"]) < 3 or op["inputs"][2] < 0):
            return (f"tflite-runtime {version} crashes on ARM with int8 FULLY_CONNECTED layers that have "
                    "no bias (this model has one); install ai-edge-litert (pip install ai-edge-litert) or "
                    "convert the model with a non-zero bias")
    return None
