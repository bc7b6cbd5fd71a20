"""Segmentation masks: per-pixel argmax or one foreground channel, in source pixels.

The mask is brought back to the source image (nearest, undoing the resize /
crop / letterbox), summarised as class areas (fractions of the image) and a
COCO-style uncompressed RLE per foreground class, and can be written as a PNG.
"""
from __future__ import annotations

import os
from typing import Any, Optional, Sequence, Tuple

import numpy as np

from edgepipe.device.decode.detect import activate, dequantize, shape_of
from edgepipe.device.decode.geometry import PreprocessGeometry, source_pixel_grid
from edgepipe.device.decode.spec import Activation, ClassArea, DecodeError, DecoderSpec, Segmentation


def rle_encode(binary: np.ndarray) -> dict:
    """COCO uncompressed RLE of a 2-D boolean mask: column-major runs, starting with zeros."""
    b = np.asarray(binary, dtype=bool)
    flat = b.reshape(-1, order="F")
    if flat.size == 0:
        return {"size": [int(b.shape[0]), int(b.shape[1])], "counts": []}
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    edges = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(edges).tolist()
    if flat[0]:
        counts = [0] + counts
    return {"size": [int(b.shape[0]), int(b.shape[1])], "counts": [int(c) for c in counts]}


def rle_decode(rle: dict) -> np.ndarray:
    """The boolean mask of an uncompressed RLE (inverse of :func:`rle_encode`)."""
    h, w = rle["size"]
    values = np.zeros(len(rle["counts"]), dtype=bool)
    values[1::2] = True
    flat = np.repeat(values, rle["counts"])
    if flat.size != h * w:
        raise DecodeError(f"RLE counts cover {flat.size} pixels, not {h}x{w}")
    return flat.reshape((h, w), order="F")


class SegmentationDecoder:
    def __init__(self, spec: DecoderSpec, outputs: Sequence[Any]):
        self.spec = spec
        self.outputs = tuple(outputs)
        if len(self.outputs) != 1:
            raise DecodeError(f"a segmentation model has one mask output, this model has {len(self.outputs)}")
        shape = shape_of(self.outputs[0])
        if len(shape) == 4 and shape[0] == 1:
            self.h, self.w, self.c = shape[1], shape[2], shape[3]
        elif len(shape) == 3 and shape[0] == 1:
            self.h, self.w, self.c = shape[1], shape[2], 1
        else:
            raise DecodeError(f"a segmentation output is (1, H, W, C) or (1, H, W), got {shape}")
        mode = spec.mode
        if mode == "auto":
            mode = "threshold" if self.c == 1 else "argmax"
        if mode == "threshold" and self.c != 1:
            raise DecodeError(f"threshold mode needs one foreground channel, the output has {self.c}")
        self.mode = mode
        self.assumption = (f"segmentation {self.h}x{self.w}: " + (
            f"argmax over {self.c} classes" if mode == "argmax" else
            f"foreground where score >= {spec.mask_threshold}"))

    def model_mask(self, raw: Sequence[np.ndarray]) -> np.ndarray:
        """(H, W) class ids at model resolution (threshold mode: 1 = foreground)."""
        x = dequantize(self.outputs[0], raw[0]).reshape(self.h, self.w, self.c)
        if self.mode == "argmax":
            return np.argmax(x, axis=2).astype(np.int32)
        act = self.spec.score_activation
        score = activate(x[:, :, 0], act if act != Activation.SOFTMAX else Activation.NONE)
        return (score >= self.spec.mask_threshold).astype(np.int32)

    def __call__(self, raw: Sequence[np.ndarray], geometry: Optional[PreprocessGeometry],
                 labels: Sequence[str] = ()) -> Segmentation:
        mask = self.model_mask(raw)
        if geometry is not None:
            cols, rows = source_pixel_grid(geometry, self.w, self.h)
            src = mask[np.clip(rows, 0, None)[:, None], np.clip(cols, 0, None)[None, :]]
            src[(rows < 0)[:, None] | (cols < 0)[None, :]] = 0
            mask = src
        return Segmentation(mask=mask, areas=self.areas(mask, labels), rle=self.rles(mask))

    def background(self) -> Optional[int]:
        return 0 if self.mode == "threshold" or self.spec.background_class else None

    def label(self, class_id: int, labels: Sequence[str]) -> Optional[str]:
        if self.mode == "threshold":
            return labels[-1] if labels else "foreground"
        j = class_id + self.spec.label_offset
        return labels[j] if 0 <= j < len(labels) else None

    def areas(self, mask: np.ndarray, labels: Sequence[str]) -> Tuple[ClassArea, ...]:
        ids, counts = np.unique(mask, return_counts=True)
        total = float(mask.size) or 1.0
        return tuple(ClassArea(int(i), self.label(int(i), labels), float(c) / total)
                     for i, c in zip(ids, counts) if int(i) != self.background())

    def rles(self, mask: np.ndarray) -> dict:
        return {str(int(i)): rle_encode(mask == i) for i in np.unique(mask) if int(i) != self.background()}


PALETTE_SEED = 20240601


def write_mask_png(segmentation: Segmentation, path: os.PathLike) -> None:
    """The class-id mask as a palette PNG (class 0 black, others fixed distinct colours)."""
    from PIL import Image

    mask = np.asarray(segmentation.mask)
    if mask.max(initial=0) > 255:
        raise DecodeError("a PNG mask holds at most 256 classes")
    img = Image.fromarray(mask.astype(np.uint8), "P")
    colours = np.random.default_rng(PALETTE_SEED).integers(64, 256, size=(256, 3), dtype=np.uint8)
    colours[0] = 0
    img.putpalette(colours.reshape(-1).tolist())
    img.save(path, format="PNG")
