"""The search behind ``--target-agreement``: which of the ranked layers to keep float, and what each costs.

Each float-kept layer set is quantized and run once (cached); agreement grows,
roughly monotonically, with every layer kept in float, so the shortest
reaching prefix is found by an exponential probe then a binary search, and
each kept layer is dropped again in case a later one made it redundant.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np

from edgepipe.pipeline import metrics
from edgepipe.pipeline.layer_error import Debugged, LayerError
from edgepipe.pipeline.model_run import p50_ms, run_tflite

MAX_TIMED_LAYERS = 12


class Search:
    """Agreement of float-kept layer sets (each quantized and run once), and the search over them."""

    def __init__(self, dbg: Debugged, ex: np.ndarray, ref: np.ndarray, target: float,
                 threads: Optional[int], say: Callable[[str], None]):
        self.dbg, self.ex, self.ref, self.target, self.threads, self.say = dbg, ex, ref, target, threads, say
        self.cache: dict = {}
        self.steps: list = []
        self.baseline = self.agreement_of([])
        self.steps.append({"float_layers": 0, "agreement": self.baseline})

    def _entry(self, kept: Sequence[LayerError]) -> tuple:
        key = frozenset(e.tensor for e in kept)
        if key not in self.cache:
            model = self.dbg.quantize([e.tensor for e in kept])
            out = run_tflite(model, self.ex, threads=self.threads)
            self.cache[key] = (metrics.top1_agreement(out, self.ref), model)
            self.say(f"{len(kept)} float layer(s): agreement {self.cache[key][0]:.4f}")
        return self.cache[key]

    def agreement_of(self, kept: Sequence[LayerError]) -> float:
        return self._entry(kept)[0]

    def model_of(self, kept: Sequence[LayerError]) -> bytes:
        return self._entry(kept)[1]

    def reaches(self, kept: Sequence[LayerError]) -> bool:
        return self.agreement_of(kept) >= self.target

    def _check(self, ranked: list, k: int) -> bool:
        a = self.agreement_of(ranked[:k])
        self.steps.append({"float_layers": k, "agreement": a})
        return a >= self.target

    def shortest_prefix(self, ranked: list, limit: int) -> list:
        """The shortest prefix of ``ranked`` reaching the target (the longest tried when none does)."""
        if self.baseline >= self.target:
            return []
        # Exponential probe, then binary search on the prefix length.
        lo, hi, k = 0, None, 1
        while k <= limit:
            if self._check(ranked, k):
                hi = k
                break
            lo = k
            k = limit if k * 2 > limit and k < limit else k * 2
        if hi is None:
            return list(ranked[:lo])
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self._check(ranked, mid):
                hi = mid
            else:
                lo = mid
        return list(ranked[:hi])

    def prune(self, kept: list) -> list:
        """Drop each kept layer again: a later layer may have fixed what an earlier one was kept for."""
        for e in list(kept):
            trial = [x for x in kept if x.tensor != e.tensor]
            a = self.agreement_of(trial)
            self.steps.append({"float_layers": len(trial), "agreement": a, "dropped": e.layer})
            if a >= self.target:
                kept = trial
        return kept


def float_layer_costs(dbg: Debugged, kept: list, ex: np.ndarray, threads: Optional[int],
                       say: Callable[[str], None]) -> list:
    """p50 latency as the kept layers go float one by one (or all at once past a handful)."""
    say("timing the cost of each float layer")
    prev = p50_ms(dbg.quantize([]), ex, threads=threads)
    latency = [{"layer": None, "float_layers": 0, "p50_ms": prev, "cost_ms": 0.0}]
    # One re-quantization + benchmark per kept layer; past a handful the
    # per-layer split is noise, so only the total is measured.
    steps_to_time = range(1, len(kept) + 1) if len(kept) <= MAX_TIMED_LAYERS else [len(kept)]
    for i in steps_to_time:
        cur = p50_ms(dbg.quantize([e.tensor for e in kept[:i]]), ex, threads=threads)
        latency.append({"layer": kept[i - 1].layer if len(steps_to_time) > 1 else "(all kept)",
                        "tensor": kept[i - 1].tensor if len(steps_to_time) > 1 else None,
                        "float_layers": i, "p50_ms": cur, "cost_ms": cur - prev})
        prev = cur
    return latency


__all__ = ["MAX_TIMED_LAYERS", "Search", "float_layer_costs"]
