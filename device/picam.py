"""Raspberry Pi camera frames at the model's size, scaled by the camera's ISP instead of the CPU.

libcamera's ISP can deliver up to two scaled output streams per frame for free.
:func:`plan_streams` asks for one at the size the model's preprocessing needs
(so the CPU resize is a no-op or nearly so) and, when annotated output is
wanted, a second full-resolution stream to draw on. The ``main`` stream is
RGB888 (BGR in memory) or, at the model's size, BGR888 (RGB in memory: no
channel swap before normalizing); the ``lores`` stream is YUV420 on a Pi 4 (its only
format there), converted here (:func:`yuv420_to_image`).

picamera2 is imported by :func:`open_picamera` only, so this module loads
anywhere; tests pass a fake camera class.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable, Optional, Tuple

import numpy as np
from PIL import Image, ImageChops

from edgepipe.device.manifest import ColorOrder, Preprocess, ResizeMode

Size = Tuple[int, int]
DISPLAY_SIZE = (640, 480)  # the stream annotations are drawn on
DEFAULT_ASPECT = 4 / 3  # when the camera does not say its sensor size


@dataclass(frozen=True)
class StreamPlan:
    """What to ask picamera2 for: the model stream's size and, optionally, a display stream.

    Without a display stream the model frames come from ``main`` (``order``:
    RGB when sized for a model, else BGR as OpenCV draws); with one, ``main``
    is the display stream and the model frames come from ``lores`` (YUV420).
    """

    model: Size
    display: Optional[Size] = None
    order: ColorOrder = ColorOrder.BGR

    def config_kwargs(self) -> dict:
        """Keyword arguments for ``Picamera2.create_preview_configuration``."""
        if self.display is None:
            # libcamera names formats by word order: "BGR888" is R, G, B in memory.
            fmt = "BGR888" if self.order == ColorOrder.RGB else "RGB888"
            return {"main": {"size": self.model, "format": fmt}}
        return {"main": {"size": self.display, "format": "RGB888"},
                "lores": {"size": self.model, "format": "YUV420"}}


def _even_up(v: float) -> int:
    # YUV420 halves both axes for chroma: whole chroma pixels need even sizes.
    return max(2, 2 * math.ceil(round(v, 6) / 2))


def model_stream_size(spec: Preprocess, aspect: float = DEFAULT_ASPECT) -> Size:
    """The smallest frame (even sides) of the camera's ``aspect`` from which ``spec``'s region is >= the model size.

    ``stretch`` gets the model size itself (the frame is stretched either way);
    ``center-crop`` a frame whose crop box is the model size; ``letterbox`` a
    frame that fits the model size with its aspect kept.
    """
    w, h = spec.width, spec.height
    if spec.resize == ResizeMode.STRETCH:
        return _even_up(w), _even_up(h)
    if spec.resize == ResizeMode.CENTER_CROP:
        frac = spec.crop_fraction if 0.0 < spec.crop_fraction <= 1.0 else 1.0
        k = h / frac if w / h <= aspect else w / (aspect * frac)
    else:
        k = min(w / aspect, h)
    return _even_up(aspect * k), _even_up(k)


def plan_streams(spec: Optional[Preprocess], display: bool, sensor: Optional[Size] = None,
                 display_size: Size = DISPLAY_SIZE) -> StreamPlan:
    """The streams for a model with preprocessing ``spec`` (None: just the display-size frame).

    The field of view follows the display stream when there is one (libcamera
    crops every stream the same way), else the sensor's aspect ratio.
    """
    if spec is None:
        return StreamPlan(model=display_size)
    aspect = display_size[0] / display_size[1] if display else (
        sensor[0] / sensor[1] if sensor and sensor[1] else DEFAULT_ASPECT)
    size = model_stream_size(spec, aspect)
    if display and (size[0] > display_size[0] or size[1] > display_size[1]):
        # lores may not be larger than main; the model then gets main itself.
        return StreamPlan(model=display_size)
    return StreamPlan(model=size, display=display_size if display else None, order=ColorOrder.RGB)


@lru_cache(maxsize=1)
def _chroma_tables() -> Tuple[np.ndarray, np.ndarray]:
    """Per (Cb, Cr) pair: the rounded chroma terms of R, G, B, split into positive and negative parts.

    Each packs (r, g, b, 0) bytes into one uint32, so one gather per chroma
    sample yields an RGBX pixel.
    """
    cb, cr = np.meshgrid(np.arange(256.0) - 128.0, np.arange(256.0) - 128.0, indexing="ij")
    terms = np.stack([np.floor(1.402 * cr + 0.5), np.floor(-0.344136 * cb - 0.714136 * cr + 0.5),
                      np.floor(1.772 * cb + 0.5), np.zeros_like(cb)], axis=-1).reshape(65536, 4)
    pos = np.ascontiguousarray(np.clip(terms, 0, 255).astype(np.uint8)).view(np.uint32).reshape(-1)
    neg = np.ascontiguousarray(np.clip(-terms, 0, 255).astype(np.uint8)).view(np.uint32).reshape(-1)
    return pos, neg


def yuv420_to_image(buf: np.ndarray, width: int, height: int) -> Image.Image:
    """An I420 (YUV420 planar) buffer as an RGB PIL image, BT.601 full range (sYCC/JPEG).

    ``buf`` is what picamera2 returns for a YUV420 stream: ``height * 3 // 2``
    rows of ``stride`` bytes (Y rows, then U and V rows of ``stride // 2``);
    padding beyond ``width`` is ignored. Each channel is ``clip(Y + term)``
    with the chroma term rounded once per 2x2 block (a table lookup); the
    full-size work is PIL's saturating add/subtract in C: about 4x cheaper
    than numpy broadcasting, and rounded where PIL's own YCbCr conversion
    truncates.
    """
    if width % 2 or height % 2:
        raise ValueError(f"YUV420 needs even sides, got {width}x{height}")
    flat = np.ascontiguousarray(buf, dtype=np.uint8).reshape(-1)
    stride = flat.size * 2 // (height * 3)
    if stride < width or stride * height * 3 // 2 != flat.size:
        raise ValueError(f"a YUV420 buffer of {flat.size} bytes does not hold {width}x{height}")
    cs, ch, cw = stride // 2, height // 2, width // 2
    u0, v0 = stride * height, stride * height + cs * ch
    u = flat[u0: u0 + cs * ch].reshape(ch, cs)[:, :cw]
    v = flat[v0: v0 + cs * ch].reshape(ch, cs)[:, :cw]
    idx = (u.astype(np.intp) << 8) | v
    pos, neg = (Image.frombuffer("RGBX", (cw, ch), np.take(t, idx), "raw", "RGBX", 0, 1)
                .resize((width, height), Image.Resampling.NEAREST) for t in _chroma_tables())
    y = Image.frombuffer("L", (width, height), flat[: stride * height], "raw", "L", stride, 1)
    # One of pos/neg is 0 per pixel and channel, so add-then-subtract (each clipping) is clip(Y + term).
    rgbx = ImageChops.subtract(ImageChops.add(Image.merge("RGBX", (y, y, y, y)), pos), neg)
    return rgbx.convert("RGB")


def yuv420_to_rgb(buf: np.ndarray, width: int, height: int) -> np.ndarray:
    """:func:`yuv420_to_image` as an HxWx3 uint8 RGB array."""
    return np.asarray(yuv420_to_image(buf, width, height))


@dataclass
class PiCamera:
    """An opened, started picamera2 camera and how to read its frames."""

    cam: Any
    plan: StreamPlan

    def grab(self) -> Tuple[Any, ColorOrder, Optional[np.ndarray]]:
        """One frame: (model frame, its channel order, display frame or None).

        The model frame is an array from ``main`` (in ``plan.order``) or an
        RGB PIL image converted from ``lores``; preprocessing takes either.
        """
        if self.plan.display is None:
            return self.cam.capture_array("main"), self.plan.order, None
        (main, lores), _meta = self.cam.capture_arrays(["main", "lores"])
        w, h = self.plan.model
        return yuv420_to_image(lores, w, h), ColorOrder.RGB, main

    def close(self) -> None:
        try:
            self.cam.stop()
        finally:
            self.cam.close()


def start_picamera(factory: Callable[[int], Any], index: int, spec: Optional[Preprocess],
                   display: bool) -> PiCamera:
    """Open camera ``index`` with ``factory`` (``Picamera2``), configure the planned streams and start it.

    The configured sizes win over the plan (libcamera may adjust them), so
    the YUV conversion reads what the camera really sends.
    """
    cam = factory(index)
    sensor = getattr(cam, "sensor_resolution", None)
    plan = plan_streams(spec, display, tuple(sensor) if sensor else None)
    config = cam.create_preview_configuration(**plan.config_kwargs())
    cam.configure(config)
    actual = cam.camera_configuration() if hasattr(cam, "camera_configuration") else config
    model_stream = actual.get("lores" if plan.display else "main") or {}
    size = tuple(model_stream.get("size") or plan.model)
    plan = StreamPlan(model=(int(size[0]), int(size[1])), display=plan.display, order=plan.order)
    cam.start()
    return PiCamera(cam, plan)


__all__ = ["DISPLAY_SIZE", "PiCamera", "StreamPlan", "model_stream_size", "plan_streams", "start_picamera",
           "yuv420_to_image", "yuv420_to_rgb"]
