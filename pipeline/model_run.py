"""Running a model held in memory and timing it: what every quantization search measures with.

TFLite models run through the device runtime (the same one the boards use),
so agreement and latency here are what a bundle will show there; the float
reference runs the Keras model itself.
"""
from __future__ import annotations

import os
import tempfile
import time
from typing import Optional

import numpy as np


def load_bytes(model: bytes, threads: Optional[int]):
    """A device-runtime model from bytes (the runtime loads files; the file goes once loaded)."""
    from edgepipe.device.runtime import load_model

    fd, path = tempfile.mkstemp(suffix=".tflite", prefix="edgepipe-sel-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(model)
        return load_model(path, threads=threads)
    finally:
        os.unlink(path)


def run_tflite(model: bytes, x: np.ndarray, *, threads: Optional[int] = 1) -> np.ndarray:
    """Float outputs (first output, one row per input) of a TFLite model via the device runtime."""
    lm = load_bytes(model, threads)
    return np.stack([lm.predict([x[i:i + 1]])[0].reshape(-1) for i in range(x.shape[0])])


def p50_ms(model: bytes, x: np.ndarray, *, runs: int = 30, warmup: int = 3,
           threads: Optional[int] = 1) -> float:
    """Median invoke latency of ``model`` on one input (ms), via the device runtime."""
    lm = load_bytes(model, threads)
    spec = lm.inputs[0]
    lm.set_input(0, spec.quantize(x[:1]).reshape(spec.shape))
    for _ in range(warmup):
        lm.invoke()
    samples = []
    for _ in range(runs):
        t0 = time.perf_counter_ns()
        lm.invoke()
        samples.append((time.perf_counter_ns() - t0) / 1e6)
    return float(np.median(samples))


def float_outputs(keras_model, x: np.ndarray, *, batch: int = 32) -> np.ndarray:
    """The float reference: the Keras model's first output, one row per input.

    In batches: a few hundred 224x224 images through MobileNetV2 in one call
    needs over 20 GB of activations.
    """
    from edgepipe.pipeline.tfenv import captured_output

    rows = []
    with captured_output():
        for i in range(0, len(x), batch):
            y = keras_model(x[i:i + batch], training=False)
            if isinstance(y, (list, tuple)):
                y = y[0]
            y = np.asarray(y)
            rows.append(y.reshape(y.shape[0], -1))
    return np.concatenate(rows) if rows else np.zeros((0, 0), np.float32)


__all__ = ["float_outputs", "load_bytes", "p50_ms", "run_tflite"]
