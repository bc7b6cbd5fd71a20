"""Annotated output: boxes, labels and scores (or a mask overlay) drawn with Pillow.

:func:`draw` is the pure drawing step. :class:`Annotator` runs it in a worker
thread fed by a bounded queue, so drawing and encoding stay off the inference
path: ``submit`` only enqueues (blocking when the worker is ``queue_size``
frames behind, so no frame is silently lost), and ``close`` drains the queue
and finishes the output. Image sources give a folder of JPEGs; video and
camera sources give one MP4 written by OpenCV's ``VideoWriter`` ('mp4v').
"""
from __future__ import annotations

import os
import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Tuple

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from edgepipe.device.bundle import ColorOrder
from edgepipe.device.errors import EdgepipeError

# Distinct, readable box colours, picked by class id.
COLOURS = ((255, 56, 56), (50, 205, 50), (30, 144, 255), (255, 178, 29), (207, 210, 49), (72, 249, 10),
           (146, 204, 23), (61, 219, 134), (26, 147, 52), (0, 212, 187), (44, 153, 168), (0, 194, 255),
           (52, 69, 147), (100, 115, 255), (0, 24, 236), (132, 56, 255), (82, 0, 133), (203, 56, 255))
OVERLAY_ALPHA = 0.45
_STOP = object()


class AnnotateError(EdgepipeError):
    """Annotated output that cannot be written; one line."""


def colour(class_id: int) -> Tuple[int, int, int]:
    return COLOURS[int(class_id) % len(COLOURS)]


def to_pil(frame: Any, order: ColorOrder = ColorOrder.RGB) -> Image.Image:
    """A frame as an RGB PIL image: a PIL image, a uint8 array (RGB/BGR/gray) or encoded bytes / a path."""
    if isinstance(frame, Image.Image):
        return frame.convert("RGB")
    if isinstance(frame, np.ndarray):
        a = frame
        if a.ndim == 3 and a.shape[2] >= 3:
            a = a[:, :, :3]
            if ColorOrder(order) == ColorOrder.BGR:
                a = a[:, :, ::-1]
        return Image.fromarray(np.ascontiguousarray(a)).convert("RGB")
    import io
    try:
        src = io.BytesIO(frame) if isinstance(frame, (bytes, bytearray, memoryview)) else frame
        with Image.open(src) as im:
            return im.convert("RGB")
    except (OSError, ValueError, SyntaxError) as exc:
        raise AnnotateError(f"cannot decode frame for annotation ({exc})") from None


def draw(image: Image.Image, result: Any, *, line: Optional[int] = None) -> Image.Image:
    """A copy of ``image`` with the decoded result drawn on it (a ``DecodeResult``)."""
    img = image.convert("RGB")
    seg = getattr(result, "segmentation", None)
    if seg is not None:
        img = overlay_mask(img, np.asarray(seg.mask))
    dets = getattr(result, "detections", ())
    if not dets:
        return img
    d = ImageDraw.Draw(img)
    width = line or max(2, round(min(img.size) / 200))
    font = ImageFont.load_default()
    for det in dets:
        x0, y0, x1, y1 = (float(v) for v in det.box_xyxy)
        c = colour(det.class_id)
        d.rectangle((x0, y0, x1, y1), outline=c, width=width)
        text = f"{det.label or det.class_id} {det.score:.2f}"
        tx0, ty0, tx1, ty1 = d.textbbox((0, 0), text, font=font)
        tw, th = tx1 - tx0 + 4, ty1 - ty0 + 4
        ty = y0 - th if y0 - th >= 0 else y0
        d.rectangle((x0, ty, x0 + tw, ty + th), fill=c)
        d.text((x0 + 2, ty + 2 - ty0), text, fill=(255, 255, 255), font=font)
    return img


def overlay_mask(image: Image.Image, mask: np.ndarray, alpha: float = OVERLAY_ALPHA) -> Image.Image:
    """Blend a class-id mask (0 = background, left untouched) over the image."""
    if mask.shape[:2] != (image.height, image.width):
        mask = np.asarray(Image.fromarray(mask.astype(np.uint8)).resize(image.size, Image.Resampling.NEAREST))
    base = np.asarray(image, dtype=np.float32)
    lut = np.array([colour(i) for i in range(256)], dtype=np.float32)
    colours = lut[np.clip(mask, 0, 255).astype(np.int64)]
    fg = (mask > 0)[:, :, None]
    out = np.where(fg, base * (1 - alpha) + colours * alpha, base)
    return Image.fromarray(out.round().astype(np.uint8), "RGB")


@dataclass(frozen=True)
class Item:
    frame: Any
    order: ColorOrder
    name: str
    result: Any


class Annotator:
    """Draws and writes annotated frames in a worker thread.

    ``kind`` is ``"images"`` (a folder of JPEGs named after the frames) or
    ``"video"`` (``out`` is an .mp4 file; needs OpenCV). Errors in the worker
    are kept and raised by ``close``.
    """

    def __init__(self, out: os.PathLike, kind: str = "images", *, fps: float = 10.0, queue_size: int = 8,
                 quality: int = 90):
        if kind not in ("images", "video"):
            raise AnnotateError(f"annotation output kind must be images or video, got {kind!r}")
        self.out = Path(out)
        self.kind = kind
        self.fps = float(fps) if fps and fps > 0 else 10.0
        self.quality = int(quality)
        self.written = 0
        self._cv2 = _import_cv2() if kind == "video" else None
        self._writer: Any = None
        self._error: Optional[BaseException] = None
        if kind == "images":
            try:
                self.out.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise AnnotateError(f"{self.out}: cannot create the annotation folder ({exc.strerror})") from None
        elif not self.out.parent.is_dir():
            raise AnnotateError(f"{self.out.parent}: no such directory for the annotated video")
        self._queue: "queue.Queue[Any]" = queue.Queue(maxsize=max(1, int(queue_size)))
        self._thread = threading.Thread(target=self._run, name="edgepipe-annotate", daemon=True)
        self._thread.start()

    def submit(self, frame: Any, result: Any, *, name: str = "", order: ColorOrder = ColorOrder.RGB) -> None:
        """Queue one frame (array, PIL image or encoded bytes) with its ``DecodeResult``."""
        if self._error is not None:
            raise AnnotateError(f"annotation stopped: {self._error}")
        self._queue.put(Item(frame, ColorOrder(order), name, result))

    def close(self) -> int:
        """Finish the queued frames and the output; returns how many frames were written."""
        if self._thread.is_alive():
            self._queue.put(_STOP)
            self._thread.join()
        if self._writer is not None:
            self._writer.release()
            self._writer = None
        if self._error is not None:
            raise AnnotateError(f"annotation failed after {self.written} frame(s): {self._error}")
        return self.written

    def __enter__(self) -> "Annotator":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            if self._error is not None:
                continue  # keep draining so producers never block on a dead worker
            try:
                self._write(draw(to_pil(item.frame, item.order), item.result), item.name)
                self.written += 1
            except (OSError, ValueError, EdgepipeError) as exc:
                self._error = exc

    def _write(self, img: Image.Image, name: str) -> None:
        if self.kind == "images":
            stem = Path(name).stem if name else f"frame_{self.written:06d}"
            img.save(self.out / f"{stem}.jpg", format="JPEG", quality=self.quality)
            return
        cv2 = self._cv2
        if self._writer is None:
            self._writer = cv2.VideoWriter(str(self.out), cv2.VideoWriter_fourcc(*"mp4v"), self.fps, img.size)
            if not self._writer.isOpened():
                raise OSError(f"OpenCV cannot write {self.out} (mp4v)")
            self._size = img.size
        if img.size != self._size:
            img = img.resize(self._size, Image.Resampling.BILINEAR)
        self._writer.write(np.asarray(img)[:, :, ::-1].copy())


def _import_cv2():
    try:
        import cv2  # noqa: F401  (optional: only MP4 output needs it)
    except ImportError:
        raise AnnotateError("writing an annotated MP4 needs OpenCV: pip install opencv-python-headless "
                            "(or annotate an image folder instead)") from None
    return cv2
