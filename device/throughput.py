"""`edgerun bench --mode throughput`: N interpreters invoking concurrently, inferences per second as the figure.

Each stream owns its interpreter (same model, delegate and thread count) and
its own thread; ``invoke`` releases the GIL, so streams run in parallel on
separate cores, like OpenVINO's ``benchmark_app -hint throughput``. Per-request
latency is still timed around each ``invoke`` alone; inferences/s is every
completed request over the wall time from the common start to the last
finish; CPU usage is the process's user+system time over that wall time.
"""
from __future__ import annotations

import os
import resource
import threading
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

from edgepipe.device.errors import NATIVE_ERRORS, EdgepipeError
from edgepipe.device.timing import now_ns, ns_to_ms, stats

MAX_STREAMS = 64
POLL_SECS = 0.02


class ThroughputError(EdgepipeError):
    """A throughput bench that cannot run; one line for the user."""


def cores() -> int:
    """CPUs this process may run on (the affinity mask, not the machine's total)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def default_streams(threads: Optional[int], model_size: int, n_cores: Optional[int] = None) -> int:
    """One stream per ``threads`` of ``n_cores`` (default: :func:`cores`), as many as fit in memory; also the
    runner's default lanes."""
    from edgepipe.device.lane_probe import lanes_that_fit

    return lanes_that_fit(max(1, (n_cores or cores()) // max(1, threads or 1)), model_size)


@dataclass
class _Stream:
    loaded: object
    samples_ns: List[int]
    first_ns: int = 0
    last_ns: int = 0
    error: Optional[BaseException] = None


def _worker(s: _Stream, arrays: Sequence, warmup: int, go: threading.Barrier, stop: threading.Event) -> None:
    loaded = s.loaded
    try:
        for i, a in enumerate(arrays):
            loaded.set_input(i, a)
        for _ in range(warmup):
            loaded.invoke()
    except NATIVE_ERRORS as e:
        s.error = e
    go.wait()
    if s.error is not None:
        return
    invoke, append = loaded.invoke, s.samples_ns.append
    s.first_ns = now_ns()
    try:
        while not stop.is_set():
            t0 = now_ns()
            invoke()
            t1 = now_ns()
            append(t1 - t0)
        s.last_ns = t1 if s.samples_ns else s.first_ns
    except NATIVE_ERRORS as e:
        s.error = e
        s.last_ns = now_ns()


def _wait(streams: Sequence[_Stream], runs: int, min_secs: float, max_secs: Optional[float],
          progress: Optional[Callable[[int], None]]) -> None:
    """Return once ``runs`` requests finished and ``min_secs`` passed (or ``max_secs``, or a stream failed)."""
    t0 = now_ns()
    min_ns, max_ns = int(min_secs * 1e9), int(max_secs * 1e9) if max_secs else None
    stop_event = threading.Event()
    while True:
        stop_event.wait(POLL_SECS)
        done = sum(len(s.samples_ns) for s in streams)
        elapsed = now_ns() - t0
        if progress is not None:
            progress(done)
        if (done >= runs and elapsed >= min_ns) or (max_ns and elapsed >= max_ns) \
                or any(s.error is not None for s in streams):
            return


def measure(models: Sequence, arrays: Sequence, *, runs: int = 50, warmup: int = 5, min_secs: float = 1.0,
            max_secs: Optional[float] = None, progress: Optional[Callable[[int], None]] = None) -> dict:
    """Drive one stream per loaded model; returns ``{samples_ns, wall_ns, cpu_s, per_stream}``.

    ``arrays`` are one input set (raw tensors in input order), copied into every interpreter.
    """
    streams = [_Stream(m, []) for m in models]
    go, stop = threading.Barrier(len(streams) + 1), threading.Event()
    threads = [threading.Thread(target=_worker, args=(s, arrays, warmup, go, stop), daemon=True,
                                name=f"edgerun-stream-{i}") for i, s in enumerate(streams)]
    for t in threads:
        t.start()
    go.wait()
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    try:
        _wait(streams, runs, min_secs, max_secs, progress)
    finally:
        stop.set()
        for t in threads:
            t.join()
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    failed = [s.error for s in streams if s.error is not None]
    if failed:
        raise failed[0]
    begin = min(s.first_ns for s in streams)
    end = max(s.last_ns for s in streams)
    return {"samples_ns": [x for s in streams for x in s.samples_ns], "wall_ns": max(1, end - begin),
            "cpu_s": (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime),
            "per_stream": [len(s.samples_ns) for s in streams]}


def run_throughput(bundle_path: os.PathLike, *, streams: Optional[int] = None, threads: Optional[int] = None,
                   delegate: str = "cpu", runs: int = 50, warmup: int = 5, min_secs: float = 1.0,
                   max_secs: Optional[float] = None, input: str = "random", backend: Optional[str] = None,
                   seed: int = 0, edgetpu_device: Optional[str] = None,
                   progress: Optional[Callable[[int], None]] = None) -> dict:
    """Benchmark one bundle or ``.tflite`` with ``streams`` concurrent interpreters; returns a ``bench`` report.

    ``threads`` is per interpreter (default 1). ``streams`` defaults to
    cores // threads, fewer when the copies would not fit in memory. Raises
    ThroughputError, BenchError, BundleError, RuntimeLoadError or ModelRunError.
    """
    from edgepipe.device import sysinfo
    from edgepipe.device.bench import _bench_inputs, _check_counts, model_for
    from edgepipe.device.bundle import load_bundle
    from edgepipe.device.runtime import Stage, load_model, model_stage

    _check_counts(runs, warmup, min_secs)
    if streams is not None and not 1 <= streams <= MAX_STREAMS:
        raise ThroughputError(f"streams must be between 1 and {MAX_STREAMS}, got {streams}")
    threads = threads or 1
    bundle = load_bundle(bundle_path)
    model_path = model_for(bundle, delegate)
    device = sysinfo.device_info()
    start = sysinfo.start_snapshot(device)

    def load():
        return load_model(model_path, backend=backend, delegate=delegate, threads=threads,
                          edgetpu_device=edgetpu_device)

    first = load()
    cpu = first.delegate in ("cpu", "xnnpack")
    n = streams or (default_streams(threads, first.model_size) if cpu else 1)
    if n > 1 and not cpu:
        raise ThroughputError(f"several streams need the CPU delegate ({first.delegate} drives one device); "
                              "use one stream")
    models = [first] + [load() for _ in range(n - 1)]
    inputs = _bench_inputs(bundle, model_path, first, input, seed)
    with model_stage(first.path, Stage.SET_INPUTS):
        for i, a in enumerate(inputs.sets[0]):
            first.set_input(i, a)
    first.first_invoke()  # the cold figure, as in a latency bench
    with model_stage(first.path, Stage.INVOKE):
        m = measure(models, inputs.sets[0], runs=runs, warmup=warmup, min_secs=min_secs, max_secs=max_secs,
                    progress=progress)
    end = sysinfo.snapshot()
    device["temperature_c"]["end"], device["throttled"]["end"] = end["temperature_c"], end["throttled"]
    settings = {"mode": "throughput", "streams": n, "runs": runs, "warmup": warmup, "min_secs": min_secs,
                "max_secs": max_secs, "threads": threads, "delegate": delegate, "backend": backend, "seed": seed,
                "model_path": os.fspath(model_path), "timed_wall_ms": ns_to_ms(m["wall_ns"]),
                "per_stream_requests": m["per_stream"]}
    report = _report(bundle, model_path, first, device, m, n, inputs, settings)
    from edgepipe.device.bench import resource_warnings

    report["warnings"].extend(resource_warnings(start, end, first, inputs))
    return report


def _report(bundle, model_path, loaded, device: dict, m: dict, n: int, inputs, settings: dict) -> dict:
    from edgepipe.device import sysinfo
    from edgepipe.device.bench import model_block
    from edgepipe.device.report import new_report

    wall_s = m["wall_ns"] / 1e9
    total = len(m["samples_ns"])
    cpu_pct = 100.0 * m["cpu_s"] / wall_s if wall_s else None
    runtime = loaded.runtime_dict()
    runtime["load"] = "cold"
    return new_report(
        "bench", device=device, runtime=runtime, model=model_block(bundle, model_path),
        load_ms=dict(loaded.load_ms), latency_ms=stats(ns_to_ms(s) for s in m["samples_ns"]),
        throughput={"fps": total / wall_s if wall_s else None, "mode": "throughput", "workers": n,
                    "frames": total, "streams": n, "threads_per_stream": loaded.threads,
                    "cpu_percent": cpu_pct, "cpu_share": cpu_pct / 100.0 / cores() if cpu_pct is not None else None},
        peak_rss_mb=sysinfo.peak_rss_mb(), input=inputs.to_dict(), settings=settings,
    )


__all__ = ["BENCH_MODES", "ThroughputError", "bench_job", "cores", "default_streams", "measure", "run_throughput"]


BENCH_MODES = ("latency", "throughput")


def bench_job(bundle_dir: os.PathLike, params: dict, loaded) -> dict:
    """An agent ``bench`` job: latency (reusing the agent's warm ``loaded`` model, optional per-op profile)
    or throughput (its own ``streams`` interpreters); ``params`` as bounded by the job core."""
    from edgepipe.device.bench import BenchError, run_bench

    mode = params.get("mode") or "latency"
    if mode not in BENCH_MODES:
        raise BenchError(f"unknown bench mode {mode!r}; use latency or throughput")
    kw = {k: params[k] for k in ("runs", "warmup", "min_secs", "input", "seed") if k in params}
    common = dict(threads=params.get("threads"), delegate=params.get("delegate") or "cpu",
                  backend=params.get("backend"), **kw)
    if mode == "throughput":
        if params.get("profile_ops"):
            raise BenchError("a per-op profile needs the latency mode (one request at a time)")
        return run_throughput(bundle_dir, streams=params.get("streams"), **common)
    if params.get("streams") is not None:
        raise BenchError("streams needs the throughput mode")
    return run_bench(bundle_dir, loaded=loaded, profile_ops=bool(params.get("profile_ops")), **common)
