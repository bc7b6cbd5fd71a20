#!/usr/bin/env python
"""FPS of `edgerun run` on the sample video with --annotate (MP4) vs without, and their ratio.

Target (issue 11): with annotation >= 0.85 x without, on the sample person
detector. Drawing and MP4 encoding run in the annotator's worker thread, so
the inference path only pays for handing the frame over. Nothing is
asserted: the CPU may be shared, so the two settings are interleaved over
--rounds rounds and the best round of each is reported (noise only ever
slows a run down).

    .venv-device/bin/python scripts/bench/annotate_fps.py [--bundle out/ssdlite_person-int8]

Without --bundle it runs the built sample detector's post-processed .tflite
(build it with: .venv/bin/python scripts/sample_data/build_detector.py), with the
decoder inferred from its four outputs.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from edgepipe.device.paths import user_dir  # noqa: E402
from edgepipe.device.runner import run_source  # noqa: E402

VIDEO = ROOT / "sample_data" / "video" / "vtest_short.avi"
TARGET = 0.85


def default_model() -> Path:
    p = user_dir("cache", "edgepipe", env="EDGEPIPE_CACHE") / "models" / "ssdlite_person" / "ssdlite_person.tflite"
    if not p.is_file():
        sys.exit(f"{p} is not built: run .venv/bin/python scripts/sample_data/build_detector.py")
    return p


def fps(model: Path, annotate: Path | None, frames: int | None) -> tuple:
    report = run_source(model, str(VIDEO), max_frames=frames, annotate=annotate)
    if report["errors"]:
        sys.exit(f"run failed: {report['errors'][0]}")
    ann = (report.get("detections") or {}).get("annotated") or {}
    return report["throughput"]["fps"], ann.get("frames")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, help="bundle or .tflite (default: the sample detector)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--frames", type=int, default=None, help="frames per run (default: the whole clip)")
    args = ap.parse_args()
    model = args.bundle or default_model()
    best = {"plain": 0.0, "annotated": 0.0}
    with tempfile.TemporaryDirectory(prefix="edgepipe-annotate-") as tmp:
        fps(model, None, 4)  # warm the page cache and the video decoder
        for r in range(max(1, args.rounds)):
            plain, _ = fps(model, None, args.frames)
            annotated, written = fps(model, Path(tmp) / f"round{r}.mp4", args.frames)
            best["plain"], best["annotated"] = max(best["plain"], plain), max(best["annotated"], annotated)
            print(f"round {r + 1}: without {plain:.2f} FPS, with --annotate {annotated:.2f} FPS "
                  f"({written} frames written)", flush=True)
    ratio = best["annotated"] / best["plain"]
    print(f"{model.name}: best without {best['plain']:.2f} FPS, with --annotate {best['annotated']:.2f} FPS, "
          f"ratio {ratio:.3f} (target >= {TARGET}) {'OK' if ratio >= TARGET else 'BELOW TARGET'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
