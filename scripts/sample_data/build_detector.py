#!/usr/bin/env python3
"""Build (or rebuild) the sample person detector and show what it finds in the sample photos.

The build itself is edgepipe.pipeline.samples_build.ssdlite_person (also run by
``edgepipe samples build ssdlite_person``; its docstring says what it fetches,
cuts, checks and writes). This script runs it, then checks that the detector
finds the person in a known photo.

Everything lands in ``<cache>/models/ssdlite_person/`` (``$EDGEPIPE_CACHE`` or the
checkout's ``.cache/edgepipe``). Run with the host venv (TensorFlow):

    .venv/bin/python scripts/sample_data/build_detector.py [--rebuild] [--images DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np  # noqa: E402

from edgepipe.pipeline import samples  # noqa: E402

from edgepipe.pipeline.samples_build.ssdlite_person import (FOLDER, PP_FILE, RAW_FILE,  # noqa: E402,F401
                                                          build, decoder_params)


def progress(msg: str) -> None:
    print(f"edgepipe: {msg}", file=sys.stderr, flush=True)


def detect(model: Path, params: dict, photo: Path, threshold: float = 0.5):
    """Run one built model on a photo with edgepipe's decoders; detections in source pixels."""
    from PIL import Image

    from edgepipe.device.bundle import Preprocess
    from edgepipe.device.decode import DecoderSpec, geometry_for, make_decoder
    from edgepipe.device.preprocess import load_image, to_model_input
    from edgepipe.device.runtime import load_model

    pre = Preprocess.from_dict(decoder_params()["preprocess"])
    loaded = load_model(model)
    spec = DecoderSpec.from_dict({**params, "score_threshold": threshold})
    decoder = make_decoder(spec, loaded.outputs, ("person",))
    with Image.open(photo) as im:
        size = im.size
    loaded.set_input(0, to_model_input(load_image(photo, pre), pre, loaded.inputs[0]))
    loaded.invoke()
    raw = [loaded.get_output(i) for i in range(len(loaded.outputs))]
    return decoder(raw, geometry_for(pre, *size))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rebuild", action="store_true", help="build even if the cached models exist")
    ap.add_argument("--images", type=Path, default=Path(__file__).resolve().parents[2] / "sample_data" / "detector")
    args = ap.parse_args()
    out_dir = samples.cache_dir() / "models" / FOLDER
    try:
        if args.rebuild or not all((out_dir / f).is_file() for f in (RAW_FILE, PP_FILE, "decoder.json")):
            build(out_dir, progress=progress)
    except samples.SampleDataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    params = json.loads((out_dir / "decoder.json").read_text(encoding="utf-8"))
    for name in (RAW_FILE, PP_FILE):
        print(f"model: {out_dir / name} ({(out_dir / name).stat().st_size / 1e6:.1f} MB)")
    photos = sorted(p for p in args.images.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    found_any = False
    for photo in photos:
        result = detect(out_dir / RAW_FILE, params[RAW_FILE], photo)
        found_any |= bool(result.detections)
        boxes = ", ".join(f"{d.label} {d.score:.2f} [{' '.join(f'{v:.0f}' for v in d.box_xyxy)}]"
                          for d in result.detections[:6])
        print(f"{photo.name:28s} {len(result.detections)} found  {boxes}")
    if photos and not found_any:
        print("NO PERSON FOUND in any sample photo", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
