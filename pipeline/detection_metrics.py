"""Accuracy of detectors: agreement with the float model, and mAP against box labels.

Agreement needs no labels: a variant's detections are matched to the float
model's on the same image (same class, IoU >= 0.5, greedy by the variant's
score), giving precision and recall *against the float model* and the mean IoU
of the matched pairs. mAP@0.5 and mAP@0.5:0.95 against labelled boxes use
pycocotools (COCO's own evaluation), which the host must have installed.

Box labels are read from a COCO JSON file (``images``, ``annotations`` with
``bbox`` = x, y, w, h in pixels, ``categories``) or from one text file per image
(``<image stem>.txt``, lines ``class_id cx cy w h`` normalised to the image,
the YOLO convention).
"""
from __future__ import annotations

import contextlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from edgepipe.device.decode import Detection, iou_matrix
from edgepipe.device.errors import EdgepipeError

MATCH_IOU = 0.5
MAX_LABEL_BYTES = 64 << 20


class DetectionMetricsError(EdgepipeError, ValueError):
    """Labels or detections that cannot be scored; one line."""


@dataclass(frozen=True)
class Agreement:
    """A variant's detections against the float model's, over a set of images."""

    images: int
    reference: int  # float-model detections
    variant: int    # variant detections
    matched: int
    precision: Optional[float]  # matched / variant (None when the variant found nothing)
    recall: Optional[float]     # matched / reference (None when the float model found nothing)
    mean_iou: Optional[float]   # over matched pairs

    def to_dict(self) -> dict:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in self.__dict__.items()}


def match(reference: Sequence[Detection], variant: Sequence[Detection],
          iou_threshold: float = MATCH_IOU) -> List[Tuple[int, int, float]]:
    """Greedy one-to-one matches (variant index, reference index, IoU), best variant score first.

    Each variant box takes the unmatched reference box of the same class with
    the highest IoU, if that IoU is at least ``iou_threshold``.
    """
    if not reference or not variant:
        return []
    ious = iou_matrix(np.array([d.box_xyxy for d in variant]), np.array([d.box_xyxy for d in reference]))
    same = np.array([[v.class_id == r.class_id for r in reference] for v in variant])
    ious = np.where(same, ious, -1.0)
    taken = np.zeros(len(reference), bool)
    out = []
    for vi in np.argsort([-d.score for d in variant], kind="stable"):
        row = np.where(taken, -1.0, ious[vi])
        ri = int(np.argmax(row))
        if row[ri] >= iou_threshold:
            taken[ri] = True
            out.append((int(vi), ri, float(row[ri])))
    return out


def agreement(reference: Mapping[str, Sequence[Detection]], variant: Mapping[str, Sequence[Detection]],
              iou_threshold: float = MATCH_IOU) -> Agreement:
    """Agreement over every image in ``reference`` (image name -> detections)."""
    n_ref = n_var = 0
    ious: List[float] = []
    for name, ref in reference.items():
        var = variant.get(name, ())
        n_ref += len(ref)
        n_var += len(var)
        ious += [m[2] for m in match(ref, var, iou_threshold)]
    k = len(ious)
    return Agreement(images=len(reference), reference=n_ref, variant=n_var, matched=k,
                     precision=k / n_var if n_var else None, recall=k / n_ref if n_ref else None,
                     mean_iou=float(np.mean(ious)) if ious else None)


# ------------------------------------------------------------------ box labels


@dataclass(frozen=True)
class BoxLabels:
    """Ground truth: per image name, (class id, x0, y0, x1, y1) in pixels; class names by id."""

    boxes: Mapping[str, Tuple[Tuple[int, float, float, float, float], ...]]
    sizes: Mapping[str, Tuple[int, int]]  # image name -> (w, h)
    categories: Mapping[int, str]


def _read_json(path: Path) -> dict:
    if path.stat().st_size > MAX_LABEL_BYTES:
        raise DetectionMetricsError(f"{path}: label file larger than {MAX_LABEL_BYTES >> 20} MiB")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DetectionMetricsError(f"{path}: unreadable COCO JSON ({exc})") from None
    if not isinstance(data, dict):
        raise DetectionMetricsError(f"{path}: a COCO JSON file is an object")
    return data


def load_coco_labels(path: os.PathLike) -> BoxLabels:
    """Box labels from a COCO-style JSON file (image names are the ``file_name`` values)."""
    path = Path(path)
    data = _read_json(path)
    try:
        images = {int(im["id"]): (Path(str(im["file_name"])).name, (int(im["width"]), int(im["height"])))
                  for im in data["images"]}
        cats = {int(c["id"]): str(c["name"]) for c in data.get("categories", [])}
        boxes: Dict[str, list] = {name: [] for name, _ in images.values()}
        for a in data.get("annotations", []):
            x, y, w, h = (float(v) for v in a["bbox"])
            boxes[images[int(a["image_id"])][0]].append((int(a["category_id"]), x, y, x + w, y + h))
    except (KeyError, TypeError, ValueError) as exc:
        raise DetectionMetricsError(f"{path}: not COCO detection labels ({type(exc).__name__}: {exc})") from None
    return BoxLabels(boxes={k: tuple(v) for k, v in boxes.items()},
                     sizes={name: size for name, size in images.values()}, categories=cats)


def load_text_labels(folder: os.PathLike, sizes: Mapping[str, Tuple[int, int]],
                     names: Sequence[str] = ()) -> BoxLabels:
    """Box labels from ``<stem>.txt`` files (``class cx cy w h``, normalised) for the images in ``sizes``."""
    folder = Path(folder)
    boxes: Dict[str, tuple] = {}
    for image, (w, h) in sizes.items():
        txt = folder / (Path(image).stem + ".txt")
        rows = []
        if txt.is_file():
            for n, line in enumerate(txt.read_text(encoding="utf-8").splitlines(), 1):
                parts = line.split()
                if not parts:
                    continue
                try:
                    c, cx, cy, bw, bh = int(parts[0]), *(float(p) for p in parts[1:])
                except ValueError:
                    raise DetectionMetricsError(f"{txt}:{n}: expected 'class_id cx cy w h'") from None
                rows.append((c, (cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h))
        boxes[image] = tuple(rows)
    return BoxLabels(boxes=boxes, sizes=dict(sizes), categories=dict(enumerate(names)))


# ------------------------------------------------------------------ mAP


def _pycocotools():
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError:
        raise DetectionMetricsError("mAP needs pycocotools on the host: pip install pycocotools") from None
    return COCO, COCOeval


def mean_average_precision(labels: BoxLabels, detections: Mapping[str, Sequence[Detection]]) -> Dict[str, float]:
    """``{"map50": ..., "map50_95": ...}`` with COCO's evaluation (area ranges all, 100 detections).

    A detection's category is the label category whose name equals its label,
    else its class id. Images absent from ``detections`` count as found nothing.
    """
    COCO, COCOeval = _pycocotools()
    ids = {name: i + 1 for i, name in enumerate(sorted(labels.boxes))}
    by_name = {n: c for c, n in labels.categories.items()}
    cat_ids = set(labels.categories) | {c for rows in labels.boxes.values() for c, *_ in rows}
    gt = {"images": [{"id": ids[n], "file_name": n, "width": labels.sizes[n][0], "height": labels.sizes[n][1]}
                     for n in ids],
          "categories": [{"id": c, "name": labels.categories.get(c, str(c))} for c in sorted(cat_ids)],
          "annotations": []}
    for n, rows in labels.boxes.items():
        for c, x0, y0, x1, y1 in rows:
            gt["annotations"].append({"id": len(gt["annotations"]) + 1, "image_id": ids[n], "category_id": c,
                                      "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0),
                                      "iscrowd": 0})
    dets = [{"image_id": ids[n], "category_id": by_name.get(d.label, d.class_id),
             "bbox": [d.box_xyxy[0], d.box_xyxy[1], d.box_xyxy[2] - d.box_xyxy[0], d.box_xyxy[3] - d.box_xyxy[1]],
             "score": float(d.score)}
            for n, found in detections.items() if n in ids for d in found]
    if not gt["annotations"]:
        raise DetectionMetricsError("the box labels hold no boxes")
    if not dets:
        return {"map50": 0.0, "map50_95": 0.0}
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        ev = COCOeval(coco_gt, coco_gt.loadRes(dets), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {"map50": max(0.0, float(ev.stats[1])), "map50_95": max(0.0, float(ev.stats[0]))}
