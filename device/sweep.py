"""`edgerun bench --threads auto`: try 1..cores threads and say which count is fastest on this board.

Two questions, two answers: the lowest p50 latency (one request at a time,
``threads`` per interpreter) and the most inferences/s (throughput mode with
cores // threads streams of ``threads`` each). Every measured setting is an
ordinary ``bench`` report; each carries the sweep's summary in
``settings.thread_sweep`` so the collector and ``edgepipe report`` can show the
answer per device and model.
"""
from __future__ import annotations

import os
from typing import Callable, List, Optional, Sequence

from edgepipe.device.throughput import cores

MAX_SWEEP = 16  # a 64-core server would otherwise run 64 benches


def thread_counts(max_threads: Optional[int] = None) -> List[int]:
    """1..cores (capped at ``MAX_SWEEP``), or 1..max_threads."""
    return list(range(1, min(max_threads or cores(), MAX_SWEEP) + 1))


def run_sweep(bundle_path: os.PathLike, *, delegate: str = "cpu", counts: Optional[Sequence[int]] = None,
              throughput: bool = True, on_report: Optional[Callable[[dict], None]] = None, **kw) -> List[dict]:
    """Latency (and throughput) benches per thread count; returns the reports, each with ``thread_sweep``.

    ``kw`` goes to :func:`edgepipe.device.bench.run_bench` and
    :func:`edgepipe.device.throughput.run_throughput` (runs, warmup, min_secs, input, backend, seed ...).
    Throughput runs only on the CPU delegate (one accelerator cannot be shared by streams).
    """
    from edgepipe.device.bench import run_bench
    from edgepipe.device.throughput import run_throughput

    counts = list(counts or thread_counts())
    reports: List[dict] = []
    for t in counts:
        reports.append(run_bench(bundle_path, threads=t, delegate=delegate, **kw))
    if throughput and delegate in ("cpu", "xnnpack"):
        for t in counts:
            streams = max(1, cores() // t)
            reports.append(run_throughput(bundle_path, streams=streams, threads=t, delegate=delegate, **kw))
    summary = summarize(reports)
    for r in reports:
        r.setdefault("settings", {})["thread_sweep"] = summary
        if on_report is not None:
            on_report(r)
    return reports


def _is_throughput(r: dict) -> bool:
    return (r.get("throughput") or {}).get("mode") == "throughput"


def _row(r: dict) -> dict:
    tp, lat = r.get("throughput") or {}, r.get("latency_ms") or {}
    return {"threads": (r.get("runtime") or {}).get("threads"), "mode": "throughput" if _is_throughput(r)
            else "latency", "streams": tp.get("streams") or 1, "p50_ms": lat.get("p50"), "fps": tp.get("fps")}


def _pick(keys: Sequence[str], best: Optional[dict]) -> Optional[dict]:
    return {k: best[k] for k in keys} if best else None


def summarize(reports: Sequence[dict]) -> dict:
    """Per thread count: p50 and inferences/s; the fastest count for each."""
    rows = [_row(r) for r in reports]
    lat_rows = [x for x in rows if x["mode"] == "latency" and x["p50_ms"] is not None]
    fps_rows = [x for x in rows if x["fps"] is not None]
    best_lat = min(lat_rows, key=lambda x: x["p50_ms"], default=None)
    best_fps = max(fps_rows, key=lambda x: x["fps"], default=None)
    return {
        "tried": sorted({x["threads"] for x in rows if x["threads"] is not None}),
        "cores": cores(),
        "rows": rows,
        "best_latency": _pick(("threads", "p50_ms", "fps"), best_lat),
        "best_throughput": _pick(("threads", "streams", "fps", "mode"), best_fps),
    }


def format_sweep(summary: dict) -> str:
    """A few lines: the table of thread counts and the answer."""
    head = f"{'threads':>7} {'mode':<10} {'streams':>7} {'p50 ms':>9} {'inf/s':>8}"
    lines = ["thread sweep", head, "-" * len(head)]
    for x in summary.get("rows") or []:
        p50 = "-" if x["p50_ms"] is None else f"{x['p50_ms']:.2f}"
        fps = "-" if x["fps"] is None else f"{x['fps']:.1f}"
        lines.append(f"{x['threads']:>7} {x['mode']:<10} {x['streams']:>7} {p50:>9} {fps:>8}")
    bl, bt = summary.get("best_latency"), summary.get("best_throughput")
    if bl:
        lines.append(f"fastest single request: {bl['threads']} thread(s), p50 {bl['p50_ms']:.2f} ms")
    if bt:
        how = (f"{bt['streams']} stream(s) x {bt['threads']} thread(s)" if bt["mode"] == "throughput"
               else f"{bt['threads']} thread(s), one request at a time")
        lines.append(f"most inferences/s:      {how}, {bt['fps']:.1f} inferences/s")
    return "\n".join(lines)


__all__ = ["MAX_SWEEP", "format_sweep", "run_sweep", "summarize", "thread_counts"]
