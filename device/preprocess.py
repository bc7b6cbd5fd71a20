"""Image preprocessing: one decoded image -> the float input the model expects.

Shared by the device runner and the host's calibration/evaluation, so host and
device numerics are identical by construction.

Definition of the numerics (``load_image`` and ``reference_preprocess`` agree on it):

1. Decode. JPEG files opened from a path are decoded with libjpeg's DCT scaling
   (PIL "draft" mode) at the largest factor s in {8, 4, 2, 1} that keeps the
   region to be resized (see 3) at least ``height`` x ``width`` pixels, i.e.
   ``region_w / s >= width and region_h / s >= height``. Every other input
   (PNG, BMP, ..., PIL images, arrays) is used at full size (s = 1).
   EXIF orientation is not applied, like TensorFlow's and most training
   pipelines' decoders, so device inputs match what the model was trained on.
2. Colour. Pixels become 8-bit RGB (PIL ``convert``), or 8-bit gray with PIL's
   ITU-R 601-2 integer formula ``(19595 R + 38470 G + 7471 B + 32768) >> 16``.
3. Region. ``stretch`` and ``letterbox``: the whole image. ``center-crop``: the
   largest centred box with the model's aspect ratio, scaled by ``crop_fraction``. Box corners
   are float32 numbers in original-image pixels, divided by s after decoding.
4. Resize. One separable resample of the box to ``height`` x ``width`` with
   PIL's filters (bilinear = triangle widened by the downscale factor, so it
   antialiases) in PIL's 8-bit arithmetic: coefficients normalized in float64
   then rounded to 22-bit fixed point, horizontal pass first, each pass
   rounded and clipped to 8 bits -- exactly ``Image.resize`` on 8-bit images,
   what most training pipelines (Keras, PIL-based loaders) feed a model.
   (Nearest: the pixel under each sample centre, ``floor(x0 + (i + .5) * scale)``.)
   ``letterbox`` resizes to the largest size that fits with the aspect ratio kept
   (:func:`letterbox_layout`, whole pixels), centred on a ``LETTERBOX_FILL`` canvas.
5. Normalize. Channels in ``color`` order; ``(pixel - mean) / std`` in float64,
   returned as float32 (H, W, C) (a 256-entry table per channel).

The fast path does all of this with C loops (PIL) and a table lookup. The
reference (:mod:`edgepipe.device.preprocess_ref`, re-exported here as
``reference_preprocess``) does steps 2-5 in plain numpy integer arithmetic; the two are
bit-identical on every CPU (no floating-point sums to reorder or fuse),
because both also make the same decode choice in step 1.
"""
from __future__ import annotations

import os
import warnings
from functools import lru_cache
from pathlib import Path
from typing import Any, List, Sequence, Tuple, Union

import numpy as np
from PIL import Image

from edgepipe.device.bundle import ColorOrder, Preprocess, ResizeMode
from edgepipe.device.errors import EdgepipeError

# Extensions treated as images when listing a folder; everything else is
# counted as skipped. Unreadable files with these extensions are the caller's
# to skip (load_image raises ImageError).
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pnm"})
JPEG_SCALES = (8, 4, 2, 1)

_FILTERS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "box": Image.Resampling.BOX,
    "area": Image.Resampling.BOX,
    "lanczos": Image.Resampling.LANCZOS,
}

ImageInput = Union[str, os.PathLike, Image.Image, np.ndarray, Any]


class ImageError(EdgepipeError, ValueError):
    """An image that cannot be read or used; the message is one line."""


def list_images(folder: os.PathLike) -> Tuple[List[Path], int]:
    """Image files directly in ``folder``, sorted by name, and how many other files were skipped.

    Sub-directories are ignored (neither listed nor counted). Raises
    FileNotFoundError / NotADirectoryError with a one-line message.
    """
    p = Path(folder)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such directory")
    if not p.is_dir():
        raise NotADirectoryError(f"{p}: not a directory")
    images, skipped = [], 0
    for entry in os.scandir(p):
        if not entry.is_file():
            continue
        if os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS:
            images.append(Path(entry.path))
        else:
            skipped += 1
    images.sort(key=lambda q: q.name)
    return images, skipped


def filter_for(spec: Preprocess) -> Image.Resampling:
    try:
        return _FILTERS[spec.interpolation.lower()]
    except KeyError:
        raise ImageError(f"unsupported interpolation {spec.interpolation!r} "
                         f"(use one of: {', '.join(sorted(_FILTERS))})") from None


def crop_box(width: int, height: int, spec: Preprocess) -> Tuple[float, float, float, float]:
    """The region of a ``width`` x ``height`` image that is resized, in float32 pixel units."""
    if spec.resize == ResizeMode.CENTER_CROP:
        frac = spec.crop_fraction
        if not 0.0 < frac <= 1.0:
            raise ImageError(f"crop_fraction must be in (0, 1], got {frac}")
        aspect = spec.width / spec.height
        bw, bh = (width, width / aspect) if width / aspect <= height else (height * aspect, height)
        bw, bh = bw * frac, bh * frac
        x0, y0 = (width - bw) / 2.0, (height - bh) / 2.0
        box = (x0, y0, x0 + bw, y0 + bh)
    else:
        box = (0.0, 0.0, float(width), float(height))
    # PIL parses a resize box as C floats; fixing float32 here keeps the
    # reference and the fast path on exactly the same coordinates.
    return tuple(float(np.float32(v)) for v in box)


LETTERBOX_FILL = 114  # padding grey of letterboxed inputs, on 0..255 pixels (the YOLO convention)


def letterbox_layout(region_w: float, region_h: float, width: int, height: int) -> Tuple[int, int, int, int]:
    """Letterbox placement: (new_w, new_h, left, top) of the region scaled to fit ``width`` x ``height``.

    Integer pixels, centred (odd padding puts the extra pixel right/bottom);
    the decoders map boxes back through this same placement.
    """
    scale = min(width / region_w, height / region_h)
    nw = min(width, max(1, int(round(region_w * scale))))
    nh = min(height, max(1, int(round(region_h * scale))))
    return nw, nh, (width - nw) // 2, (height - nh) // 2


def nearest_index(in0: float, in1: float, out_size: int, n: int) -> np.ndarray:
    """Source index of each output sample for nearest-neighbour: floor of the sample centre."""
    scale = (in1 - in0) / out_size
    idx = np.floor(in0 + (np.arange(out_size) + 0.5) * scale).astype(np.int64)
    return np.clip(idx, 0, n - 1)


def jpeg_draft_scale(width: int, height: int, spec: Preprocess) -> int:
    """Largest DCT scale in {8,4,2,1} keeping the resized region >= the model size."""
    x0, y0, x1, y1 = crop_box(width, height, spec)
    for s in JPEG_SCALES:
        if (x1 - x0) / s >= spec.width and (y1 - y0) / s >= spec.height:
            return s
    return 1


def _open(x: ImageInput, spec: Preprocess, order: ColorOrder) -> Tuple[Image.Image, Tuple[float, ...]]:
    """Decode ``x`` (draft-scaled when it is a JPEG path) to 8-bit RGB or L and the box to resize."""
    gray = spec.color == ColorOrder.GRAY
    if isinstance(x, np.ndarray):
        img = _from_array(x, order)
        box = crop_box(img.width, img.height, spec)
    elif isinstance(x, Image.Image):
        img = x
        box = crop_box(img.width, img.height, spec)
    else:
        try:
            img = Image.open(x)
            w0, h0 = img.size
            box = crop_box(w0, h0, spec)
            if img.format == "JPEG":
                s = jpeg_draft_scale(w0, h0, spec)
                if s > 1:
                    # Asking for (w0 // s, h0 // s) makes PIL choose exactly s.
                    img.draft(img.mode, (w0 // s, h0 // s))
                    box = tuple(float(np.float32(v / s)) for v in box)
            img.load()
        except ImageError:
            raise
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            where = f"{os.fspath(x)}: " if isinstance(x, (str, os.PathLike)) else ""
            raise ImageError(f"{where}cannot read image ({_short(e)})") from None
    want = "L" if gray else "RGB"
    if img.mode != want:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # palette-transparency notes
            try:
                img = img.convert(want)
            except (OSError, ValueError) as e:
                raise ImageError(f"cannot convert {img.mode} image to {want} ({_short(e)})") from None
    return img, box


def _from_array(a: np.ndarray, order: ColorOrder) -> Image.Image:
    if a.dtype != np.uint8:
        raise ImageError(f"image arrays must be uint8, got {a.dtype}")
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if a.ndim == 2:
        return Image.fromarray(np.ascontiguousarray(a), "L")
    if a.ndim != 3 or a.shape[2] not in (3, 4):
        raise ImageError(f"image arrays must be HxW, HxWx1, HxWx3 or HxWx4, got shape {a.shape}")
    a = a[:, :, :3]
    if ColorOrder(order) == ColorOrder.BGR:
        a = a[:, :, ::-1]
    return Image.fromarray(np.ascontiguousarray(a), "RGB")


def _short(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def mean_std(spec: Preprocess, channels: int) -> Tuple[np.ndarray, np.ndarray]:
    """Per-channel ``(mean, std)`` as float64 arrays of ``channels`` values; raises ImageError when they don't fit."""
    def fit(v: Sequence[float], what: str) -> np.ndarray:
        v = np.asarray(v, dtype=np.float64).reshape(-1)
        if v.size == channels:
            return v
        if v.size == 1 or (v.size > 0 and np.all(v == v[0])):
            return np.full(channels, v[0])
        raise ImageError(f"preprocess {what} has {v.size} values for a {channels}-channel input")
    mean, std = fit(spec.mean, "mean"), fit(spec.std, "std")
    if np.any(std == 0):
        raise ImageError("preprocess std must not be 0")
    return mean, std


def load_image(x: ImageInput, spec: Preprocess, *, order: Union[str, ColorOrder] = ColorOrder.RGB) -> np.ndarray:
    """The float model input (H, W, C) float32 for one image, fast path.

    ``x`` is a path (or file object), a PIL image, or a uint8 array (HxW,
    HxWx1, HxWx3 or HxWx4) whose channel order is ``order`` ("rgb", or "bgr"
    for OpenCV frames). JPEG paths decode with DCT scaling (see module doc).
    Raises ImageError for unreadable or unusable images.
    """
    order = ColorOrder(order)
    resample = filter_for(spec)
    img, box = _open(x, spec, order)
    channels = spec.channels
    mean, std = mean_std(spec, channels)
    a = _resized(img, box, spec, resample)
    if a.ndim == 2:
        a = a[:, :, None]
    elif spec.color == ColorOrder.BGR:
        a = a[:, :, ::-1]
    table, offsets = _table(tuple(mean), tuple(std))
    # One gather over the whole image: channel c reads table entries [256 c, 256 c + 255].
    return np.take(table, a if offsets is None else a + offsets)


def _resized(img: Image.Image, box: Tuple[float, ...], spec: Preprocess, resample) -> np.ndarray:
    """The box resized to the model size (letterbox: to fit, centred on LETTERBOX_FILL), uint8."""
    width, height = spec.width, spec.height
    if spec.resize == ResizeMode.LETTERBOX:
        width, height, left, top = letterbox_layout(box[2] - box[0], box[3] - box[1], spec.width, spec.height)
    if resample == Image.Resampling.NEAREST:
        # PIL's nearest rounds exact .5 sample positions its own way; index
        # by the definition instead (it is only a gather).
        a = np.asarray(img)
        a = a[np.ix_(nearest_index(box[1], box[3], height, img.height),
                     nearest_index(box[0], box[2], width, img.width))]
    else:
        a = np.asarray(img.resize((width, height), resample, box=box))
    if spec.resize != ResizeMode.LETTERBOX:
        return a
    canvas = np.full((spec.height, spec.width) + a.shape[2:], LETTERBOX_FILL, dtype=np.uint8)
    canvas[top:top + height, left:left + width] = a
    return canvas


@lru_cache(maxsize=32)
def _table(mean: tuple, std: tuple) -> Tuple[np.ndarray, Any]:
    """Normalization table: ``(v - mean[c]) / std[c]`` in float64, as float32, for every 8-bit v.

    Channels share one 256-entry table when their mean/std are equal; otherwise
    the tables are concatenated and ``offsets`` (uint16, per channel) select them.
    """
    v = np.arange(256, dtype=np.float64)
    tables = [((v - m) / s).astype(np.float32) for m, s in zip(mean, std)]
    if len(set(zip(mean, std))) == 1:
        return tables[0], None
    return np.concatenate(tables), np.arange(len(tables), dtype=np.uint16) * 256


def to_model_input(hwc: np.ndarray, spec: Preprocess, tensor: Any = None) -> np.ndarray:
    """Batch of one in the model's layout; quantized with ``tensor`` (a runtime TensorSpec) if given.

    ``tensor.quantize`` does round + clip + astype for integer inputs; float
    inputs are cast to the tensor's dtype.
    """
    x = hwc[None]
    if spec.layout.lower() == "nchw":
        x = x.transpose(0, 3, 1, 2)
    x = np.ascontiguousarray(x)
    if tensor is None:
        return x
    if getattr(tensor, "quantized", False):
        return tensor.quantize(x)
    return x.astype(np.dtype(tensor.dtype), copy=False)


def __getattr__(name: str):
    # The reference is for tests and benchmarks: loaded on first use, never by the device's hot path.
    if name == "reference_preprocess":
        from edgepipe.device.preprocess_ref import reference_preprocess
        return reference_preprocess
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
