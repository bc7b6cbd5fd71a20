#!/usr/bin/env python
"""Profiling off costs nothing: invoke p50 with and without LiteRT's profiler compiled in, same process.

Four sides alternate, round by round, on the same model, thread count and input:

  interpreter      the ``Interpreter`` path ``edgerun bench`` times (no profiler anywhere)
  compiled         LiteRT CompiledModel through the C API, profiling not enabled
  compiled+prof    the same with profiling enabled in the runtime options (profiler built in, not started)
  profiling        the same with the profiler recording (what ``--profile-ops`` runs, after the timed loop)

``edgerun bench --profile-ops`` times the interpreter side and profiles on a separate
compiled model afterwards, so its latency figures cannot carry profiling cost; the
compiled vs compiled+prof pair shows that having the profiler built in costs nothing
either. Printed: median p50 per side and the paired ratios to ``compiled``. No assertion.

    .venv-device/bin/python scripts/bench/profile_overhead.py                   # the int8 MobileNetV2 sample
    .venv-device/bin/python scripts/bench/profile_overhead.py --model tests/data/models/conv_stack_int8.tflite
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_overhead import cache_root, ensure_bundles  # noqa: E402 (sibling script)

SIDES = ("interpreter", "compiled", "compiled+prof", "profiling")


def p50(fn, runs: int) -> float:
    out = []
    for _ in range(runs):
        t0 = time.perf_counter_ns()
        fn()
        out.append(time.perf_counter_ns() - t0)
    return statistics.median(out) / 1e6


def build(model: Path, threads: int):
    from edgepipe.device.litert_c import CompiledModel
    from edgepipe.device.profiler import _quiet_registry
    from edgepipe.device.runtime import load_model

    loaded = load_model(model, threads=threads)
    arrays = [np.random.default_rng(0).integers(0, 255, s.shape).astype(s.dtype) for s in loaded.inputs]
    for i, a in enumerate(arrays):
        loaded.set_input(i, a)
    shapes = dict(input_shapes=[(t.name, t.shape) for t in loaded.inputs],
                  output_shapes=[(t.name, t.shape) for t in loaded.outputs])
    with _quiet_registry():
        plain = CompiledModel(model.read_bytes(), threads=threads, profiling=False, **shapes)
        built_in = CompiledModel(model.read_bytes(), threads=threads, profiling=True, **shapes)
        recording = CompiledModel(model.read_bytes(), threads=threads, profiling=True, **shapes)
    for cm in (plain, built_in, recording):
        cm.set_inputs(arrays, [s.name for s in loaded.inputs])
    prof = recording.profiler()
    prof.start()
    return {"interpreter": loaded.invoke, "compiled": plain.run, "compiled+prof": built_in.run,
            "profiling": recording.run}, prof


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None, help="A .tflite (default: the int8 MobileNetV2 sample).")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs", type=int, default=30, help="Timed invokes per side per round.")
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args(argv)
    model = args.model or ensure_bundles(cache_root() / "bench-bundles", ["int8"])["int8"] / "model.tflite"
    sides, prof = build(model, args.threads)
    for fn in sides.values():  # warm every side
        for _ in range(5):
            fn()
    got = {s: [] for s in SIDES}
    for k in range(args.rounds):
        for s in SIDES:
            got[s].append(p50(sides[s], args.runs))
        if k % 5 == 4:
            prof.reset()  # keep the recording side's event buffer bounded
    print(f"model {model}; threads {args.threads}; {args.rounds} rounds x {args.runs} invokes per side")
    print(f"{'side':<15} {'median p50 ms':>14} {'paired ratio to compiled':>25}")
    for s in SIDES:
        ratio = statistics.median(a / b for a, b in zip(got[s], got["compiled"]))
        print(f"{s:<15} {statistics.median(got[s]):>14.3f} {ratio:>25.3f}")
    bench_pair(model, args.threads, max(3, args.rounds // 3))
    return 0


def bench_pair(model: Path, threads: int, rounds: int) -> None:
    """What a user sees: `edgerun bench` p50 without and with --profile-ops, alternating in one process."""
    from edgepipe.device.bench import run_bench

    off, on = [], []
    for _ in range(rounds):
        off.append(run_bench(model, threads=threads, runs=30, warmup=5)["latency_ms"]["p50"])
        r = run_bench(model, threads=threads, runs=30, warmup=5, profile_ops=True)
        on.append(r["latency_ms"]["p50"])
    paired = statistics.median(b / a for a, b in zip(off, on))
    print(f"edgerun bench p50, {rounds} alternating rounds: without --profile-ops {statistics.median(off):.3f} ms, "
          f"with {statistics.median(on):.3f} ms (paired ratio {paired:.3f}; profiled runs: "
          f"{r['profile']['runs']}, sum of ops {100 * (r['profile']['ops_vs_invoke'] or 0):.0f}% of invoke)")


if __name__ == "__main__":
    sys.exit(main())
