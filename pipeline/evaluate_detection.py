"""`edgepipe evaluate` on detection bundles: agreement with the float model, and mAP against box labels.

Each bundle runs over the image folder through the device runner (the same
preprocessing, decoder and source-pixel mapping as ``edgerun run``), once,
with a low score threshold so mAP sees the whole precision/recall curve;
agreement with the float model then keeps only detections at the bundle's
own threshold. The float reference is ``--reference`` (a bundle or a float
.tflite), else the fp32 bundle given alongside, else the ``<name>-fp32``
bundle next to each bundle.

Box labels (optional): ``--labels`` naming a COCO JSON file or a folder of
``<image stem>.txt`` files (``class cx cy w h``, normalised), else
``labels.json`` / ``instances.json`` in the data folder, else ``.txt`` files
beside the images.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from edgepipe.device.bundle import Bundle, BundleError, Task, load_bundle
from edgepipe.device.decode import Detection
from edgepipe.device.errors import EdgepipeError
from edgepipe.pipeline.detection_metrics import (BoxLabels, agreement, load_coco_labels, load_text_labels,
                                                 mean_average_precision)

MAP_SCORE_THRESHOLD = 0.05
LABEL_FILES = ("labels.json", "instances.json", "annotations.json")

Dets = Dict[str, List[Detection]]


class DetectionEvalError(EdgepipeError, ValueError):
    """A detection evaluation that cannot run; one line."""


def is_detection(bundle: Bundle) -> bool:
    """A bundle whose manifest says detection (or records a non-segmentation decoder)."""
    m = bundle.manifest
    if m is None:
        return False
    if m.decoder is not None:
        return m.decoder.get("kind") != "segmentation"
    return m.task == Task.DETECTION


def detect_folder(model: Path, images: Path, *, score: float, threads: Optional[int] = None) -> Tuple[Dets, dict]:
    """Detections per image name (source pixels) and the run report, via the device runner."""
    from edgepipe.device.decode_stage import Thresholds
    from edgepipe.device.runner import run_source

    found: Dets = {}

    def collect(rec: dict) -> None:
        if "detections" in rec:
            found[rec["source"]] = [Detection(tuple(d["box"]), d["class_id"], d["score"], d.get("label"))
                                    for d in rec["detections"]]

    report = run_source(model, str(images), threads=threads, on_prediction=collect, task="detection",
                        thresholds=Thresholds(score=score))
    if report["errors"]:
        raise DetectionEvalError(f"{Path(model).name}: {report['errors'][0]}")
    return found, report


def own_threshold(model: Path) -> float:
    """The score threshold the model's manifest decoder sets (the decoders' default 0.5 otherwise)."""
    from edgepipe.device.decode import DecoderSpec

    try:
        m = load_bundle(model).manifest
    except BundleError:
        m = None
    block = m.decoder if m is not None and m.decoder is not None else {"kind": "postprocessed"}
    return DecoderSpec.from_dict(block).score_threshold


def _above(dets: Dets, threshold: float) -> Dets:
    return {k: [d for d in v if d.score >= threshold] for k, v in dets.items()}


def find_reference(bundle: Bundle, given: Sequence[Bundle], reference: Optional[Path]) -> Path:
    """The float model the bundle is compared with (DetectionEvalError when there is none)."""
    if reference is not None:
        if not Path(reference).exists():
            raise DetectionEvalError(f"reference {reference}: no such file or directory")
        return Path(reference)
    stem = _stem(bundle)
    for b in given:
        if b.manifest.recipe == "fp32" and _stem(b) == stem:
            return b.path
    sibling = bundle.path.parent / f"{stem}-fp32"
    if (sibling / "manifest.json").is_file():
        return sibling
    raise DetectionEvalError(f"{bundle.name}: no float reference (no {stem}-fp32 bundle beside it); "
                             "convert the fp32 recipe too or name the float model")


def _stem(b: Bundle) -> str:
    """The bundle's name without its recipe (``<name>-<recipe>``, as edgepipe convert names them)."""
    tail = f"-{b.manifest.recipe}"
    return b.name[:-len(tail)] if b.name.endswith(tail) else b.name


def image_sizes(images: Path) -> Dict[str, Tuple[int, int]]:
    """(w, h) of every image in the folder, from the headers."""
    from PIL import Image

    from edgepipe.device.preprocess import list_images

    out = {}
    for p in list_images(images)[0]:
        try:
            with Image.open(p) as im:
                out[p.name] = im.size
        except OSError:
            continue
    return out


def load_box_labels(data: Path, labels: Optional[Path], names: Sequence[str]) -> Optional[BoxLabels]:
    """Box labels from ``labels`` or found in ``data``; None when the data has none."""
    if labels is None:
        labels = next((data / n for n in LABEL_FILES if (data / n).is_file()), None)
    if labels is None and any(data.glob("*.txt")):
        labels = data
    if labels is None:
        return None
    if labels.is_dir():
        return load_text_labels(labels, image_sizes(data), names)
    if labels.suffix.lower() == ".json":
        return load_coco_labels(labels)
    raise DetectionEvalError(f"labels {labels}: expected a COCO .json file or a folder of .txt files")


def evaluate_detection(bundle_paths: Sequence[Path], data: Path, *, reference: Optional[Path] = None,
                       labels_file: Optional[Path] = None, threads: Optional[int] = None,
                       progress: Optional[Callable[[str, int], None]] = None) -> list:
    """One ``BundleEval`` per detection bundle (agreement with the float model; mAP with labels)."""
    from edgepipe.pipeline.evaluate import BundleEval

    say = progress or (lambda msg, n: None)
    bundles = [_open(Path(p)) for p in bundle_paths]
    truth = load_box_labels(Path(data), labels_file, next((b.labels for b in bundles if b.labels), ()))
    runs: Dict[str, Tuple[Dets, dict]] = {}

    def run(model: Path) -> Tuple[Dets, dict]:
        key = str(Path(model).resolve())
        if key not in runs:
            say(f"detecting with {Path(model).name}", 0)
            runs[key] = detect_folder(Path(model), Path(data), score=MAP_SCORE_THRESHOLD, threads=threads)
        return runs[key]

    out = []
    for b in bundles:
        t0 = time.perf_counter()
        ref_path = find_reference(b, bundles, reference)
        dets, _ = run(b.path)
        ref, _ = run(ref_path)
        agr = agreement(_above(ref, own_threshold(ref_path)), _above(dets, own_threshold(b.path)))
        acc: dict = {"task": "detection"}
        if truth is not None:
            acc.update(mean_average_precision(truth, dets), labelled_images=len(truth.boxes))
        m = b.manifest
        out.append(BundleEval(
            bundle=b.name, path=str(b.path), recipe=m.recipe, size=m.model_size, sha256=m.model_sha256,
            images=len(dets), accuracy=acc, agreement=dict(agr.to_dict(), iou_threshold=0.5),
            reference=str(ref_path), seconds=time.perf_counter() - t0,
            notes=[] if truth is not None else ["no box labels: agreement with the float model only"]))
    return out


def _open(path: Path) -> Bundle:
    try:
        b = load_bundle(path)
    except BundleError as e:
        raise DetectionEvalError(str(e)) from None
    if not is_detection(b):
        raise DetectionEvalError(f"{path}: not a detection bundle (its manifest has no detection task "
                                 "or decoder)")
    return b


def format_detection_results(results) -> str:
    """The results table: size, images, agreement with the float model, mAP when labelled."""
    from edgepipe.device.tables import format_bytes, format_table

    def num(v) -> str:
        return f"{v:.4f}" if isinstance(v, float) else "-"

    rows = [[r.bundle, r.recipe or "-", format_bytes(r.size), str(r.images),
             num((r.agreement or {}).get("precision")), num((r.agreement or {}).get("recall")),
             num((r.agreement or {}).get("mean_iou")), num(r.accuracy.get("map50")),
             num(r.accuracy.get("map50_95"))] for r in results]
    return format_table(["bundle", "recipe", "size", "images", "precision", "recall", "mean IoU", "mAP@.5",
                         "mAP@.5:.95"], rows)


__all__ = ["DetectionEvalError", "all_detection", "detect_folder", "evaluate_detection", "find_reference",
           "format_detection_results", "is_detection", "load_box_labels"]


def all_detection(paths: Sequence[Path]) -> bool:
    """True when every path is a detection bundle (then ``edgepipe evaluate`` takes this module's path)."""
    try:
        return bool(paths) and all(is_detection(load_bundle(Path(p))) for p in paths)
    except BundleError:
        return False
