"""Map boxes from the model input back to source-image pixels.

Preprocessing takes a *region* of the source image (all of it, or a centred
crop) and resizes it onto a *content* rectangle of the model input (all of it,
or a centred rectangle with padding around it for letterbox). Both are
recorded in :class:`PreprocessGeometry`; undoing them is one affine map per
axis, so stretch, centre-crop and letterbox share one function.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Tuple

import numpy as np

from edgepipe.device.decode.spec import DecodeError

LETTERBOX = "letterbox"


@dataclass(frozen=True)
class PreprocessGeometry:
    """Where a source image went in the model input.

    ``region``: (x0, y0, x1, y1) of the source, in source pixels, that was resized.
    ``content``: (x0, y0, x1, y1) of the model input, normalised to [0, 1], that
    the region filled (the rest is letterbox padding).
    """

    src_w: int
    src_h: int
    region: Tuple[float, float, float, float]
    content: Tuple[float, float, float, float] = (0.0, 0.0, 1.0, 1.0)

    def __post_init__(self):
        if self.src_w <= 0 or self.src_h <= 0:
            raise DecodeError(f"source size must be positive, got {self.src_w}x{self.src_h}")
        rx0, ry0, rx1, ry1 = self.region
        cx0, cy0, cx1, cy1 = self.content
        if not (rx1 > rx0 and ry1 > ry0 and cx1 > cx0 and cy1 > cy0):
            raise DecodeError(f"empty preprocessing region {self.region} or content {self.content}")


def stretch(src_w: int, src_h: int) -> PreprocessGeometry:
    """The whole image resized to the whole input (aspect ratio not kept)."""
    return PreprocessGeometry(src_w, src_h, (0.0, 0.0, float(src_w), float(src_h)))


def letterbox(src_w: int, src_h: int, model_w: int, model_h: int) -> PreprocessGeometry:
    """The whole image scaled to fit, centred, padded to the input size (aspect ratio kept).

    The placement is preprocessing's own (whole pixels), so boxes map back exactly.
    """
    from edgepipe.device.preprocess import letterbox_layout

    nw, nh, left, top = letterbox_layout(float(src_w), float(src_h), model_w, model_h)
    return PreprocessGeometry(src_w, src_h, (0.0, 0.0, float(src_w), float(src_h)),
                              (left / model_w, top / model_h, (left + nw) / model_w, (top + nh) / model_h))


def geometry_for(preprocess: Any, src_w: int, src_h: int) -> PreprocessGeometry:
    """The geometry of a bundle's ``Preprocess`` applied to a ``src_w`` x ``src_h`` image.

    ``src_w``/``src_h`` are the source image's own size (before any JPEG draft
    scaling: the crop box is defined in original pixels). Resize modes:
    stretch, center-crop (``preprocess.crop_box``) and letterbox.
    """
    mode = getattr(getattr(preprocess, "resize", "stretch"), "value", getattr(preprocess, "resize", "stretch"))
    if mode == "stretch":
        return stretch(src_w, src_h)
    if mode == LETTERBOX:
        return letterbox(src_w, src_h, preprocess.width, preprocess.height)
    if mode == "center-crop":
        from edgepipe.device.preprocess import crop_box
        return PreprocessGeometry(src_w, src_h, tuple(float(v) for v in crop_box(src_w, src_h, preprocess)))
    raise DecodeError(f"cannot map boxes back through resize mode {mode!r}")


def to_source_coords(boxes_norm: np.ndarray, src_w: int, src_h: int, geometry: PreprocessGeometry,
                     clip: bool = True) -> np.ndarray:
    """(N, 4) ``x0, y0, x1, y1`` normalised to the model input -> source-image pixels.

    ``src_w``/``src_h`` must match the geometry's (they are passed so call
    sites read naturally and a mix-up is caught). Clipped to the image.
    """
    if (src_w, src_h) != (geometry.src_w, geometry.src_h):
        raise DecodeError(f"geometry is for a {geometry.src_w}x{geometry.src_h} image, not {src_w}x{src_h}")
    b = np.asarray(boxes_norm, dtype=np.float64).reshape(-1, 4)
    rx0, ry0, rx1, ry1 = geometry.region
    cx0, cy0, cx1, cy1 = geometry.content
    sx, sy = (rx1 - rx0) / (cx1 - cx0), (ry1 - ry0) / (cy1 - cy0)
    out = np.empty_like(b)
    out[:, 0::2] = rx0 + (b[:, 0::2] - cx0) * sx
    out[:, 1::2] = ry0 + (b[:, 1::2] - cy0) * sy
    if clip:
        out[:, 0::2] = np.clip(out[:, 0::2], 0.0, src_w)
        out[:, 1::2] = np.clip(out[:, 1::2], 0.0, src_h)
    return out


def source_pixel_grid(geometry: PreprocessGeometry, mask_w: int, mask_h: int) -> Tuple[np.ndarray, np.ndarray]:
    """For every source pixel, the mask column/row it falls in (-1 outside the region).

    Used to bring a model-resolution mask back to source pixels (nearest).
    """
    rx0, ry0, rx1, ry1 = geometry.region
    cx0, cy0, cx1, cy1 = geometry.content

    def axis(n_src, r0, r1, c0, c1, n_mask):
        centres = np.arange(n_src, dtype=np.float64) + 0.5
        u = c0 + (centres - r0) / (r1 - r0) * (c1 - c0)  # normalised model-input coordinate
        idx = np.floor(u * n_mask).astype(np.int64)
        inside = (centres >= r0) & (centres < r1)
        return np.where(inside, np.clip(idx, 0, n_mask - 1), -1)

    return (axis(geometry.src_w, rx0, rx1, cx0, cx1, mask_w),
            axis(geometry.src_h, ry0, ry1, cy0, cy1, mask_h))
