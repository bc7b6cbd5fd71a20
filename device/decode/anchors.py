"""SSD anchors from recorded generator options (MediaPipe's SsdAnchorsCalculator rules).

The same rules as the TF Object Detection API's ``ssd_anchor_generator``
(``MultipleGridAnchorGenerator``): per layer, scales interpolate linearly from
``min_scale`` to ``max_scale``; the lowest layer may use the reduced set
{(0.1, 1), (s, 2), (s, 0.5)}; each layer adds one anchor of the geometric
mean of its scale and the next layer's at ``interpolated_scale_aspect_ratio``.
Anchors are returned as (N, 4) ``y_centre, x_centre, h, w`` normalised.
"""
from __future__ import annotations

import math
from typing import List, Tuple

import numpy as np

from edgepipe.device.decode.spec import AnchorOptions, DecodeError


def _scale(lo: float, hi: float, index: int, count: int) -> float:
    return (lo + hi) * 0.5 if count == 1 else lo + (hi - lo) * index / (count - 1.0)


def _layer_shapes(o: AnchorOptions, first: int, last: int) -> Tuple[List[float], List[float]]:
    """Heights and widths of the anchors at each cell for layers [first, last) (same stride)."""
    ratios: List[float] = []
    scales: List[float] = []
    n = len(o.strides)
    for layer in range(first, last):
        s = _scale(o.min_scale, o.max_scale, layer, n)
        if layer == 0 and o.reduce_boxes_in_lowest_layer:
            ratios += [1.0, 2.0, 0.5]
            scales += [0.1, s, s]
            continue
        ratios += list(o.aspect_ratios)
        scales += [s] * len(o.aspect_ratios)
        if o.interpolated_scale_aspect_ratio > 0.0:
            nxt = 1.0 if layer == n - 1 else _scale(o.min_scale, o.max_scale, layer + 1, n)
            scales.append(math.sqrt(s * nxt))
            ratios.append(o.interpolated_scale_aspect_ratio)
    heights = [s / math.sqrt(r) for s, r in zip(scales, ratios)]
    widths = [s * math.sqrt(r) for s, r in zip(scales, ratios)]
    return heights, widths


def ssd_anchors(o: AnchorOptions) -> np.ndarray:
    """All anchors, (N, 4) float32 ``y_centre, x_centre, h, w``, in the model's output order."""
    out = []
    layer = 0
    while layer < o.num_layers:
        last = layer
        while last < len(o.strides) and o.strides[last] == o.strides[layer]:
            last += 1
        heights, widths = _layer_shapes(o, layer, last)
        if o.feature_map_height:
            fh, fw = o.feature_map_height[layer], o.feature_map_width[layer]
        else:
            fh = math.ceil(o.input_size_height / o.strides[layer])
            fw = math.ceil(o.input_size_width / o.strides[layer])
        ys = (np.arange(fh, dtype=np.float64) + o.anchor_offset_y) / fh
        xs = (np.arange(fw, dtype=np.float64) + o.anchor_offset_x) / fw
        k = len(heights)
        yc = np.repeat(ys, fw * k)
        xc = np.tile(np.repeat(xs, k), fh)
        if o.fixed_anchor_size:
            h = w = np.ones(fh * fw * k)
        else:
            h, w = np.tile(heights, fh * fw), np.tile(widths, fh * fw)
        out.append(np.stack([yc, xc, h, w], axis=1))
        layer = last
    if not out:
        raise DecodeError("anchor options produce no anchors")
    return np.concatenate(out).astype(np.float32)
