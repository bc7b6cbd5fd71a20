"""Activation ranges of a calibrated TFLite model: recorded min/max, histograms over the calibration
images, clipped ranges (percentile, MSE), and writing ranges back (see :mod:`edgepipe.pipeline.ptq`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Tuple

import numpy as np

from edgepipe.pipeline.tfenv import captured_output

BINS = 2048
LEVELS = 256  # int8 activations


@dataclass
class Histogram:
    """Values of one activation over the calibration images, in BINS bins over its recorded [lo, hi]."""

    lo: float
    hi: float
    counts: np.ndarray = field(default_factory=lambda: np.zeros(BINS, np.int64))

    def add(self, x: np.ndarray) -> None:
        if self.hi <= self.lo:
            return
        idx = ((x.reshape(-1) - self.lo) * (BINS / (self.hi - self.lo))).astype(np.int64)
        np.clip(idx, 0, BINS - 1, out=idx)
        self.counts += np.bincount(idx, minlength=BINS)

    def centers(self) -> np.ndarray:
        w = (self.hi - self.lo) / BINS
        return self.lo + (np.arange(BINS) + 0.5) * w


def clip_range(h: Histogram, ranges: str) -> Tuple[float, float]:
    if ranges == "minmax" or h.counts.sum() == 0:
        return h.lo, h.hi
    if ranges.startswith("percentile:"):
        p = float(ranges.split(":", 1)[1]) / 100.0
        cdf = np.cumsum(h.counts) / h.counts.sum()
        edges = h.lo + np.arange(1, BINS + 1) * ((h.hi - h.lo) / BINS)
        hi = float(edges[min(BINS - 1, np.searchsorted(cdf, p))])
        lo = h.lo if h.lo >= 0 else float(edges[max(0, np.searchsorted(cdf, 1.0 - p) - 1)])
        return lo, hi
    return _mse_range(h)


def _mse_range(h: Histogram) -> Tuple[float, float]:
    """The shrink of [lo, hi] (towards 0, both ends alike) with the least expected squared error."""
    c, n = h.centers(), h.counts.astype(np.float64)
    best, best_err = (h.lo, h.hi), np.inf
    for s in np.linspace(0.2, 1.0, 81):
        lo, hi = h.lo * s, h.hi * s
        step = (hi - lo) / (LEVELS - 1)
        clipped = np.clip(c, lo, hi)
        err = float(np.sum(n * ((c - clipped) ** 2 + np.where(c == clipped, step * step / 12.0, 0.0))))
        if err < best_err:
            best, best_err = (lo, hi), err
    return best


def recorded_ranges(model: bytes) -> Dict[int, Tuple[float, float]]:
    """Tensor index -> recorded (min, max) of subgraph 0's non-constant tensors."""
    from tensorflow.lite.tools import flatbuffer_utils as fu

    m = fu.read_model_from_bytearray(bytearray(model))
    g = m.subgraphs[0]
    ends = set(g.inputs) | set(g.outputs)
    out = {}
    for i, t in enumerate(g.tensors):
        q = t.quantization
        if i in ends or q is None or q.min is None or q.max is None or len(q.min) != 1:
            continue
        if m.buffers[t.buffer].data is not None:  # constants (weights) are quantized from their values
            continue
        out[i] = (float(q.min[0]), float(q.max[0]))
    return out


def histograms(tf, model: bytes, xs: np.ndarray) -> Dict[int, Histogram]:
    hists = {i: Histogram(lo, hi) for i, (lo, hi) in recorded_ranges(model).items()}
    with captured_output():
        interp = tf.lite.Interpreter(model_content=model, experimental_preserve_all_tensors=True)
        interp.allocate_tensors()
    inp = interp.get_input_details()[0]["index"]
    for x in xs:
        interp.set_tensor(inp, x[None])
        interp.invoke()
        for i, h in hists.items():
            h.add(interp.get_tensor(i))
    return hists


def with_ranges(model: bytes, ranges: Dict[int, Tuple[float, float]]) -> bytes:
    from tensorflow.lite.tools import flatbuffer_utils as fu

    m = fu.read_model_from_bytearray(bytearray(model))
    tensors = m.subgraphs[0].tensors
    for i, (lo, hi) in ranges.items():
        tensors[i].quantization.min = [float(lo)]
        tensors[i].quantization.max = [float(hi)]
    return bytes(fu.convert_object_to_bytearray(m))


__all__ = ["BINS", "LEVELS", "Histogram", "clip_range", "histograms", "recorded_ranges", "with_ranges"]
