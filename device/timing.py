"""Timing primitives: a nanosecond stopwatch and latency statistics.

Everything is measured with ``time.perf_counter_ns`` (monotonic, highest
resolution) and reported in milliseconds as floats. Pure Python on purpose:
these run inside hot loops and must not import anything heavy.
"""
from __future__ import annotations

import math
import time
from contextlib import contextmanager
from typing import Dict, Iterable, Iterator, Optional, Sequence

now_ns = time.perf_counter_ns

STAT_KEYS = ("n", "mean", "std", "min", "p50", "p90", "p99", "max")


def ns_to_ms(ns: int) -> float:
    """Nanoseconds (int) to milliseconds (float)."""
    return ns / 1e6


def percentile(sorted_values: Sequence[float], q: float) -> Optional[float]:
    """The q-th percentile (0..100) of already *sorted* values.

    Linear interpolation between closest ranks, the same definition as
    ``numpy.percentile``'s default, so figures agree with other tools.
    """
    n = len(sorted_values)
    if n == 0:
        return None
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile must be within [0, 100], got {q}")
    pos = (n - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, n - 1)
    frac = pos - lo
    return float(sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * frac)


def stats(samples_ms: Iterable[float]) -> dict:
    """Summary of latency samples: n, mean, std, min, p50, p90, p99, max.

    ``std`` is the population standard deviation (ddof=0), as TFLite's
    benchmark tool reports it. An empty input gives ``n == 0`` and ``None``
    for every other figure (valid against the report schema).
    """
    values = sorted(float(x) for x in samples_ms)
    n = len(values)
    if n == 0:
        return {"n": 0, "mean": None, "std": None, "min": None, "p50": None,
                "p90": None, "p99": None, "max": None}
    mean = math.fsum(values) / n
    var = math.fsum((x - mean) ** 2 for x in values) / n
    return {
        "n": n,
        "mean": mean,
        "std": math.sqrt(var),
        "min": values[0],
        "p50": percentile(values, 50),
        "p90": percentile(values, 90),
        "p99": percentile(values, 99),
        "max": values[-1],
    }


class Stopwatch:
    """Elapsed time since ``start()`` plus named laps.

    >>> sw = Stopwatch()
    >>> with sw.lap("file_read"):
    ...     data = b"..."
    >>> sw.laps["file_read"]  # milliseconds
    """

    __slots__ = ("_t0", "laps")

    def __init__(self, start: bool = True):
        self._t0 = now_ns() if start else None
        self.laps: Dict[str, float] = {}

    def start(self) -> "Stopwatch":
        self._t0 = now_ns()
        return self

    def elapsed_ms(self) -> float:
        """Milliseconds since start (or construction)."""
        if self._t0 is None:
            raise RuntimeError("Stopwatch was never started")
        return ns_to_ms(now_ns() - self._t0)

    @contextmanager
    def lap(self, name: str) -> Iterator[None]:
        """Time the ``with`` block and add it to ``laps[name]`` (ms; repeats accumulate)."""
        t0 = now_ns()
        try:
            yield
        finally:
            self.laps[name] = self.laps.get(name, 0.0) + ns_to_ms(now_ns() - t0)
