#!/usr/bin/env python3
"""Train the sample Fashion-MNIST CNN and export a labelled test subset.

Reads Debian's ``dataset-fashion-mnist`` (idx files, numpy only), trains a
compact CNN on CPU (seeded, a few epochs, ~2 minutes on 2 cores) and writes:

- ``sample_data/models/fashion_mnist_cnn.keras`` (input 28x28x1 float = pixels / 255,
  i.e. preset ``unit``; output 10 softmax probabilities),
- ``sample_data/fashion_mnist/labels.txt`` and ``sample_data/fashion_mnist/test/<class>/*.png``
  (the first ``--per-class`` test images of each class; file names are test-set indices),
- ``sample_data/fashion_mnist/calib/*.png``: ``--calib`` images drawn (seeded) from the
  TRAINING set, a flat folder for ``edgepipe convert --calib`` (never calibrate on test data).

Usage: .venv/bin/python scripts/sample_data/train_fashion_mnist.py [--epochs 4] [--per-class 50]
       [--calib 200] [--data-only]   (--data-only: re-export the PNGs, keep the committed model)
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from edgepipe.pipeline import samples  # noqa: E402

# These scripts regenerate the committed files: they must write into this
# checkout (an editable install), never into an installed package.
if samples.sample_data_dir().resolve() != (Path(__file__).resolve().parents[2] / "sample_data").resolve():
    sys.exit(f"edgepipe is not installed from this checkout (its sample data is {samples.sample_data_dir()}): "
             "pip install -e . first")

SEED = 20240601


def build_model(keras):
    """Conv-BN-ReLU x2 with pooling, then a small dense head: ~100k parameters."""
    L = keras.layers
    inp = keras.Input((28, 28, 1), name="image")
    x = inp
    for filters in (32, 64):
        x = L.Conv2D(filters, 3, padding="same", use_bias=False)(x)
        x = L.BatchNormalization()(x)
        x = L.ReLU()(x)
        x = L.MaxPooling2D()(x)
    x = L.Conv2D(64, 3, padding="same", use_bias=False)(x)
    x = L.BatchNormalization()(x)
    x = L.ReLU()(x)
    x = L.MaxPooling2D()(x)  # 3x3x64
    x = L.Flatten()(x)
    x = L.Dropout(0.3)(x)
    x = L.Dense(128, activation="relu")(x)
    x = L.Dense(10)(x)
    out = L.Softmax(name="probabilities")(x)
    return keras.Model(inp, out, name="fashion_mnist_cnn")


def export_subset(images, labels, out_dir: Path, per_class: int) -> int:
    """Write the first `per_class` test images of each class as PNGs; returns the count."""
    written = 0
    for cls, name in enumerate(samples.FASHION_MNIST_CLASSES):
        folder = out_dir / name
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.glob("*.png"):
            old.unlink()
        for idx in np.flatnonzero(labels == cls)[:per_class]:
            Image.fromarray(images[idx], mode="L").save(folder / f"t10k_{idx:05d}.png", optimize=True)
            written += 1
    return written


def export_calibration(images, out_dir: Path, count: int) -> int:
    """Write `count` seeded-random training images as a flat folder of PNGs."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("*.png"):
        old.unlink()
    chosen = np.sort(np.random.default_rng(SEED).choice(len(images), size=count, replace=False))
    for idx in chosen:
        Image.fromarray(images[idx], mode="L").save(out_dir / f"train_{idx:05d}.png", optimize=True)
    return len(chosen)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--per-class", type=int, default=50)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--calib", type=int, default=200)
    ap.add_argument("--data-only", action="store_true")
    args = ap.parse_args()

    x_train, y_train = samples.fashion_mnist_train()
    x_test, y_test = samples.fashion_mnist_test()
    labels_path = samples.fashion_mnist_labels_path()
    labels_path.parent.mkdir(parents=True, exist_ok=True)
    labels_path.write_text("\n".join(samples.FASHION_MNIST_CLASSES) + "\n", encoding="utf-8")
    n = export_subset(x_test, y_test, samples.fashion_mnist_test_dir(), args.per_class)
    c = export_calibration(x_train, samples.fashion_mnist_calib_dir(), args.calib)
    print(f"exported {n} labelled test PNGs and {c} calibration PNGs")
    if args.data_only:
        return 0

    from edgepipe.pipeline.tfenv import import_tf

    import_tf()
    import keras
    keras.utils.set_random_seed(SEED)
    model = build_model(keras)
    model.compile(optimizer=keras.optimizers.Adam(1e-3),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    xt = (x_train.astype("float32") / 255.0)[..., None]
    xe = (x_test.astype("float32") / 255.0)[..., None]
    t0 = time.perf_counter()
    model.fit(xt, y_train, batch_size=args.batch_size, epochs=args.epochs,
              shuffle=True, verbose=2)
    train_s = time.perf_counter() - t0
    _, acc = model.evaluate(xe, y_test, batch_size=500, verbose=0)

    # Save an uncompiled copy: no optimizer state in the committed file.
    clean = build_model(keras)
    clean.set_weights(model.get_weights())
    out = samples.fashion_mnist_model_path()
    out.parent.mkdir(parents=True, exist_ok=True)
    clean.save(out)

    probs = clean.predict(xe, batch_size=500, verbose=0)
    sub_idx = np.concatenate([np.flatnonzero(y_test == k)[:args.per_class] for k in range(10)])
    sub_acc = float((probs[sub_idx].argmax(1) == y_test[sub_idx]).mean())
    print(f"trained {args.epochs} epochs in {train_s:.0f} s; params {clean.count_params()}")
    print(f"test accuracy (10,000 images): {acc:.4f}; exported subset ({n} PNGs): {sub_acc:.4f}")
    print(f"model: {out} ({out.stat().st_size / 1024:.0f} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
