#!/usr/bin/env python3
"""Build the tiny detection/segmentation test models (committed under tests/data/models/).

Real .tflite models whose outputs are known in closed form, so device tests
(no TensorFlow) can check decoders end to end through the runner:

* ``yolo_boxes.tflite``: input (1, 64, 64, 3) in [0, 1]; output (1, 40, 6) in
  the YOLO boxes-last layout (cx, cy, w, h in input pixels, 2 class scores).
  Candidate 0 is the box (24, 24)-(40, 40) of the input (+ < 0.01 px; normalised 0.375-0.625), class 0, scored by
  the image's mean brightness; candidate 1 is (0, 0)-(16, 8), class 1, scored
  by (1 - brightness) / 4; the rest score 0.
* ``seg_halves.tflite``: input (1, 32, 48, 3) in [0, 1]; output (1, 32, 48, 2)
  class scores per pixel: class 1 where the pixel is brighter than mid-grey.

Run with the host venv: ``.venv/bin/python scripts/make_detection_test_models.py``.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

OUT = Path(__file__).resolve().parents[1] / "tests" / "data" / "models"
N, C = 40, 2


def yolo_boxes(keras):
    inp = keras.Input((64, 64, 3), batch_size=1)
    # Average pool + 1x1 conv (a dense layer on the mean colour): ops every quantizer handles.
    pooled = keras.layers.AveragePooling2D(64)(inp)
    dense = keras.layers.Conv2D(N * (4 + C), 1)
    out = keras.layers.Reshape((N, 4 + C))(dense(pooled))
    model = keras.Model(inp, out)
    kernel = np.zeros((3, N * (4 + C)), np.float32)
    bias = np.zeros(N * (4 + C), np.float32)
    row = lambda i: slice(i * (4 + C), (i + 1) * (4 + C))  # noqa: E731
    # Tiny box weights (boxes move < 1e-4 of the input) so no output channel is all-zero: a quantizer
    # derives per-channel bias scales from the weights and would zero a weightless channel's bias.
    for i in range(N):
        kernel[:, i * (4 + C):i * (4 + C) + 4] = 0.0001 / 3
    bias[row(0)] = [0.5, 0.5, 0.25, 0.25, 0, 0]
    kernel[:, 0 * (4 + C) + 4] = 1.0 / 3  # class 0 score = mean brightness
    bias[row(1)] = [0.125, 0.0625, 0.25, 0.125, 0, 0.25]
    kernel[:, 1 * (4 + C) + 5] = -0.25 / 3  # class 1 score = (1 - brightness) / 4
    dense.set_weights([kernel.reshape(1, 1, 3, -1), bias])
    return model


def seg_halves(keras):
    inp = keras.Input((32, 48, 3), batch_size=1)
    conv = keras.layers.Conv2D(2, 1)
    model = keras.Model(inp, conv(inp))
    k = np.zeros((1, 1, 3, 2), np.float32)
    k[0, 0, :, 0], k[0, 0, :, 1] = -1.0 / 3, 1.0 / 3
    conv.set_weights([k, np.array([0.5, -0.5], np.float32)])
    return model


def main() -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from edgepipe.pipeline.tfenv import import_tf

    tf = import_tf()
    import keras

    for name, build in (("yolo_boxes", yolo_boxes), ("seg_halves", seg_halves)):
        data = tf.lite.TFLiteConverter.from_keras_model(build(keras)).convert()
        (OUT / f"{name}.tflite").write_bytes(data)
        print(f"{OUT / name}.tflite: {len(data)} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
