"""Per-operator profile: which ops cost the time, and where they ran (delegate or CPU).

Times come from LiteRT's own profiler (see :mod:`edgepipe.device.litert_c`),
on a compiled copy of the model with the same inputs and thread count as the
bench, run *after* the timed loop, so the bench's latency figures never carry
profiling cost. Each event the runtime records is one node: a TFLite builtin
kernel (``cpu``) or an operator inside the XNNPACK delegate (``xnnpack``).
Where no profiler exists (``tflite_runtime``, ``tensorflow.lite`` without
``ai-edge-litert``, or a non-CPU delegate) the profile says so and still counts
the nodes per place from the interpreter's graph.
"""
from __future__ import annotations

import os
import sys
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

from edgepipe.device import delegates as _dl
from edgepipe.device.errors import NATIVE_ERRORS
from edgepipe.device.timing import now_ns

# LiteRtProfilerEventType bits (litert/c/litert_profiler_event.h)
EVENT_DEFAULT = 1
EVENT_OPERATOR = 2
EVENT_DELEGATE_OPERATOR = 4
EVENT_DELEGATE_PROFILED_OPERATOR = 8
_DELEGATE_KINDS = (EVENT_DELEGATE_OPERATOR, EVENT_DELEGATE_PROFILED_OPERATOR)
CPU_DELEGATES = ("cpu", "xnnpack")
CPU_ACCELERATOR = "xnnpack"  # the delegate LiteRT's CPU accelerator runs ops in
MAX_NODES = 1000  # bound on nodes kept in a report (MobileNetV2 has ~70)


@dataclass(frozen=True)
class OpNode:
    """One node of the executed graph and its mean time per inference."""

    index: int  # node index in the TFLite graph (cpu) or in the delegate's own graph
    op: str  # TFLite op type (cpu) or the delegate's operator name
    where: str  # "cpu" or the delegate's name
    mean_ms: float
    share: float  # of the sum over all nodes
    name: Optional[str] = None

    def to_dict(self) -> dict:
        return {"index": self.index, "op": self.op, "where": self.where, "name": self.name,
                "mean_ms": self.mean_ms, "share": self.share}


@dataclass(frozen=True)
class Profile:
    """A report's ``profile`` block; ``available`` False carries the reason and the node counts only."""

    available: bool
    reason: Optional[str] = None
    engine: Optional[str] = None
    runs: int = 0
    invoke_ms: Optional[float] = None  # the runtime's own Invoke event, mean per inference
    run_ms: Optional[float] = None  # wall time of each profiled run (adds LiteRT's buffer binding)
    nodes: Tuple[OpNode, ...] = ()
    node_counts: Dict[str, int] = field(default_factory=dict)

    @property
    def ops_ms(self) -> float:
        return sum(n.mean_ms for n in self.nodes)

    def op_types(self) -> List[dict]:
        """Totals per (op type, where), slowest first."""
        acc: Dict[Tuple[str, str], List[float]] = defaultdict(lambda: [0, 0.0])
        for n in self.nodes:
            acc[(n.op, n.where)][0] += 1
            acc[(n.op, n.where)][1] += n.mean_ms
        return _ranked([{"op": op, "where": w, "count": int(c), "mean_ms": ms} for (op, w), (c, ms) in acc.items()],
                       self.ops_ms)

    def by_where(self) -> List[dict]:
        """Totals per place (delegate name or cpu), slowest first."""
        acc: Dict[str, List[float]] = defaultdict(lambda: [0, 0.0])
        for n in self.nodes:
            acc[n.where][0] += 1
            acc[n.where][1] += n.mean_ms
        return _ranked([{"where": w, "count": int(c), "mean_ms": ms} for w, (c, ms) in acc.items()], self.ops_ms)

    def to_dict(self) -> dict:
        ops = self.ops_ms
        return {
            "available": self.available, "reason": self.reason, "engine": self.engine, "runs": self.runs,
            "invoke_ms": self.invoke_ms, "run_ms": self.run_ms, "ops_ms": ops if self.nodes else None,
            "ops_vs_invoke": ops / self.invoke_ms if self.nodes and self.invoke_ms else None,
            "node_counts": dict(self.node_counts),
            "nodes": [n.to_dict() for n in sorted(self.nodes, key=lambda n: -n.mean_ms)[:MAX_NODES]],
            "op_types": self.op_types(), "where": self.by_where(),
        }


def _ranked(rows: List[dict], total: float) -> List[dict]:
    for r in rows:
        r["share"] = r["mean_ms"] / total if total else None
    return sorted(rows, key=lambda r: -r["mean_ms"])


# --------------------------------------------------------------------------- graph counts (no profiler needed)


def node_counts(loaded) -> Dict[str, int]:
    """Original graph nodes per place (delegate name or ``cpu``) from the interpreter's graph after delegation."""
    ops = _dl.op_details(loaded.interpreter)
    if not ops:
        return {}
    accel = CPU_ACCELERATOR if loaded.delegate in CPU_DELEGATES else loaded.delegate
    original = [i for i, o in enumerate(ops) if o.get("op_name") != "DELEGATE"]
    producers = {int(t): i for i in original for t in ops[i].get("outputs", ())}
    delegated: set = set()
    for o in ops:
        if o.get("op_name") == "DELEGATE":
            delegated |= _dl._partition(o, producers, ops)
    tpu = {i for i in original if ops[i].get("op_name") == _dl.EDGETPU_CUSTOM_OP.decode()}
    counts: Dict[str, int] = defaultdict(int)
    for i in original:
        counts["edgetpu" if i in tpu else accel if i in delegated else "cpu"] += 1
    return dict(counts)


def _node_names(loaded) -> Dict[int, str]:
    """Graph node index -> its first output tensor's name (how converters name layers)."""
    ops = _dl.op_details(loaded.interpreter) or []
    try:
        tensors = {d["index"]: d.get("name") for d in loaded.interpreter.get_tensor_details()}
    except NATIVE_ERRORS:
        return {}
    return {i: tensors.get(int(o["outputs"][0])) for i, o in enumerate(ops) if len(o.get("outputs", ())) > 0}


# --------------------------------------------------------------------------- profiling


def unavailable(reason: str, loaded=None) -> Profile:
    """A profile that only says why there are no times, with node counts when the graph is readable."""
    return Profile(False, reason=reason, node_counts=node_counts(loaded) if loaded is not None else {})


def profile_ops(loaded, arrays: Sequence, *, runs: int = 50, warmup: int = 3, max_secs: float = 10.0) -> Profile:
    """Profile ``loaded``'s model per node on ``arrays`` (raw inputs in the interpreter's input order).

    Never raises for a missing or refusing profiler: the returned profile is
    then ``available=False`` with a one-line reason.
    """
    from edgepipe.device.litert_c import CompiledModel, LiteRtCError

    if loaded.delegate not in CPU_DELEGATES:
        return unavailable(f"per-op times come from LiteRT's CPU path; under the {loaded.delegate} delegate "
                           "its partitions run as opaque nodes (node counts only)", loaded)
    try:
        data = Path(loaded.path).read_bytes()
        shapes = dict(input_shapes=[(t.name, t.shape) for t in loaded.inputs],
                      output_shapes=[(t.name, t.shape) for t in loaded.outputs])
        with _quiet_registry(), CompiledModel(data, threads=loaded.threads, profiling=True, **shapes) as cm:
            cm.set_inputs(list(arrays), [s.name for s in loaded.inputs])
            for _ in range(max(0, warmup)):
                cm.run()
            events, wall = _record(cm, max(1, runs), max_secs)
    except (LiteRtCError, OSError) as e:
        backend = f"{loaded.backend} {loaded.backend_version or ''}".strip()
        return unavailable(f"no per-op profiler with {backend}: {e}", loaded)
    return summarize(events, wall, names=_node_names(loaded), node_counts_=node_counts(loaded))


@contextmanager
def _quiet_registry() -> Iterator[None]:
    """LiteRT announces on stderr every accelerator it could not find (GPU, NPU): expected on a CPU-only
    board, so those lines are dropped; anything else the runtime writes is passed on."""
    with _dl._FD2_LOCK:  # fd 2 is process-wide (see delegates.capture_stderr)
        import tempfile

        sys.stderr.flush()
        saved = os.dup(2)
        with tempfile.TemporaryFile() as tmp:
            os.dup2(tmp.fileno(), 2)
            try:
                yield
            finally:
                os.dup2(saved, 2)
                os.close(saved)
                tmp.seek(0)
                text = tmp.read().decode("utf-8", "replace")
                keep = [ln for ln in text.splitlines(True) if ln.strip() and not ln.startswith(("INFO:", "VERBOSE:"))
                        and "could not be loaded" not in ln]
                if keep:
                    os.write(2, "".join(keep).encode("utf-8", "replace"))


def profile_block(loaded, arrays: Sequence, runs: int) -> dict:
    """The report's ``profile`` block for a bench of ``runs`` timed invokes (profiled runs: 10..100)."""
    return profile_ops(loaded, arrays, runs=min(max(runs, 10), 100)).to_dict()


def _record(cm, runs: int, max_secs: float) -> Tuple[list, List[int]]:
    """Run with the profiler on; ``(events, wall ns per run)``; stops early after ``max_secs``."""
    prof = cm.profiler()
    # The first profiled run carries the profiler's own set-up (milliseconds outside any op): run it, drop it.
    prof.start()
    cm.run()
    prof.stop()
    prof.reset()
    wall: List[int] = []
    deadline = now_ns() + int(max_secs * 1e9)
    prof.start()
    try:
        for _ in range(runs):
            t0 = now_ns()
            cm.run()
            t1 = now_ns()
            wall.append(t1 - t0)
            if t1 > deadline:
                break
    finally:
        prof.stop()
    return prof.events(), wall


def _fold(events: Sequence) -> Dict[Tuple[str, int, str], int]:
    """Microseconds per (where, node index, op) over all recorded runs."""
    inner = any(e.kind in _DELEGATE_KINDS for e in events)
    acc: Dict[Tuple[str, int, str], int] = defaultdict(int)
    for e in events:
        if e.kind in _DELEGATE_KINDS:
            acc[(CPU_ACCELERATOR, e.metadata1, e.tag)] += e.elapsed_us
        elif e.kind == EVENT_OPERATOR and not (inner and "delegate" in e.tag.lower()):
            # a delegate's kernel node wraps the inner events counted above: counting both doubles the time
            acc[("cpu", e.metadata1, e.tag)] += e.elapsed_us
    return acc


def _mean(values: Sequence, scale: float) -> Optional[float]:
    return sum(values) / len(values) / scale if values else None


def summarize(events: Sequence, wall_ns: Sequence[int], *, names: Optional[Dict[int, str]] = None,
              node_counts_: Optional[Dict[str, int]] = None) -> Profile:
    """Fold raw profiler events into mean time per node per inference."""
    names = names or {}
    invokes = [e.elapsed_us for e in events if e.kind == EVENT_DEFAULT and e.tag == "Invoke"]
    runs = len(invokes) or len(wall_ns)
    if not runs:
        return Profile(False, reason="the profiler recorded no inference")
    acc = _fold(events)
    total_us = sum(acc.values()) or 1
    nodes = tuple(OpNode(index=int(i), op=tag, where=w, mean_ms=us / runs / 1000.0, share=us / total_us,
                         name=names.get(int(i)) if w == "cpu" else None) for (w, i, tag), us in acc.items())
    return Profile(True, engine=f"LiteRT CompiledModel, CPU accelerator ({CPU_ACCELERATOR} + builtin kernels)",
                   runs=runs, invoke_ms=_mean(invokes, 1000.0), run_ms=_mean(wall_ns, 1e6), nodes=nodes,
                   node_counts=_counted(nodes, node_counts_))


def _counted(nodes: Sequence[OpNode], graph: Optional[Dict[str, int]]) -> Dict[str, int]:
    """Graph node counts when known (original TFLite nodes), else the profiled nodes per place."""
    if graph:
        return dict(graph)
    counts: Dict[str, int] = defaultdict(int)
    for n in nodes:
        counts[n.where] += 1
    return dict(counts)


# --------------------------------------------------------------------------- text


def _ms(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.3f}" if v < 10 else f"{v:.1f}"


def format_profile(block: dict, top: int = 15) -> str:
    """The report's ``profile`` block as a short table: top nodes, op-type totals, totals per place."""
    counts = ", ".join(f"{w} {n}" for w, n in sorted((block.get("node_counts") or {}).items()))
    if not block.get("available"):
        return f"per-op     {block.get('reason')}" + (f"\nnodes      {counts}" if counts else "")
    lines = [f"per-op     {block.get('engine')}, {block.get('runs')} runs; nodes: {counts}"]
    ratio = block.get("ops_vs_invoke")
    lines.append(f"           sum of nodes {_ms(block.get('ops_ms'))} ms = "
                 f"{ratio * 100:.0f}% of the runtime's invoke {_ms(block.get('invoke_ms'))} ms"
                 if ratio else f"           sum of nodes {_ms(block.get('ops_ms'))} ms")
    head = f"  {'node':>5}  {'op':<40} {'where':<8} {'ms':>8} {'share':>6}  name"
    lines += ["", f"top {min(top, len(block.get('nodes') or []))} nodes", head, "  " + "-" * (len(head) - 2)]
    for n in (block.get("nodes") or [])[:top]:
        lines.append(f"  {n['index']:>5}  {n['op'][:40]:<40} {n['where']:<8} {_ms(n['mean_ms']):>8} "
                     f"{_pct(n.get('share')):>6}  {n.get('name') or ''}".rstrip())
    lines += ["", "by op type", f"  {'op':<40} {'where':<8} {'count':>5} {'ms':>8} {'share':>6}"]
    for t in block.get("op_types") or []:
        lines.append(f"  {t['op'][:40]:<40} {t['where']:<8} {t['count']:>5} {_ms(t['mean_ms']):>8} "
                     f"{_pct(t.get('share')):>6}")
    lines.append("by place   " + " | ".join(f"{w['where']} {w['count']} nodes {_ms(w['mean_ms'])} ms "
                                            f"({_pct(w.get('share'))})" for w in block.get("where") or []))
    return "\n".join(lines)


def _pct(v: Optional[float]) -> str:
    return "-" if v is None else f"{v * 100:.1f}%"


__all__ = ["OpNode", "Profile", "format_profile", "node_counts", "profile_block", "profile_ops", "summarize",
           "unavailable"]
