"""Representative datasets for full-integer quantization, drawn from real images.

Images go through the device's own preprocessing (`edgepipe.device.preprocess`), so the
calibration data is exactly what the board will feed the model. The selection
(count, seed) and a digest of the chosen files are recorded in the manifest
and in the conversion cache key.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from edgepipe.device.bundle import Calibration, Preprocess
from edgepipe.device.errors import EdgepipeError

DEFAULT_COUNT = 100
DEFAULT_SEED = 0


class CalibrationError(EdgepipeError, ValueError):
    """Unusable calibration folder; message is user-facing."""


@dataclass(frozen=True)
class CalibrationSet:
    folder: Path
    paths: tuple
    requested: int
    seed: int
    digest: str
    skipped_non_images: int

    @property
    def count(self) -> int:
        return len(self.paths)

    def record(self) -> Calibration:
        return Calibration(count=self.count, seed=self.seed, digest=self.digest, source=str(self.folder))


def select(folder: Path, count: int = DEFAULT_COUNT, seed: int = DEFAULT_SEED) -> CalibrationSet:
    """Pick up to ``count`` images from ``folder`` (not its sub-folders), reproducibly for ``seed``."""
    from edgepipe.device.preprocess import list_images

    if count < 1:
        raise CalibrationError(f"the calibration image count must be at least 1, got {count}", param="calib_count")
    if not folder.exists():
        raise CalibrationError(f"calibration folder {folder}: no such directory")
    if not folder.is_dir():
        raise CalibrationError(f"calibration folder {folder}: not a directory")
    try:
        paths, skipped = list_images(folder)
    except OSError as e:
        raise CalibrationError(f"calibration folder {folder}: unreadable ({e.strerror or e})") from None
    if not paths:
        raise CalibrationError(f"calibration folder {folder}: no images found")
    paths = sorted(Path(p) for p in paths)
    if len(paths) > count:
        idx = np.random.default_rng(seed).choice(len(paths), size=count, replace=False)
        paths = [paths[i] for i in sorted(idx)]
    h = hashlib.sha256(f"count={len(paths)};seed={seed};".encode())
    for p in paths:
        h.update(p.name.encode() + b"\0")
        try:
            h.update(p.read_bytes())
        except OSError as e:
            raise CalibrationError(f"calibration image {p}: unreadable ({e.strerror or e})") from None
    return CalibrationSet(folder=folder, paths=tuple(paths), requested=count, seed=seed,
                          digest=h.hexdigest(), skipped_non_images=skipped)


def load_arrays(cset: CalibrationSet, spec: Preprocess,
                progress: Optional[Callable[[int, int], None]] = None) -> np.ndarray:
    """Decode and preprocess the set: float32 array (N, *model input shape without batch)."""
    from edgepipe.device.preprocess import load_image

    arrays = []
    bad = []
    for i, p in enumerate(cset.paths):
        try:
            x = load_image(p, spec)
        except (OSError, ValueError) as e:
            bad.append(f"{p.name}: {e}")
            continue
        if spec.layout == "nchw":
            x = np.transpose(x, (2, 0, 1))
        arrays.append(x)
        if progress:
            progress(i + 1, cset.count)
    if not arrays:
        raise CalibrationError(f"calibration folder {cset.folder}: none of {cset.count} images could be "
                               f"decoded (first: {bad[0] if bad else '?'})")
    return np.stack(arrays).astype(np.float32, copy=False)


def representative_dataset(arrays: np.ndarray) -> Callable:
    """The generator function TFLiteConverter expects: one batch-1 sample per step."""

    def gen():
        for x in arrays:
            yield [x[None, ...]]

    return gen


def calibrating_converter(keras_model, arrays: np.ndarray):
    """A TFLiteConverter for ``keras_model`` set up to calibrate on ``arrays`` (float inputs, axis 0).

    Full-integer optimisation with the builtin op set (not INT8-only: ops a
    denylist keeps float must be allowed to stay float). Callers add the last
    switch: ``_experimental_calibrate_only`` (:mod:`.ptq`) or a
    ``QuantizationDebugger`` around it (:mod:`.layer_error`). Call it inside
    ``tfenv.captured_output()``: the converter writes to the process's fds.
    """
    from edgepipe.pipeline.tfenv import import_tf

    tf = import_tf()
    conv = tf.lite.TFLiteConverter.from_keras_model(keras_model)
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.representative_dataset = representative_dataset(np.asarray(arrays, dtype=np.float32))
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    return conv
