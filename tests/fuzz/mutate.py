"""Seeded mutants of small real .tflite models, one changed field each.

Every mutant is a *structurally valid* flatbuffer (it is unpacked into the
schema's object API, one field is changed, and it is packed again), so it gets
past a byte-level check and reaches the runtime's own reading, preparing and
allocating code. That is where malformed models crash or raise; the fuzz tests
push these files through ``edgerun`` and the agent and check that every failure
is one line and nothing dies.

The object API is TensorFlow's generated schema module (what
``tensorflow.lite.tools.flatbuffer_utils`` reads and writes models with); the
copy ``ai_edge_litert`` ships is preferred because it loads in milliseconds,
where ``import tensorflow`` takes seconds, and it exists in the device venv too.

Library use::

    from fuzz.mutate import default_models, make_mutants
    mutants = make_mutants(default_models(), tmp_path, count=60, seed=0)

Script use::

    python tests/fuzz/mutate.py --out /tmp/mutants --count 150 --seed 0 [MODEL.tflite ...]
"""
from __future__ import annotations

import argparse
import copy
import importlib
import json
import math
import random
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Sequence, Tuple

MODELS_DIR = Path(__file__).resolve().parents[1] / "data" / "models"
# The small models mutated by default, named so that a model added to the folder
# for another test does not change which mutants a seed makes (and their figures).
SOURCES = ("custom_op", "edgetpu_like", "float", "int8_float_io", "int8_io", "int8_no_bias", "two_outputs",
           "uint8_io")
MAX_DIM = 4096  # mutated shapes stay small: a fuzz run must not exhaust memory
BAD_INDICES = (-1, -2, 10_000)


@dataclass(frozen=True)
class Mutant:
    """One mutated model file and what was changed."""

    path: Path
    source: str  # file name of the model it was made from
    field: str  # which kind of field changed, e.g. "operator.inputs" (one of FIELDS)
    description: str  # the exact change, e.g. "subgraph 0 operator 2 input 1: 7 -> -1"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["path"] = str(self.path)
        return d


def _schema() -> Any:
    for name in ("ai_edge_litert.schema_py_generated", "tflite_runtime.schema_py_generated",
                 "tensorflow.lite.python.schema_py_generated"):
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    raise ImportError("no TFLite schema module (install ai-edge-litert or tensorflow)")


def read_model(data: bytes) -> Any:
    """The schema's mutable object (``ModelT``) for ``data``."""
    fb = _schema()
    return fb.ModelT.InitFromObj(fb.Model.GetRootAsModel(bytearray(data), 0))


def write_model(model: Any) -> bytes:
    """Pack a ``ModelT`` back into a .tflite flatbuffer (with the 'TFL3' identifier)."""
    import flatbuffers

    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def default_models(models_dir: Path = MODELS_DIR) -> List[Path]:
    """The small real test models in :data:`SOURCES` (a few KB each, 4-7 ops), in that order."""
    return [models_dir / f"{name}.tflite" for name in SOURCES if (models_dir / f"{name}.tflite").exists()]


# --------------------------------------------------------------------------- mutations
# Each takes (model, rng) and returns a description, or None when the model has
# nothing of that kind; it changes exactly one field of ``model`` in place.

def _pick_tensor(model: Any, rng: random.Random) -> Tuple[int, int, Any]:
    si = rng.randrange(len(model.subgraphs))
    sg = model.subgraphs[si]
    ti = rng.randrange(len(sg.tensors))
    return si, ti, sg.tensors[ti]


def _pick_operator(model: Any, rng: random.Random) -> Tuple[int, int, Any]:
    candidates = [(si, oi) for si, sg in enumerate(model.subgraphs) for oi in range(len(sg.operators or []))]
    si, oi = rng.choice(candidates)
    return si, oi, model.subgraphs[si].operators[oi]


def _mutate_shape(model: Any, rng: random.Random) -> str:
    si, ti, t = _pick_tensor(model, rng)
    old = [int(x) for x in (t.shape if t.shape is not None else [])]
    new = list(old)
    how = rng.choice(("dim", "add", "drop", "scalar"))
    if how == "dim" and new:
        new[rng.randrange(len(new))] = rng.choice((0, -1, 2, 3, 5, 17, MAX_DIM))
    elif how == "add":
        new.insert(rng.randrange(len(new) + 1), rng.choice((1, 2, 3)))
    elif how == "drop" and new:
        del new[rng.randrange(len(new))]
    else:
        new = []
    t.shape = new
    return f"subgraph {si} tensor {ti} shape: {old} -> {new}"


def _mutate_type(model: Any, rng: random.Random) -> str:
    si, ti, t = _pick_tensor(model, rng)
    old = int(t.type)
    new = rng.choice([v for v in range(18) if v != old] + [100])  # int8 field: 100 is no type
    t.type = new
    return f"subgraph {si} tensor {ti} type: {old} -> {new}"


def _mutate_buffer(model: Any, rng: random.Random) -> str:
    si, ti, t = _pick_tensor(model, rng)
    old, n = int(t.buffer), len(model.buffers)
    new = rng.choice([v for v in range(n) if v != old] + [n, n + 100])
    t.buffer = new
    return f"subgraph {si} tensor {ti} buffer: {old} -> {new} (of {n})"


def _index_choice(rng: random.Random, n_tensors: int, old: int) -> int:
    return rng.choice([v for v in range(n_tensors) if v != old] + [n_tensors] + list(BAD_INDICES))


def _mutate_op_io(model: Any, rng: random.Random, attr: str) -> str:
    si, oi, op = _pick_operator(model, rng)
    vals = [int(x) for x in (getattr(op, attr) if getattr(op, attr) is not None else [])]
    n = len(model.subgraphs[si].tensors)
    if not vals or rng.random() < 0.15:
        new_vals = vals + [_index_choice(rng, n, -3)]
        what = f"appended {new_vals[-1]}"
    else:
        k = rng.randrange(len(vals))
        new_vals = list(vals)
        new_vals[k] = _index_choice(rng, n, vals[k])
        what = f"{k}: {vals[k]} -> {new_vals[k]}"
    setattr(op, attr, new_vals)
    return f"subgraph {si} operator {oi} {attr} {what}"


def _mutate_opcode(model: Any, rng: random.Random) -> str:
    if rng.random() < 0.25:  # the operator's index into operator_codes
        si, oi, op = _pick_operator(model, rng)
        old, n = int(op.opcodeIndex), len(model.operatorCodes)
        op.opcodeIndex = rng.choice([v for v in range(n) if v != old] + [n])
        return f"subgraph {si} operator {oi} opcode_index: {old} -> {op.opcodeIndex} (of {n})"
    ci = rng.randrange(len(model.operatorCodes))
    code = model.operatorCodes[ci]
    old = max(int(code.builtinCode), int(code.deprecatedBuiltinCode))
    new = rng.choice([v for v in range(0, 210) if v != old])
    code.builtinCode = new
    code.deprecatedBuiltinCode = min(new, 127)  # 127 = "look at builtin_code"
    return f"operator_code {ci} builtin_code: {old} -> {new}"


def _options_fields(opts: Any) -> List[str]:
    return sorted(k for k, v in vars(opts).items() if isinstance(v, (bool, int, float)))


def _mutate_options(model: Any, rng: random.Random) -> str:
    si, oi, op = _pick_operator(model, rng)
    opts = op.builtinOptions
    fields = _options_fields(opts) if opts is not None else []
    if not fields or rng.random() < 0.3:  # claim the options are another op's table
        old = int(op.builtinOptionsType)
        op.builtinOptionsType = rng.choice([v for v in range(1, 127) if v != old])
        if opts is None:
            op.builtinOptions = _schema().Conv2DOptionsT()
        return f"subgraph {si} operator {oi} builtin_options_type: {old} -> {op.builtinOptionsType}"
    name = rng.choice(fields)
    old = getattr(opts, name)
    if isinstance(old, bool):
        new: Any = not old
    elif isinstance(old, float):
        new = rng.choice((0.0, -1.0, 1e30, math.nan))
    else:
        new = rng.choice([v for v in (0, -1, 2, 7, 100, 127) if v != old])
    setattr(opts, name, new)
    return f"subgraph {si} operator {oi} options.{name}: {old!r} -> {new!r}"


def _mutate_quantization(model: Any, rng: random.Random) -> str:
    si, ti, t = _pick_tensor(model, rng)
    q = t.quantization
    if q is None:
        q = t.quantization = _schema().QuantizationParametersT()
    scale = [float(x) for x in q.scale] if q.scale is not None else []
    zps = [int(x) for x in q.zeroPoint] if q.zeroPoint is not None else []
    how = rng.choice(("scale", "zero_point", "length", "axis"))
    if how == "scale":
        new = [rng.choice((0.0, -1.0, 1e-30, 1e30, math.inf, math.nan))] * max(1, len(scale))
        q.scale = new
        return f"subgraph {si} tensor {ti} quantization.scale: {scale} -> {new}"
    if how == "zero_point":
        new_z = [rng.choice((-129, 128, 256, 2**31 - 1))] * max(1, len(zps))
        q.zeroPoint = new_z
        return f"subgraph {si} tensor {ti} quantization.zero_point: {zps} -> {new_z}"
    if how == "length":  # per-axis vectors whose length matches no dimension
        n = len(scale) + rng.choice((1, 2, 5))
        q.scale, q.zeroPoint = [0.5] * n, [0] * n
        return f"subgraph {si} tensor {ti} quantization: {len(scale)} -> {n} per-axis parameters"
    old = int(q.quantizedDimension)
    q.quantizedDimension = rng.choice((-1, 4, 9, 100))
    return f"subgraph {si} tensor {ti} quantization.quantized_dimension: {old} -> {q.quantizedDimension}"


def _mutate_subgraph_io(model: Any, rng: random.Random) -> str:
    si = rng.randrange(len(model.subgraphs))
    sg = model.subgraphs[si]
    attr = rng.choice(("inputs", "outputs"))
    vals = [int(x) for x in (getattr(sg, attr) if getattr(sg, attr) is not None else [])]
    how = rng.choice(("replace", "replace", "empty", "duplicate"))
    if how == "empty" or not vals:
        new: List[int] = []
    elif how == "duplicate":
        new = vals + [vals[0]]
    else:
        k = rng.randrange(len(vals))
        new = list(vals)
        new[k] = _index_choice(rng, len(sg.tensors), vals[k])
    setattr(sg, attr, new)
    return f"subgraph {si} {attr}: {vals} -> {new}"


MUTATIONS: Dict[str, Callable[[Any, random.Random], str]] = {
    "tensor.shape": _mutate_shape,
    "tensor.type": _mutate_type,
    "tensor.buffer": _mutate_buffer,
    "operator.inputs": lambda m, r: _mutate_op_io(m, r, "inputs"),
    "operator.outputs": lambda m, r: _mutate_op_io(m, r, "outputs"),
    "opcode": _mutate_opcode,
    "builtin_options": _mutate_options,
    "quantization": _mutate_quantization,
    "subgraph.io": _mutate_subgraph_io,
}
FIELDS: Tuple[str, ...] = tuple(MUTATIONS)
MAX_TRIES = 20  # a mutation that happens to re-pack to the same bytes is drawn again


def _one_mutant(source: Any, data: bytes, field: str, rng: random.Random) -> Tuple[bytes, str]:
    for _ in range(MAX_TRIES):
        model = copy.deepcopy(source)
        description = MUTATIONS[field](model, rng)
        out = write_model(model)
        if out != data:
            return out, description
    raise RuntimeError(f"could not make a {field} mutant that differs from its source")


def make_mutants(models: Sequence[Path], out_dir: Path, count: int, seed: int) -> List[Mutant]:
    """Write ``count`` mutants of ``models`` into ``out_dir``; the same seed gives the same files.

    Fields are visited round-robin (so every kind appears in a run of
    ``len(FIELDS)``) and sources in a seeded order; the rest of each choice comes
    from ``random.Random(seed)``. ``out_dir/mutants.json`` lists them.
    """
    if count < 0:
        raise ValueError("count must not be negative")
    models = [Path(m) for m in models]
    if not models:
        raise ValueError("no source models given")
    rng = random.Random(seed)
    sources = []
    for p in models:
        data = p.read_bytes()
        sources.append((p, data, read_model(data)))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    mutants: List[Mutant] = []
    for i in range(count):
        field = FIELDS[i % len(FIELDS)]
        path, data, model = sources[rng.randrange(len(sources))]
        blob, description = _one_mutant(model, data, field, rng)
        target = out_dir / f"m{i:04d}-{path.stem}-{field.replace('.', '_')}.tflite"
        target.write_bytes(blob)
        mutants.append(Mutant(target, path.name, field, description))
    index = {"seed": seed, "count": count,
             "mutants": [dict(m.to_dict(), path=m.path.name) for m in mutants]}  # relative: the folder may move
    (out_dir / "mutants.json").write_text(json.dumps(index, indent=1) + "\n", encoding="utf-8")
    return mutants


def main(argv: Sequence[str] = ()) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="*", type=Path, help="source .tflite files (default: tests/data/models)")
    ap.add_argument("--out", type=Path, required=True, help="folder for the mutants")
    ap.add_argument("--count", type=int, default=150)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(list(argv) or None)
    mutants = make_mutants(args.models or default_models(), args.out, args.count, args.seed)
    for m in mutants:
        print(f"{m.path.name}\t{m.description}")
    print(f"{len(mutants)} mutant(s) in {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
