#!/usr/bin/env python
"""Build the two medium-size models the per-op profile tests use (tests/data/models/conv_stack_*.tflite).

The tiny test models run each op in about a microsecond, below the
profiler's microsecond clock, so the sum of per-op times cannot be checked
against the invoke time on them. These run ~1-3 ms per inference on a
desktop core (each op tens to hundreds of microseconds) and stay small:

    .venv/bin/python scripts/make_profile_model.py [--out tests/data/models]

  conv_stack_f32.tflite   float32, Nx48x48x3 (dynamic batch, as Keras exports) -> five 3x3 convs
                          (24 channels) -> 10 softmax scores
  conv_stack_int8.tflite  the same, full int8 with float32 in/out (calibrated on seeded noise)

Seeded; re-running gives functionally identical models.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SIZE, CH, LAYERS, CLASSES = 48, 24, 5, 10


def build(tf, batch=1):
    tf.keras.utils.set_random_seed(0)
    inp = tf.keras.Input((SIZE, SIZE, 3), batch_size=batch, name="image")
    x = inp
    for i in range(LAYERS):
        x = tf.keras.layers.Conv2D(CH, 3, padding="same", activation="relu", bias_initializer="random_uniform",
                                   name=f"conv{i}")(x)
    x = tf.keras.layers.GlobalAveragePooling2D()(x)
    out = tf.keras.layers.Dense(CLASSES, activation="softmax", bias_initializer="random_uniform", name="scores")(x)
    return tf.keras.Model(inp, out)


def convert(tf, model, int8: bool) -> bytes:
    import numpy as np

    conv = tf.lite.TFLiteConverter.from_keras_model(model)
    if int8:
        rng = np.random.default_rng(0)
        conv.optimizations = [tf.lite.Optimize.DEFAULT]
        conv.representative_dataset = lambda: ([rng.random((1, SIZE, SIZE, 3), dtype=np.float32)] for _ in range(8))
        conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    return conv.convert()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "tests" / "data" / "models"))
    out = Path(ap.parse_args().out)
    sys.path.insert(0, str(ROOT))
    from edgepipe.pipeline.tfenv import import_tf

    tf = import_tf()
    for name, int8, batch in (("conv_stack_f32.tflite", False, None), ("conv_stack_int8.tflite", True, 1)):
        data = convert(tf, build(tf, batch), int8)
        (out / name).write_bytes(data)
        print(f"{out / name}: {len(data)} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
