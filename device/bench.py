"""`edgerun bench`: cold start, warm-up, timed invokes -> one report per setting.

Only ``invoke()`` is inside the timed window; inputs are set before it, so
the figures are comparable with a bare ``interpreter.invoke()`` loop (see
scripts/bench/bench_overhead.py). Cold start is reported separately.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

from edgepipe.device.bundle import Bundle, BundleError, load_bundle, sha256_file
from edgepipe.device.runtime import Stage, model_stage
from edgepipe.device.timing import now_ns, ns_to_ms, stats
from edgepipe.device.errors import EdgepipeError

HOT_TEMPERATURE_C = 80.0  # Raspberry Pi firmware soft limit starts at 80 C


class BenchError(EdgepipeError):
    """A bench that cannot run; one line for the user."""


def model_for(bundle: Bundle, delegate: str) -> Path:
    """The Edge TPU-compiled model when asked for the TPU and the bundle has one."""
    if delegate.split(":")[0].lower() == "edgetpu":
        tpu = bundle.edgetpu_model_path()
        if tpu is not None:
            return tpu
    return bundle.model_path


def model_block(bundle: Bundle, model_path: Path) -> dict:
    m = bundle.manifest
    if m is not None and model_path == bundle.model_path:
        sha, size = m.model_sha256, m.model_size
    else:
        sha, size = sha256_file(model_path), model_path.stat().st_size
    block = {"name": bundle.name, "recipe": m.recipe if m else None, "sha256": sha, "size": int(size)}
    if model_path != bundle.model_path:
        block["file"] = model_path.name
    return block


def resource_warnings(start: dict, end: dict, loaded, inputs=None) -> List[str]:
    """Warnings from start/end snapshots (governor, throttling, heat) and the model's CPU fallback."""
    from edgepipe.device.sysinfo import emulated

    out = _governor_warnings(start, end) + _throttle_warnings(start, end)
    temp = end.get("temperature_c")
    if temp is not None and temp >= HOT_TEMPERATURE_C:
        out.append(f"SoC temperature reached {temp:.1f} C: expect thermal throttling; add a heatsink or fan")
    fb = loaded.cpu_fallback
    if fb is not None:
        if fb.note:
            out.append(fb.note)
        elif fb.cpu_ops:
            names = ", ".join(f"{k} x{v}" for k, v in sorted(fb.cpu_op_names.items()))
            out.append(f"{fb.cpu_ops} of {fb.total_ops} ops fell back to the CPU under {fb.delegate} ({names})")
    if emulated():
        out.append("running under CPU emulation: timings are not representative of the real device")
    return out


def _governor_warnings(start: dict, end: dict) -> List[str]:
    out = []
    gov = start.get("governor")
    if gov and gov != "performance":
        out.append(f"CPU governor is {gov!r}, not 'performance': latency may vary with frequency scaling "
                   "(echo performance | sudo tee /sys/devices/system/cpu/cpu*/cpufreq/scaling_governor)")
    if end.get("governor") and end.get("governor") != gov:
        out.append(f"CPU governor changed during the run ({gov} -> {end['governor']})")
    return out


def _throttle_warnings(start: dict, end: dict) -> List[str]:
    from edgepipe.device.sysinfo import decode_throttled

    t0, t1 = start.get("throttled"), end.get("throttled")
    now_flags = decode_throttled(t1)
    if now_flags and t1 != t0:
        return [f"throttling changed during the run ({t0} -> {t1}: {', '.join(now_flags)})"]
    if any("currently" in f or "capped" in f or "under-voltage detected" in f for f in now_flags):
        return [f"device is throttled ({t1}: {', '.join(now_flags)})"]
    return []


def run_bench(bundle_path: os.PathLike, *, threads: Optional[int] = None, delegate: str = "cpu",
              runs: int = 50, warmup: int = 5, min_secs: float = 0.0, input: str = "random",
              backend: Optional[str] = None, seed: int = 0, loaded=None, edgetpu_device: Optional[str] = None,
              max_secs: Optional[float] = None, progress: Optional[Callable[[int], None]] = None,
              profile_ops: bool = False) -> dict:
    """Benchmark one bundle or ``.tflite`` with one setting; returns a ``bench`` report.

    Runs at least ``runs`` timed invokes and keeps going until ``min_secs``
    have passed (``max_secs`` caps that). ``loaded`` reuses an already
    loaded model (the agent keeps them warm): its cold-start figures are then
    not re-measured and ``runtime.load`` says ``warm``. Raises BenchError,
    BundleError, edgepipe.device.runtime.RuntimeLoadError or ModelRunError
    with one-line messages. ``profile_ops`` adds a per-op ``profile`` block,
    measured after the timed loop, so the latency figures never carry it.
    """
    from edgepipe.device import sysinfo
    from edgepipe.device.runtime import load_model

    _check_counts(runs, warmup, min_secs)
    bundle = load_bundle(bundle_path)
    model_path = model_for(bundle, delegate)
    device = sysinfo.device_info()
    start = sysinfo.start_snapshot(device)
    cold = loaded is None
    if cold:
        loaded = load_model(model_path, backend=backend, delegate=delegate, threads=threads,
                            edgetpu_device=edgetpu_device)
    inputs = _bench_inputs(bundle, model_path, loaded, input, seed)
    _warm_up(loaded, inputs.sets, warmup, cold)
    with model_stage(loaded.path, Stage.INVOKE):
        samples_ns, wall_ms = _timed(loaded, inputs.sets, runs, min_secs, max_secs, progress)
    end = sysinfo.snapshot()
    device["temperature_c"]["end"] = end["temperature_c"]
    device["throttled"]["end"] = end["throttled"]
    settings = {"runs": runs, "warmup": warmup, "min_secs": min_secs, "max_secs": max_secs,
                "threads": threads, "delegate": delegate, "backend": backend, "seed": seed,
                "model_path": os.fspath(model_path), "timed_wall_ms": wall_ms,
                "cpu_fallback": loaded.cpu_fallback.to_dict() if loaded.cpu_fallback else None}
    report = _bench_report(bundle, model_path, loaded, cold, device, samples_ns, inputs, settings)
    report["warnings"].extend(resource_warnings(start, end, loaded, inputs))
    if profile_ops:
        from edgepipe.device.profiler import profile_block

        report["profile"] = profile_block(loaded, inputs.sets[0], runs)
    return report


def _check_counts(runs: int, warmup: int, min_secs: float) -> None:
    if runs < 1:
        raise BenchError("the number of timed runs must be at least 1", param="runs")
    if warmup < 0 or min_secs < 0:
        raise BenchError("warm-up runs and the minimum duration must not be negative",
                         param="warmup" if warmup < 0 else "min_secs")


def _bench_inputs(bundle: Bundle, model_path: Path, loaded, input: Optional[str], seed: int):
    """Seeded random tensors or real images through the bundle's preprocessing (``BenchInputs``)."""
    from edgepipe.device.inputs import InputError, image_inputs, random_inputs

    pre = bundle.manifest.preprocess if bundle.manifest else None
    try:
        if input in ("random", "", None):
            inputs = random_inputs(loaded.inputs, pre, seed=seed)
        else:
            inputs = image_inputs(input, loaded.inputs, pre)
    except InputError as e:
        raise BenchError(str(e)) from None
    if bundle.manifest is None:
        inputs.assumed.insert(0, f"plain model file: no manifest, so no recipe, labels or preprocessing "
                                 f"({os.path.basename(str(model_path))})")
    return inputs


def _set_all(loaded, arrays: Sequence) -> None:
    for i, a in enumerate(arrays):
        loaded.set_input(i, a)


def _warm_up(loaded, sets: Sequence, warmup: int, cold: bool) -> None:
    """First inputs, the cold first invoke (timed into load_ms) and the untimed warm-up runs."""
    with model_stage(loaded.path, Stage.SET_INPUTS):
        _set_all(loaded, sets[0])
    if cold:
        loaded.first_invoke()
    with model_stage(loaded.path, Stage.WARMUP):
        for k in range(warmup):
            if len(sets) > 1:
                _set_all(loaded, sets[k % len(sets)])
            loaded.invoke()


def _timed(loaded, sets: Sequence, runs: int, min_secs: float, max_secs: Optional[float],
           progress: Optional[Callable[[int], None]]) -> Tuple[List[int], float]:
    """The timed invokes: ``(samples in ns, wall ms)``; only ``invoke()`` is between the clock reads."""
    set_input, invoke = loaded.set_input, loaded.invoke
    samples_ns: List[int] = []
    append = samples_ns.append
    min_ns = int(min_secs * 1e9)
    max_ns = int(max_secs * 1e9) if max_secs else None
    single = len(sets) == 1
    t_begin = now_ns()
    n = 0
    while True:
        if not single:
            for i, a in enumerate(sets[n % len(sets)]):
                set_input(i, a)
        t0 = now_ns()
        invoke()
        t1 = now_ns()
        append(t1 - t0)
        n += 1
        if n >= runs and t1 - t_begin >= min_ns or (max_ns and t1 - t_begin >= max_ns):
            break
        if progress is not None and n % 10 == 0:
            progress(n)
    return samples_ns, ns_to_ms(now_ns() - t_begin)


def _bench_report(bundle: Bundle, model_path: Path, loaded, cold: bool, device: dict, samples_ns: List[int],
                  inputs, settings: dict) -> dict:
    from edgepipe.device import sysinfo
    from edgepipe.device.report import new_report

    lat = stats(ns_to_ms(s) for s in samples_ns)
    runtime = loaded.runtime_dict()
    runtime["load"] = "cold" if cold else "warm"
    return new_report(
        "bench", device=device, runtime=runtime, model=model_block(bundle, model_path),
        load_ms=dict(loaded.load_ms) if cold else None,
        latency_ms=lat,
        throughput={"fps": 1000.0 / lat["mean"] if lat["mean"] else None, "mode": "sequential",
                    "workers": 1, "frames": lat["n"]},
        peak_rss_mb=sysinfo.peak_rss_mb(), input=inputs.to_dict(), settings=settings,
    )


def run_matrix(bundle_path: os.PathLike, *, threads: Sequence[Optional[int]] = (None,),
               delegates: Sequence[str] = ("cpu",), on_report: Optional[Callable[[dict], None]] = None,
               on_error: Optional[Callable[[str, Exception], bool]] = None, **kw) -> List[dict]:
    """One cold :func:`run_bench` per (delegate, threads) pair, in that order.

    Accelerators ignore the thread count only partly (CPU fallback ops still
    use it), so every pair is measured. ``on_error(label, exc)`` may return
    True to continue with the next setting; the default re-raises.
    """
    reports = []
    for d in delegates:
        for t in threads:
            try:
                r = run_bench(bundle_path, threads=t, delegate=d, **kw)
            except Exception as e:  # noqa: BLE001 - handed to the caller's policy
                label = f"delegate {d}, threads {t if t is not None else 'default'}"
                if on_error is not None and on_error(label, e):
                    continue
                raise
            reports.append(r)
            if on_report is not None:
                on_report(r)
    return reports


__all__ = ["BenchError", "BundleError", "model_block", "model_for", "resource_warnings", "run_bench", "run_matrix"]
