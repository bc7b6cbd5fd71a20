"""Model outputs -> one prediction record (a JSON-ready dict) per frame.

Classification: top-k of the dequantized scores with labels. Other tasks
(detection heads, embeddings, anything we do not decode): a summary of every
raw output (shape, min/max/mean, argmax) so a run still shows what the model
produced. Records hold no timings, so pipelined and sequential runs of the
same frames produce byte-identical prediction lines.
"""
from __future__ import annotations

import json
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np

from edgepipe.device.bundle import Task

SCORE_DECIMALS = 6


def _num(v: float) -> Optional[float]:
    """A JSON-safe rounded number (NaN/inf become null: a broken model must not break the stream)."""
    v = float(v)
    return round(v, SCORE_DECIMALS) if np.isfinite(v) else None


def infer_task(outputs: Sequence[Any]) -> Tuple[Task, List[str]]:
    """Task for a model without a manifest: one (1, N>1) output reads as classification."""
    if len(outputs) == 1:
        shape = tuple(outputs[0].shape)
        if len(shape) == 2 and shape[0] == 1 and shape[1] > 1:
            return Task.CLASSIFICATION, [f"no manifest: the single {shape} output is read as class scores"]
    return Task.OTHER, ["no manifest: outputs are summarised, not decoded"]


class Postprocessor:
    """Turns a frame's raw outputs into a prediction record."""

    def __init__(self, outputs: Sequence[Any], task: Task = Task.OTHER, labels: Sequence[str] = (),
                 top_k: int = 5):
        """``outputs`` are the runtime's TensorSpecs (for dequantization)."""
        self.outputs = tuple(outputs)
        self.task = Task(task)
        self.labels = tuple(labels)
        self.top_k = max(1, int(top_k))
        # The background-class convention (1001 outputs, 1000 labels): shift by one.
        self._label_offset = 0
        if self.task == Task.CLASSIFICATION and self.outputs and self.labels:
            n = int(np.prod(self.outputs[0].shape))
            if n == len(self.labels) + 1:
                self._label_offset = 1
        if self.task == Task.CLASSIFICATION and not self.outputs:
            raise ValueError("a classification model needs an output")

    def label(self, index: int) -> Optional[str]:
        j = index - self._label_offset
        if 0 <= j < len(self.labels):
            return self.labels[j]
        return "background" if self._label_offset and index == 0 else None

    def __call__(self, raw: Sequence[np.ndarray]) -> dict:
        """A record for raw outputs (as returned by ``LoadedModel.get_output``)."""
        if self.task == Task.CLASSIFICATION:
            scores = self.outputs[0].dequantize(raw[0]).reshape(-1)
            k = min(self.top_k, scores.size)
            # Stable descending order: ties keep the lower class index first.
            top = np.argsort(-np.nan_to_num(scores, nan=-np.inf), kind="stable")[:k]
            return {"top_k": [{"index": int(i), "label": self.label(int(i)),
                               "score": _num(scores[i])} for i in top]}
        return {"outputs": [summarize(spec, r) for spec, r in zip(self.outputs, raw)]}


def summarize(spec: Any, raw: np.ndarray) -> dict:
    """Shape, dtype, dequantized min/max/mean and the argmax (flat and as an index tuple)."""
    x = spec.dequantize(raw)
    d = {"name": spec.name, "shape": [int(s) for s in np.shape(raw)], "dtype": str(np.asarray(raw).dtype)}
    if x.size == 0:
        return d
    flat = int(np.argmax(x))
    d.update(min=round(float(np.min(x)), SCORE_DECIMALS), max=round(float(np.max(x)), SCORE_DECIMALS),
             mean=round(float(np.mean(x, dtype=np.float64)), SCORE_DECIMALS), argmax=flat,
             argmax_index=[int(i) for i in np.unravel_index(flat, x.shape)])
    return d


def json_line(record: dict) -> str:
    """One prediction as a compact JSON line (no trailing newline)."""
    return json.dumps(record, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


__all__ = ["Postprocessor", "infer_task", "json_line", "summarize"]
