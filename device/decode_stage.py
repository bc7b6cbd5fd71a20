"""The decode stage of `edgerun run`: detection/segmentation outputs -> prediction lines, summary, annotation.

:func:`decoder_for` picks the decoder of a run: the manifest's ``decoder``
block, else one inferred from the output shapes (the assumption is returned so
the run records and prints it), with command-line thresholds applied.
:class:`DecodeStage` then turns each frame's raw outputs into a
:class:`~edgepipe.device.decode.DecodeResult` with boxes in the frame's own
pixels, keeps the report's ``detections`` summary, and hands the frame to an
:class:`~edgepipe.device.annotate.Annotator` (drawing runs in its worker, off
the inference path).
"""
from __future__ import annotations

import io
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np

from edgepipe.device.bundle import Task
from edgepipe.device.decode import (DecodeError, DecodeResult, DecoderKind, DecoderSpec, geometry_for, infer_decoder,
                                    make_decoder)

DECODED_TASKS = (Task.DETECTION, Task.SEGMENTATION)
VIDEO_SUFFIX = ".mp4"


@dataclass(frozen=True)
class Thresholds:
    """Command-line overrides of the decoder's parameters (None: keep the manifest's)."""

    score: Optional[float] = None
    iou: Optional[float] = None
    max_detections: Optional[int] = None

    def any(self) -> bool:
        return any(v is not None for v in (self.score, self.iou, self.max_detections))


def decoder_for(manifest: Any, task: Optional[Task], outputs: Sequence[Any],
                thresholds: Thresholds = Thresholds()) -> Tuple[Optional[DecoderSpec], List[str]]:
    """The decoder spec of a run and what was assumed, or (None, []) when the run does not decode.

    ``task`` is the task asked for (command line) or None. The manifest's
    ``decoder`` wins; a plain model, or a detection/segmentation task without
    decoder parameters, gets one inferred from the output shapes. DecodeError
    (one line) for parameters that cannot be used.
    """
    block = getattr(manifest, "decoder", None) if manifest is not None else None
    wanted = task if task is not None else (manifest.task if manifest is not None else None)
    if wanted is not None and wanted not in DECODED_TASKS and block is None:
        return None, []
    if block is not None:
        spec, notes = DecoderSpec.from_dict(block), []
    else:
        try:
            spec, note = infer_decoder(outputs)
        except DecodeError:
            if wanted in DECODED_TASKS:
                raise
            return None, []  # a plain model we cannot decode: summarised as before
        notes = [note if manifest is None else note.replace("no manifest", "no decoder in the manifest")]
    _check_fits(wanted, spec)
    if thresholds.any():
        spec = spec.with_thresholds(score=thresholds.score, iou=thresholds.iou,
                                    max_detections=thresholds.max_detections)
    return spec, notes


def _check_fits(wanted: Optional[Task], spec: DecoderSpec) -> None:
    """DecodeError when the task asked for cannot come from this decoder."""
    if wanted == Task.SEGMENTATION and spec.kind != DecoderKind.SEGMENTATION or (
            wanted == Task.DETECTION and spec.kind == DecoderKind.SEGMENTATION):
        raise DecodeError(f"task {wanted.value} does not fit the {spec.kind.value} decoder of this model")


def task_of(spec: DecoderSpec) -> Task:
    return Task.SEGMENTATION if spec.kind == DecoderKind.SEGMENTATION else Task.DETECTION


def source_size(data: Any) -> Tuple[int, int]:
    """(width, height) of a frame as captured: array shape, PIL size, or the encoded image's header."""
    if isinstance(data, np.ndarray):
        return int(data.shape[1]), int(data.shape[0])
    if hasattr(data, "size") and hasattr(data, "mode"):
        return tuple(data.size)  # type: ignore[return-value]
    from PIL import Image

    src = io.BytesIO(data) if isinstance(data, (bytes, bytearray, memoryview)) else data
    with Image.open(src) as im:  # the header only: no pixels decoded
        return im.size


class Summary:
    """The report's decoded-output summary, accumulated frame by frame."""

    def __init__(self, task: Task):
        self.task = task
        self.frames = 0
        self.boxes: List[int] = []
        self.classes: Counter = Counter()
        self.area: Counter = Counter()  # segmentation: summed fraction per class

    def add(self, result: DecodeResult) -> None:
        self.frames += 1
        if result.segmentation is not None:
            for a in result.segmentation.areas:
                self.area[a.label or str(a.class_id)] += a.fraction
            return
        self.boxes.append(len(result.detections))
        self.classes.update(d.label or str(d.class_id) for d in result.detections)

    def to_dict(self) -> dict:
        out: dict = {"task": self.task.value, "frames": self.frames}
        if self.task == Task.SEGMENTATION:
            n = max(1, self.frames)
            out["classes"] = {k: round(v / n, 5) for k, v in self.area.most_common()}
            return out
        b = np.asarray(self.boxes or [0])
        out.update(boxes=int(b.sum()), boxes_per_frame={"mean": round(float(b.mean()), 4), "max": int(b.max()),
                                                         "frames_with_boxes": int(np.count_nonzero(b))},
                   classes=dict(self.classes.most_common()))
        return out


class DecodeStage:
    """Per frame: decode in source pixels, summarise, queue for annotation."""

    def __init__(self, spec: DecoderSpec, outputs: Sequence[Any], labels: Sequence[str], pre: Any,
                 notes: Sequence[str] = (), annotator: Any = None):
        self.spec = spec
        self.pre = pre
        self.decoder = make_decoder(spec, outputs, labels, input_size=(pre.width, pre.height))
        self.task = task_of(spec)
        self.notes = list(notes)
        self.annotator = annotator
        self.summary = Summary(self.task)

    def decode(self, raw: Sequence[np.ndarray], size: Optional[Tuple[int, int]]) -> DecodeResult:
        """Boxes in the frame's pixels (normalised to the model input when the size is unknown)."""
        geometry = geometry_for(self.pre, *size) if size else None
        return self.decoder(raw, geometry)

    def record(self, frame: Any, result: DecodeResult) -> dict:
        """The prediction line's decoded part; the frame goes to the annotator's queue."""
        self.summary.add(result)
        if self.annotator is not None:
            self.annotator.submit(frame.data, result, name=frame.name, order=frame.order)
        return result.to_json()

    def report_block(self, annotated: Optional[dict] = None) -> dict:
        out = self.summary.to_dict()
        how = self.decoder.assumption
        said = any(how in n for n in self.notes)
        out.update(decoder=self.spec.to_dict(), assumed=list(self.notes) + ([] if said else [how]))
        if annotated:
            out["annotated"] = annotated
        return out


def open_annotator(out: os.PathLike, source_kind: str, fps: Optional[float], source_name: str = ""):
    """A JPEG folder for image sources, an MP4 for video and cameras (AnnotateError without OpenCV)."""
    from edgepipe.device.annotate import AnnotateError, Annotator

    out = Path(out)
    if source_kind in ("image", "folder"):
        if out.suffix.lower() == VIDEO_SUFFIX:
            raise AnnotateError(f"{out}: image sources are annotated into a folder of JPEGs, not an MP4")
        return Annotator(out, "images")
    if out.is_dir():
        out = out / (Path(source_name).stem + "_annotated.mp4" if source_name else "annotated.mp4")
    elif out.suffix.lower() != VIDEO_SUFFIX:
        raise AnnotateError(f"{out}: video and camera sources are annotated into an .mp4 file (or an "
                            "existing folder)")
    return Annotator(out, "video", fps=fps or 10.0)


__all__ = ["DECODED_TASKS", "DecodeStage", "Summary", "Thresholds", "decoder_for", "open_annotator",
           "source_size", "task_of"]
