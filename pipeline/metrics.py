"""Accuracy and agreement metrics on plain numpy arrays.

Everything here works on model outputs already dequantized to float (one row
per image), so it is shared by `edgepipe evaluate`, selective quantization and
the ablation runner, and is tested without any runtime.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional, Sequence

import numpy as np
from edgepipe.device.errors import EdgepipeError


class MetricsError(EdgepipeError, ValueError):
    """Inputs that cannot be compared; the message is one line for the user."""


def _as_2d(outputs, what: str) -> np.ndarray:
    a = np.asarray(outputs, dtype=np.float64)
    if a.ndim == 1:
        a = a[:, None]
    if a.ndim != 2:
        a = a.reshape(a.shape[0], -1)
    if a.shape[0] == 0:
        raise MetricsError(f"{what}: no outputs to compare")
    return a


def topk_accuracy(outputs, labels: Sequence[int], k: int = 1) -> float:
    """Fraction of rows whose true label is among the ``k`` highest scores.

    Ties are broken towards the lower class index, like ``argmax``.
    """
    scores = _as_2d(outputs, "outputs")
    y = np.asarray(labels, dtype=np.int64).reshape(-1)
    if y.shape[0] != scores.shape[0]:
        raise MetricsError(f"labels: {y.shape[0]} labels for {scores.shape[0]} outputs")
    n_classes = scores.shape[1]
    if y.size and (y.min() < 0 or y.max() >= n_classes):
        raise MetricsError(f"labels: class index {int(y.max())} out of range for a model "
                           f"with {n_classes} outputs")
    k = max(1, min(int(k), n_classes))
    # Stable sort on -score keeps the lower index first among equal scores.
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return float(np.mean(np.any(top == y[:, None], axis=1)))


def top1_agreement(outputs, reference) -> float:
    """Fraction of rows where both models pick the same top-1 class."""
    a, b = _as_2d(outputs, "outputs"), _as_2d(reference, "reference")
    _check_same(a, b)
    return float(np.mean(np.argmax(a, axis=1) == np.argmax(b, axis=1)))


def _check_same(a: np.ndarray, b: np.ndarray) -> None:
    if a.shape != b.shape:
        raise MetricsError(f"reference: output shape {tuple(b.shape[1:])} does not match the "
                           f"model's {tuple(a.shape[1:])} (rows {b.shape[0]} vs {a.shape[0]})")


def snr_db(outputs, reference) -> float:
    """Signal-to-noise ratio of ``outputs`` against ``reference`` in dB.

    ``10 log10(sum(ref^2) / sum((out - ref)^2))``; ``inf`` for identical outputs.
    """
    a, b = _as_2d(outputs, "outputs"), _as_2d(reference, "reference")
    _check_same(a, b)
    noise = float(np.sum((a - b) ** 2))
    signal = float(np.sum(b ** 2))
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def mean_cosine(outputs, reference) -> float:
    """Mean over rows of the cosine similarity between output vectors.

    A row where both vectors are zero counts as 1 (identical); one zero vector
    against a non-zero one counts as 0.
    """
    a, b = _as_2d(outputs, "outputs"), _as_2d(reference, "reference")
    _check_same(a, b)
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    dot = np.sum(a * b, axis=1)
    cos = np.where((na > 0) & (nb > 0), dot / np.maximum(na * nb, 1e-300), 0.0)
    cos = np.where((na == 0) & (nb == 0), 1.0, cos)
    return float(np.mean(cos))


@dataclass(frozen=True)
class Agreement:
    """How closely a variant's outputs follow the float reference."""

    n: int
    top1_agreement: float
    mean_abs: float
    max_abs: float
    cosine: float
    snr_db: float  # math.inf when the outputs are identical

    def to_dict(self) -> dict:
        d = asdict(self)
        d["snr_db"] = json_number(self.snr_db)
        return d


def compare_outputs(outputs, reference) -> Agreement:
    """All agreement numbers of ``outputs`` against ``reference`` (rows = images)."""
    a, b = _as_2d(outputs, "outputs"), _as_2d(reference, "reference")
    _check_same(a, b)
    diff = np.abs(a - b)
    return Agreement(
        n=int(a.shape[0]),
        top1_agreement=top1_agreement(a, b),
        mean_abs=float(diff.mean()),
        max_abs=float(diff.max()),
        cosine=mean_cosine(a, b),
        snr_db=snr_db(a, b),
    )


def accuracy_block(outputs, labels: Optional[Sequence[int]]) -> dict:
    """``{"top1": .., "top5": ..}`` or ``{}`` without labels.

    top-5 is only reported when the model has more than 5 classes (otherwise it
    is trivially 1.0 and says nothing).
    """
    if labels is None:
        return {}
    scores = _as_2d(outputs, "outputs")
    out = {"top1": topk_accuracy(scores, labels, 1)}
    if scores.shape[1] > 5:
        out["top5"] = topk_accuracy(scores, labels, 5)
    return out


def json_number(x: Optional[float]):
    """A float JSON can carry: infinities become None (documented as 'identical')."""
    if x is None or (isinstance(x, float) and (math.isinf(x) or math.isnan(x))):
        return None
    return float(x)


def fmt_snr(x: Optional[float]) -> str:
    if x is None or (isinstance(x, float) and math.isinf(x) and x > 0):
        return "inf"
    return f"{x:.1f}"
