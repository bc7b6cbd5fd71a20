"""Doubts about a structurally sound model's graph: the shapes that crash runtimes instead of raising.

:mod:`edgepipe.device.flatcheck` proves every offset and index lies inside
the file; a model can pass that and still make the runtime's native code
crash (SIGSEGV in ``allocate_tensors`` or the first ``invoke``), which no
``except`` catches. Fuzzing found these causes: an operator writing a tensor
another operator (or the model's input, or a constant) already holds, a
missing (-1) first or second operator input, a tensor read before anything
writes it, -1 or repeated subgraph inputs/outputs, a NaN/infinite/negative
quantization scale. :func:`doubts` lists them (pure Python, one pass) so the
caller can load such a model in a child process first
(:mod:`edgepipe.device.isolate`).
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Dict, List, Tuple

from edgepipe.device.flatcheck import _U8, _U64, _Reader

MAX_SANE_SCALE = 1e10


@dataclass
class _Sub:
    """One subgraph as the doubt checks see it."""

    tensors: List[dict] = field(default_factory=list)  # {"buffer", "const", "variable", "scales"}
    ops: List[Tuple[List[int], List[int]]] = field(default_factory=list)  # (inputs, outputs)
    inputs: List[int] = field(default_factory=list)
    outputs: List[int] = field(default_factory=list)


def _const_buffers(r: _Reader, model: Dict[int, int]) -> List[bool]:
    out = []
    if 4 in model:
        start, count = r.vector(model[4], 4, "buffers")
        for i in range(count):
            f = r.table(r.deref(start + 4 * i, "buffers"), "buffer")
            size = r.u32(r.deref(f[0], "data"), "data") if 0 in f else 0
            off = _U64.unpack_from(r.data, f[1])[0] if 1 in f else 0
            out.append(size > 0 or off > 1)
    return out


def _tensor_facts(r: _Reader, pos: int, consts: List[bool]) -> dict:
    t = r.table(pos, "tensor")
    buf = r.u32(t[2], "buffer") if 2 in t else 0
    scales: list = []
    if 4 in t:
        q = r.table(r.deref(t[4], "quantization"), "quantization")
        if 2 in q:
            start, n = r.vector(q[2], 4, "scale")
            scales = list(struct.unpack_from(f"<{n}f", r.data, start)) if n else []
    return {"buffer": buf, "const": buf < len(consts) and consts[buf],
            "variable": 5 in t and _U8.unpack_from(r.data, t[5])[0] != 0, "scales": scales}


def _subgraphs(data: bytes) -> List[_Sub]:
    r = _Reader(data)
    model = r.table(r.deref(0, "root"), "model")
    consts = _const_buffers(r, model)
    subs = []
    start, count = r.vector(model[2], 4, "subgraphs")
    for i in range(count):
        f = r.table(r.deref(start + 4 * i, "subgraphs"), "subgraph")
        sub = _Sub(inputs=r.ints(f[1], "inputs") if 1 in f else [], outputs=r.ints(f[2], "outputs") if 2 in f else [])
        if 0 in f:
            ts, tn = r.vector(f[0], 4, "tensors")
            sub.tensors = [_tensor_facts(r, r.deref(ts + 4 * k, "tensors"), consts) for k in range(tn)]
        if 3 in f:
            os_, on = r.vector(f[3], 4, "operators")
            for k in range(on):
                o = r.table(r.deref(os_ + 4 * k, "operators"), "operator")
                sub.ops.append((r.ints(o[1], "inputs") if 1 in o else [], r.ints(o[2], "outputs") if 2 in o else []))
        subs.append(sub)
    return subs


def _io_doubts(s: int, sub: _Sub) -> List[str]:
    out = []
    for name, values in (("inputs", sub.inputs), ("outputs", sub.outputs)):
        if -1 in values:
            out.append(f"subgraph {s} {name} include index -1")
        if len(set(values)) != len(values):
            out.append(f"subgraph {s} {name} repeat a tensor")
    return out


def _op_doubts(s: int, sub: _Sub) -> List[str]:
    out: List[str] = []
    written = {t for t in sub.inputs if t >= 0}
    written |= {k for k, t in enumerate(sub.tensors) if t["const"] or t["variable"]}
    producer: Dict[int, int] = {}
    for k, (ins, outs) in enumerate(sub.ops):
        where = f"subgraph {s} operator {k}"
        out += [f"{where} has no input {p} (index -1)" for p, t in enumerate(ins[:2]) if t == -1]
        out += [f"{where} reads tensor {t} before anything writes it" for t in ins if t >= 0 and t not in written]
        for t in outs:
            out += _output_doubt(where, t, producer, written)
            producer.setdefault(t, k)
            written.add(t)
    return out


def _output_doubt(where: str, t: int, producer: Dict[int, int], written: set) -> List[str]:
    if t < 0:
        return [f"{where} has an output index -1"]
    if t in producer:
        return [f"{where} writes tensor {t}, already written by operator {producer[t]}"]
    if t in written:
        return [f"{where} writes tensor {t}, a constant or subgraph input"]
    return []


def doubts(data: bytes) -> List[str]:
    """Reasons to suspect a structurally sound model of crashing the runtime (one line each; [] = none).

    Call only on data that passed :func:`check_tflite`. Cheap (pure Python,
    one pass); a hint to load the model in a child process first, not a
    verdict: the runtime may still refuse such a model with a clean error.
    """
    out: List[str] = []
    for s, sub in enumerate(_subgraphs(data)):
        out += _io_doubts(s, sub) + _op_doubts(s, sub)
        for k, t in enumerate(sub.tensors):
            if any(not 0.0 <= x < MAX_SANE_SCALE for x in t["scales"]):  # NaN fails both comparisons
                out.append(f"subgraph {s} tensor {k} has a quantization scale that is not a finite positive number")
    return out


__all__ = ["doubts"]
