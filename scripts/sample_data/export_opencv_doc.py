#!/usr/bin/env python3
"""Copy the sample photos, the sample video and the ImageNet labels from Debian's ``opencv-doc``.

Photos: natural photos from ``/usr/share/doc/opencv-doc/examples`` (not the
synthetic test patterns), downscaled to a longest side of at most 640 px and
saved as RGB JPEG q90 in ``sample_data/images/``. Video: the first seconds of
``vtest.avi`` downscaled to half size, MJPEG in AVI (readable by OpenCV headless
without extra codecs), ``sample_data/video/vtest_short.avi``. Labels: OpenCV's
``dnn/classification_classes_ILSVRC2012.txt`` (the 1000 ILSVRC-2012 classes in
the standard synset order that torchvision uses), with the two classes both named
"crane" told apart as "crane (bird)" (134) and "crane (machine)" (517).

Usage: .venv/bin/python scripts/sample_data/export_opencv_doc.py [--source DIR]
Needs: apt-get install opencv-doc; cv2 (opencv-python-headless) and Pillow.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from PIL import Image

from edgepipe.pipeline import samples

# These scripts regenerate the committed files: they must write into this
# checkout (an editable install), never into an installed package.
if samples.sample_data_dir().resolve() != (Path(__file__).resolve().parents[2] / "sample_data").resolve():
    sys.exit(f"edgepipe is not installed from this checkout (its sample data is {samples.sample_data_dir()}): "
             "pip install -e . first")

SOURCE = Path("/usr/share/doc/opencv-doc/examples")
# (path under SOURCE, committed file name)
PHOTOS = [(f"data/{n}", n.rsplit(".", 1)[0] + ".jpg") for n in (
    "apple.jpg", "orange.jpg", "baboon.jpg", "butterfly.jpg", "fruits.jpg", "HappyFish.jpg",
    "squirrel_cls.jpg", "messi5.jpg", "aero1.jpg", "building.jpg", "home.jpg", "board.jpg",
    "stuff.jpg", "leuvenA.jpg", "aloeL.jpg", "graf1.png", "rubberwhale1.png", "smarties.png",
    "licenseplate_motion.jpg", "left.jpg", "ela_original.jpg", "chicky_512.png",
)] + [
    ("hfs/data/000.jpg", "hfs_000.jpg"),
    ("hfs/data/001.jpg", "hfs_001.jpg"),
    ("hfs/data/002.jpg", "hfs_002.jpg"),
    ("text/scenetext01.jpg", "scenetext01.jpg"),
    ("text/scenetext03.jpg", "scenetext03.jpg"),
    ("text/scenetext04.jpg", "scenetext04.jpg"),
    ("text/scenetext05.jpg", "scenetext05.jpg"),
    ("text/scenetext06.jpg", "scenetext06.jpg"),
    ("alphamat/input_images/plant.jpg", "plant.jpg"),
]
MAX_SIDE = 640
VIDEO_SOURCE = "data/vtest.avi"
VIDEO_SECONDS = 5.0
VIDEO_SCALE = 0.5
LABELS_SOURCE = "data/dnn/classification_classes_ILSVRC2012.txt"
# Same name for two different classes: made unique so labels map one-to-one.
LABEL_FIXES = {134: ("crane", "crane (bird)"), 517: ("crane", "crane (machine)")}


def export_labels(src: Path, out: Path) -> int:
    lines = src.read_text(encoding="utf-8").splitlines()
    if len(lines) != 1000:
        raise SystemExit(f"{src}: expected 1000 classes, found {len(lines)}")
    for index, (old, new) in LABEL_FIXES.items():
        if lines[index] != old:
            raise SystemExit(f"{src}: line {index + 1} is {lines[index]!r}, expected {old!r}")
        lines[index] = new
    if len(set(lines)) != 1000:
        raise SystemExit(f"{src}: class names are not unique")
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return len(lines)


def export_photos(src_root: Path, out_dir: Path) -> list:
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for rel, name in PHOTOS:
        src = src_root / rel
        with Image.open(src) as im:
            if im.mode in ("RGBA", "LA", "P"):
                im = im.convert("RGBA")
                bg = Image.new("RGBA", im.size, "white")
                im = Image.alpha_composite(bg, im)
            im = im.convert("RGB")
            orig = im.size
            im.thumbnail((MAX_SIDE, MAX_SIDE), Image.LANCZOS)
            im.save(out_dir / name, "JPEG", quality=90, optimize=True)
        rows.append((rel, name, orig, im.size))
    return rows


def export_video(src: Path, out: Path) -> tuple:
    import cv2

    cap = cv2.VideoCapture(str(src))
    if not cap.isOpened():
        raise SystemExit(f"cannot read {src}")
    fps = cap.get(cv2.CAP_PROP_FPS) or 10.0
    w = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH) * VIDEO_SCALE)
    h = int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT) * VIDEO_SCALE)
    out.parent.mkdir(parents=True, exist_ok=True)
    writer = cv2.VideoWriter(str(out), cv2.VideoWriter_fourcc(*"MJPG"), fps, (w, h))
    frames = 0
    while frames < int(round(fps * VIDEO_SECONDS)):
        ok, frame = cap.read()
        if not ok:
            break
        writer.write(cv2.resize(frame, (w, h), interpolation=cv2.INTER_AREA))
        frames += 1
    writer.release()
    cap.release()
    return frames, fps, (w, h)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", type=Path, default=SOURCE)
    args = ap.parse_args()
    if not (args.source / VIDEO_SOURCE).is_file():
        raise SystemExit(f"{args.source} has no opencv-doc examples: apt-get install opencv-doc")
    for rel, name, orig, size in export_photos(args.source, samples.sample_images_dir()):
        print(f"{rel:40s} -> images/{name:26s} {orig[0]}x{orig[1]} -> {size[0]}x{size[1]}")
    frames, fps, size = export_video(args.source / VIDEO_SOURCE, samples.sample_video_path())
    print(f"{VIDEO_SOURCE} -> video/{samples.sample_video_path().name}: {frames} frames "
          f"at {fps:g} fps, {size[0]}x{size[1]}")
    n = export_labels(args.source / LABELS_SOURCE, samples.imagenet_labels_path())
    print(f"{LABELS_SOURCE} -> {samples.imagenet_labels_path().name}: {n} classes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
