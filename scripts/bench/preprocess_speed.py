#!/usr/bin/env python
"""Fast preprocessing (edgepipe.device.preprocess.load_image) vs naive PIL, on real photos at 1280x720 and 1920x1080.

Naive = what most scripts do: ``Image.open(p).convert("RGB").resize(size, BILINEAR)``
then ``(np.asarray(img, float32) - mean) / std``. Fast = JPEG DCT-scaled
decode to >= the needed size, one 8-bit resize, a normalization table lookup.

The real photos of sample_data/images are upscaled (bicubic) and re-encoded as
JPEG q90 at each size in a temp dir. Each round sends every
photo through both methods back to back (alternating which goes first), so
background load hits both alike; the "speed-up" per size is the median of
those paired ratios, all within this one run. Targets: >= 2x at
1280x720, >= 3x at 1920x1080. No assertion: this prints what it measured.
The "best" column sums each photo's fastest time per method over the rounds:
on a shared CPU noise only ever slows a call down, and it inflates the short
fast-path calls more than the long naive ones, so the median ratio is the
pessimistic figure and "best" what an idle board sees.

Also printed: how far the two outputs are apart, in 0..255 pixel levels (the
naive path rounds to 8 bits after a full-size decode; the fast path decodes
with DCT scaling), and the fast path against edgepipe.device.preprocess's reference
implementation of the same decode (must be 0).

    .venv-device/bin/python scripts/bench/preprocess_speed.py [--bundle DIR] [--rounds 7]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from edgepipe.device.bundle import ColorOrder, Preprocess, ResizeMode, load_bundle  # noqa: E402
from edgepipe.device.preprocess import crop_box, load_image, reference_preprocess  # noqa: E402

SIZES = ((1280, 720, 2.0), (1920, 1080, 3.0))
MOBILENET = Preprocess(224, 224, mean=(127.5,) * 3, std=(127.5,) * 3, preset="mobilenet")


def naive(path: Path, spec: Preprocess) -> np.ndarray:
    img = Image.open(path).convert("RGB")
    if spec.resize == ResizeMode.CENTER_CROP:
        img = img.crop(tuple(int(round(v)) for v in crop_box(img.width, img.height, spec)))
    img = img.resize((spec.width, spec.height), Image.Resampling.BILINEAR)
    x = np.asarray(img, dtype=np.float32)
    return (x - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)


def make_frames(src: list, w: int, h: int, out: Path) -> list:
    paths = []
    for p in src:
        q = out / f"{p.stem}_{w}x{h}.jpg"
        Image.open(p).convert("RGB").resize((w, h), Image.Resampling.BICUBIC).save(q, quality=90)
        paths.append(q)
    return paths


def time_pairs(paths: list, spec: Preprocess, rounds: int):
    """Each image through both methods back to back (order alternating), every round.

    Returns the per-call times of both (in pairs) and each image's fastest
    time per method over the rounds. Pairing keeps both calls of a pair under
    the same background load.
    """
    t_naive, t_fast = [], []
    best_naive, best_fast = [float("inf")] * len(paths), [float("inf")] * len(paths)
    for r in range(rounds):
        for i, p in enumerate(paths):
            pair = {}
            for fn in ((naive, load_image) if (r + i) % 2 == 0 else (load_image, naive)):
                t0 = time.perf_counter_ns()
                fn(p, spec)
                pair[fn] = time.perf_counter_ns() - t0
            t_naive.append(pair[naive])
            t_fast.append(pair[load_image])
            best_naive[i] = min(best_naive[i], pair[naive])
            best_fast[i] = min(best_fast[i], pair[load_image])
    return t_naive, t_fast, best_naive, best_fast


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", help="take the preprocessing from this bundle's manifest "
                                     "(default: MobileNet 224x224 stretch, mean=std=127.5)")
    ap.add_argument("--images", default=str(ROOT / "sample_data" / "images"), help="folder of real photos")
    ap.add_argument("--count", type=int, default=12, help="photos per size")
    ap.add_argument("--rounds", type=int, default=7, help="timed passes over the photos")
    args = ap.parse_args()

    spec = MOBILENET
    if args.bundle:
        m = load_bundle(args.bundle).manifest
        if m is None or m.preprocess is None:
            print(f"{args.bundle}: no preprocessing in the manifest", file=sys.stderr)
            return 2
        spec = m.preprocess
        if spec.color != ColorOrder.RGB:
            print("the naive comparison is written for RGB models", file=sys.stderr)
            return 2
    src = sorted(Path(args.images).glob("*.jpg"))[: args.count]
    if not src:
        print(f"no .jpg photos in {args.images}", file=sys.stderr)
        return 2
    print(f"preprocess: {spec.width}x{spec.height} {spec.color.value} {spec.resize.value} "
          f"(crop {spec.crop_fraction}) {spec.interpolation}; {len(src)} real photos; {args.rounds} rounds")
    print(f"{'size':>10} {'naive ms':>9} {'fast ms':>8} {'speed-up':>8} {'best':>6} {'target':>6}  "
          f"{'|fast-naive| mean/p99/max (levels)':>36}  {'fast vs reference':>17}")
    ok = True
    with tempfile.TemporaryDirectory(prefix="edgepipe-pp-") as tmp:
        for w, h, target in SIZES:
            paths = make_frames(src, w, h, Path(tmp))
            for p in paths:  # warm the page cache and both code paths
                naive(p, spec), load_image(p, spec)
            t_naive, t_fast, best_naive, best_fast = time_pairs(paths, spec, args.rounds)
            med_naive = statistics.median(t_naive) / 1e6
            med_fast = statistics.median(t_fast) / 1e6
            ratio = statistics.median(n / f for n, f in zip(t_naive, t_fast))
            best = sum(best_naive) / sum(best_fast)
            print(f"  best per photo, ms: naive {sum(best_naive) / len(paths) / 1e6:.2f}, "
                  f"fast {sum(best_fast) / len(paths) / 1e6:.2f}")
            std = np.asarray(spec.std, np.float64)
            diffs = np.concatenate([(np.abs(load_image(p, spec) - naive(p, spec)) * std).ravel() for p in paths])
            ref = max(float(np.abs(load_image(p, spec) - reference_preprocess(p, spec)).max()) for p in paths[:3])
            ok &= ratio >= target
            print(f"{w:>5}x{h:<4} {med_naive:>9.2f} {med_fast:>8.2f} {ratio:>7.2f}x {best:>5.2f}x {target:>5.1f}x  "
                  f"{diffs.mean():>14.2f} / {np.percentile(diffs, 99):>5.2f} / {diffs.max():>6.2f}  "
                  f"{'max |d| ' + format(ref, '.1e'):>17}")
    print("result: " + ("targets met" if ok else "below target in this run (shared/noisy CPU?)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
