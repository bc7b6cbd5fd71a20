"""Benchmark inputs: seeded random tensors or real images through the manifest's preprocessing.

Random inputs follow the data the model will see: with a known preprocessing,
uniform random *pixels* in [0, 255] are normalized and quantized exactly like
real images; without one, integer inputs cover their dtype's full range and
float inputs [-1, 1] (and the report says so).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import numpy as np

from edgepipe.device.bundle import Preprocess
from edgepipe.device.errors import EdgepipeError

MAX_IMAGES = 64  # real-image benches cycle through at most this many decoded inputs


class InputError(EdgepipeError, ValueError):
    """Bench inputs that cannot be made; one line for the user."""


@dataclass
class BenchInputs:
    """One or more complete input sets (one array per model input, raw dtype)."""

    kind: str  # "random" | "images"
    sets: List[List[np.ndarray]]
    seed: Optional[int] = None
    source: Optional[str] = None
    skipped: int = 0
    assumed: List[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        d = {"kind": self.kind, "count": len(self.sets), "assumed": list(self.assumed)}
        if self.kind == "random":
            d["seed"] = self.seed
        else:
            d["source"] = self.source
            d["skipped"] = self.skipped
        return d


def _is_image_input(spec, pre: Optional[Preprocess]) -> bool:
    return pre is not None and len(spec.shape) == 4


def random_inputs(specs: Sequence, preprocess: Optional[Preprocess] = None, seed: int = 0) -> BenchInputs:
    """One seeded random input set with the right dtype, shape and value range."""
    rng = np.random.default_rng(seed)
    arrays: List[np.ndarray] = []
    assumed: List[str] = []
    for spec in specs:
        shape = tuple(max(1, d) for d in spec.shape)
        dt = np.dtype(spec.dtype)
        if _is_image_input(spec, preprocess):
            pixels = rng.integers(0, 256, size=shape).astype(np.float64)
            ch = shape[1] if preprocess.layout.lower() == "nchw" else shape[-1]
            mean = np.resize(np.asarray(preprocess.mean, dtype=np.float64), ch)
            std = np.resize(np.asarray(preprocess.std, dtype=np.float64), ch)
            if preprocess.layout.lower() == "nchw":
                mean, std = mean[:, None, None], std[:, None, None]
            arrays.append(spec.quantize((pixels - mean) / std))
        elif np.issubdtype(dt, np.integer):
            info = np.iinfo(dt)
            arrays.append(rng.integers(info.min, int(info.max) + 1, size=shape, dtype=dt))
            if preprocess is None:
                assumed.append(f"input {spec.name!r}: uniform random over the full {dt.name} range")
        elif dt == np.bool_:
            arrays.append(rng.integers(0, 2, size=shape).astype(np.bool_))
        else:
            arrays.append(rng.uniform(-1.0, 1.0, size=shape).astype(dt))
            if preprocess is None:
                assumed.append(f"input {spec.name!r}: uniform random floats in [-1, 1] (no preprocessing known)")
    return BenchInputs("random", [arrays], seed=seed, assumed=assumed)


def image_inputs(folder: os.PathLike, specs: Sequence, preprocess: Optional[Preprocess],
                 limit: int = MAX_IMAGES) -> BenchInputs:
    """Up to ``limit`` real images from ``folder`` through ``edgepipe.device.preprocess`` (sorted by name)."""
    from edgepipe.device.preprocess import ImageError, list_images, load_image, to_model_input

    if len(specs) != 1 or len(specs[0].shape) != 4:
        raise InputError("a folder of images needs a model with one image input (N, H, W, C); use random inputs",
                         param="input")
    spec = specs[0]
    assumed: List[str] = []
    if preprocess is None:
        preprocess, assumed = assumed_preprocess(spec)
    try:
        paths, skipped = list_images(folder)
    except (FileNotFoundError, NotADirectoryError) as e:
        raise InputError(str(e)) from None
    sets = []
    for p in paths:
        if len(sets) >= limit:
            break
        try:
            hwc = load_image(p, preprocess)
        except ImageError:
            skipped += 1
            continue
        sets.append([to_model_input(hwc, preprocess, spec)])
    if not sets:
        raise InputError(f"{folder}: no readable images (skipped {skipped} file(s))")
    return BenchInputs("images", sets, source=os.fspath(folder), skipped=skipped, assumed=assumed)


def assumed_preprocess(spec) -> tuple:
    """A best guess for a plain .tflite: size from the input tensor, pixels scaled to the
    quantized range for integer inputs or [-1, 1] (MobileNet style) for float ones."""
    from edgepipe.device.bundle import ColorOrder

    shape = spec.shape
    nchw = len(shape) == 4 and shape[1] in (1, 3) and shape[3] not in (1, 3)
    h, w, c = (shape[2], shape[3], shape[1]) if nchw else (shape[1], shape[2], shape[3])
    color = ColorOrder.GRAY if c == 1 else ColorOrder.RGB
    if spec.quantized:
        lo, hi = spec.float_range()
        std = (255.0 / (hi - lo)) if hi > lo else 1.0
        mean = -lo * std
        how = f"pixels mapped linearly onto the input's quantized range [{lo:.3g}, {hi:.3g}]"
    else:
        mean, std = 127.5, 127.5
        how = "pixels scaled to [-1, 1] (MobileNet style)"
    pre = Preprocess(height=int(h), width=int(w), color=color, layout="nchw" if nchw else "nhwc",
                     mean=(mean,) * c, std=(std,) * c)
    note = f"no manifest: {w}x{h} {color.value}, stretch resize, {how}"
    return pre, [note]
