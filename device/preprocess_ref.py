"""Reference preprocessing: plain numpy, written from the definition in :mod:`edgepipe.device.preprocess`.

For tests and benchmarks: ``reference_preprocess`` must agree bit for bit with
the fast path (``load_image``) on every CPU, so everything after decoding is
integer arithmetic whose sums are exact in any order.
"""
from __future__ import annotations

import math
from typing import Union

import numpy as np
from PIL import Image

from edgepipe.device.bundle import ColorOrder, Preprocess, ResizeMode
from edgepipe.device.preprocess import (JPEG_SCALES, LETTERBOX_FILL, ImageInput, crop_box, letterbox_layout,
                                        mean_std)


def _ref_filter(name: str):
    def bilinear(x):
        x = np.abs(x)
        return np.where(x < 1.0, 1.0 - x, 0.0)

    def box(x):
        return np.where((x > -0.5) & (x <= 0.5), 1.0, 0.0)

    def bicubic(x, a=-0.5):
        x = np.abs(x)
        return np.where(x < 1.0, ((a + 2.0) * x - (a + 3.0)) * x * x + 1,
                        np.where(x < 2.0, (((x - 5) * x + 8) * x - 4) * a, 0.0))

    def lanczos(x):
        return np.where((x > -3.0) & (x < 3.0), np.sinc(x) * np.sinc(x / 3.0), 0.0)

    table = {"bilinear": (bilinear, 1.0), "box": (box, 0.5), "area": (box, 0.5),
             "bicubic": (bicubic, 2.0), "lanczos": (lanczos, 3.0)}
    return table[name]


PRECISION_BITS = 32 - 8 - 2  # PIL's fixed-point coefficients for 8-bit images


def _ref_resample_axis(a: np.ndarray, in0: float, in1: float, out_size: int, name: str) -> np.ndarray:
    """Resample axis 1 of the 8-bit ``a`` (rows, n, C) onto ``out_size`` samples of [in0, in1)."""
    n = a.shape[1]
    if name == "nearest":
        idx = [min(n - 1, max(0, math.floor(in0 + (i + 0.5) * (in1 - in0) / out_size))) for i in range(out_size)]
        return a[:, idx]
    # PIL takes the box as C floats and subtracts them in float precision.
    scale = float(np.float32(in1) - np.float32(in0)) / out_size
    filt, support = _ref_filter(name)
    filterscale = max(scale, 1.0)
    support *= filterscale
    idx, fixed = [], []
    for i in range(out_size):
        center = in0 + (i + 0.5) * scale
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), n)
        w = [float(v) for v in filt((np.arange(lo, hi) - center + 0.5) * (1.0 / filterscale))]
        total = 0.0
        for v in w:  # summed in order, like the C loop
            total += v
        if total != 0.0:
            w = [v / total for v in w]
        # To fixed point, rounding half away from zero ((int) truncates toward zero).
        fixed.append([int(v * (1 << PRECISION_BITS) + (0.5 if v >= 0 else -0.5)) for v in w])
        idx.append(list(range(lo, hi)))
    k_max = max(len(k) for k in fixed)
    taps = np.array([i + [i[0]] * (k_max - len(i)) for i in idx], dtype=np.int64)  # padding taps weigh 0
    weights = np.array([k + [0] * (k_max - len(k)) for k in fixed], dtype=np.int64)
    a = a.astype(np.int64)
    acc = np.full((a.shape[0], out_size) + a.shape[2:], 1 << (PRECISION_BITS - 1), dtype=np.int64)
    extra = (1,) * (a.ndim - 2)
    for k in range(k_max):  # integer sums: exact in any order
        acc += a[:, taps[:, k]] * weights[:, k].reshape((out_size,) + extra)
    out = acc >> PRECISION_BITS
    return np.clip(out, 0, 255)


def reference_preprocess(x: ImageInput, spec: Preprocess, *,
                         order: Union[str, ColorOrder] = ColorOrder.RGB) -> np.ndarray:
    """The obviously-correct implementation of the module's definition, for tests.

    Decodes JPEG paths at the same DCT scale as ``load_image`` (step 1 of the
    definition); everything after decoding is plain numpy.
    """
    order = ColorOrder(order)
    scale = 1
    if isinstance(x, np.ndarray):
        a = x[:, :, 0] if x.ndim == 3 and x.shape[2] == 1 else x
        if a.ndim == 3:
            a = a[:, :, :3]
            if order == ColorOrder.BGR:
                a = a[:, :, ::-1]
        h0, w0 = a.shape[:2]
    else:
        img = x if isinstance(x, Image.Image) else Image.open(x)
        w0, h0 = img.size
        if not isinstance(x, Image.Image) and img.format == "JPEG":
            for s in JPEG_SCALES:
                bx = crop_box(w0, h0, spec)
                if (bx[2] - bx[0]) / s >= spec.width and (bx[3] - bx[1]) / s >= spec.height:
                    scale = s
                    break
            if scale > 1:
                img.draft(img.mode, (w0 // scale, h0 // scale))
                assert img.size == (-(-w0 // scale), -(-h0 // scale)), "PIL chose another DCT scale"
        if img.mode not in ("L", "RGB"):
            img = img.convert("RGB")
        a = np.asarray(img)
    a = a.astype(np.int64)
    if spec.color == ColorOrder.GRAY:
        if a.ndim == 3:
            a = (a[:, :, 0] * 19595 + a[:, :, 1] * 38470 + a[:, :, 2] * 7471 + 0x8000) >> 16
        a = a[:, :, None]
    elif a.ndim == 2:
        a = np.repeat(a[:, :, None], 3, axis=2)
    x0, y0, x1, y1 = (float(np.float32(v / scale)) for v in crop_box(w0, h0, spec))
    name = spec.interpolation.lower()
    h = a
    tw, th = spec.width, spec.height
    if spec.resize == ResizeMode.LETTERBOX:
        tw, th, left, top = letterbox_layout(x1 - x0, y1 - y0, spec.width, spec.height)
    # PIL skips a pass whose axis neither changes size nor moves (same condition here).
    if not (tw == h.shape[1] and (x0, x1) == (0.0, h.shape[1])) or name == "nearest":
        h = _ref_resample_axis(h, x0, x1, tw, name)           # rows x W' x C
    if not (th == h.shape[0] and (y0, y1) == (0.0, h.shape[0])) or name == "nearest":
        h = _ref_resample_axis(h.transpose(1, 0, 2), y0, y1, th, name).transpose(1, 0, 2)
    if spec.resize == ResizeMode.LETTERBOX:
        canvas = np.full((spec.height, spec.width, h.shape[2]), LETTERBOX_FILL, dtype=np.int64)
        canvas[top:top + th, left:left + tw] = h
        h = canvas
    if spec.color == ColorOrder.BGR:
        h = h[:, :, ::-1]
    mean, std = mean_std(spec, h.shape[2])
    return ((h.astype(np.float64) - mean) / std).astype(np.float32)


__all__ = ["PRECISION_BITS", "reference_preprocess"]
