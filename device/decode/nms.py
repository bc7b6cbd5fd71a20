"""Vectorised non-maximum suppression (greedy, like TFLite's and torchvision's).

Boxes are (N, 4) ``x0, y0, x1, y1`` in any consistent unit. Per-class NMS uses
the coordinate-offset trick: every class's boxes are shifted into their own
region of the plane, so one pass over all boxes never suppresses across
classes and stays vectorised.
"""
from __future__ import annotations

import numpy as np


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Intersection over union of every box in ``a`` (N, 4) with every box in ``b`` (M, 4)."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    area_a = np.clip(a[:, 2] - a[:, 0], 0, None) * np.clip(a[:, 3] - a[:, 1], 0, None)
    area_b = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = np.clip(rb - lt, 0, None)
    inter = wh[..., 0] * wh[..., 1]
    union = area_a[:, None] + area_b[None, :] - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(union > 0, inter / union, 0.0)


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float, max_out: int = 0) -> np.ndarray:
    """Indices of the kept boxes, highest score first.

    Greedy: take the best remaining box, drop every remaining box whose IoU
    with it is > ``iou_threshold``, repeat. Ties keep the lower index first.
    The IoU of each pick against all remaining candidates is one vector
    operation, so the loop runs once per kept box, not per pair.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    order = np.argsort(-scores, kind="stable")
    keep = []
    x0, y0, x1, y1 = boxes.T
    areas = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    while order.size:
        i = order[0]
        keep.append(i)
        if max_out and len(keep) >= max_out:
            break
        rest = order[1:]
        w = np.clip(np.minimum(x1[i], x1[rest]) - np.maximum(x0[i], x0[rest]), 0, None)
        h = np.clip(np.minimum(y1[i], y1[rest]) - np.maximum(y0[i], y0[rest]), 0, None)
        inter = w * h
        union = areas[i] + areas[rest] - inter
        with np.errstate(divide="ignore", invalid="ignore"):
            iou = np.where(union > 0, inter / union, 0.0)
        order = rest[iou <= iou_threshold]
    return np.asarray(keep, dtype=np.int64)


def batched_nms(boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray, iou_threshold: float,
                max_out: int = 0, class_agnostic: bool = False) -> np.ndarray:
    """NMS within each class (or across all when ``class_agnostic``); indices, best first."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    if class_agnostic or boxes.shape[0] == 0:
        return nms(boxes, scores, iou_threshold, max_out)
    classes = np.asarray(classes).reshape(-1).astype(np.float64)
    # Shift each class past every other class's boxes: no cross-class overlap.
    span = float(np.max(boxes) - np.min(boxes)) + 1.0
    shifted = boxes + (classes * span)[:, None]
    return nms(shifted, scores, iou_threshold, max_out)
