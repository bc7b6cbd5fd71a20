#!/usr/bin/env python3
"""Cached vs cold `edgepipe convert` of all six recipes on the sample MobileNetV2.

Both runs are real CLI processes measured in this one run (the machine is
shared and noisy, so only the ratio means anything). Target: cached/cold <= 0.05.

    .venv/bin/python scripts/bench/convert_cache.py [--calib-count 32]
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

TARGET = 0.05


def run(cmd: list) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"convert failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}")
    return dt


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calib-count", type=int, default=32)
    args = ap.parse_args()
    # The checkout's sample cache (reuses a model the demo already built).
    os.environ.setdefault("EDGEPIPE_CACHE", str(REPO / ".cache" / "edgepipe"))
    from edgepipe.pipeline.samples import imagenet_labels_path, sample_images_dir
    from edgepipe.pipeline.samples_build.build import build_sample

    model = build_sample("mobilenet_v2", progress=lambda msg: print(f"edgepipe: {msg}", file=sys.stderr))
    work = Path(tempfile.mkdtemp(prefix="edgepipe-bench-cache-"))
    try:
        cmd = [sys.executable, "-m", "edgepipe.pipeline.cli", "convert", str(model), "--recipes", "all",
               "--preprocess", "imagenet", "--labels", str(imagenet_labels_path()),
               "--calib", str(sample_images_dir()), "--calib-count", str(args.calib_count),
               "--cache-dir", str(work / "cache"), "--out", str(work / "bundles"), "--json"]
        print("cold run (all six recipes, empty cache)...", flush=True)
        cold = run(cmd)
        print("cached run (same inputs)...", flush=True)
        cached = run(cmd)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ratio = cached / cold
    print(f"cold    {cold:8.2f} s")
    print(f"cached  {cached:8.2f} s")
    print(f"ratio   {ratio:8.4f}  (target <= {TARGET}) {'OK' if ratio <= TARGET else 'MISSED'}")
    return 0 if ratio <= TARGET else 1


if __name__ == "__main__":
    sys.exit(main())
