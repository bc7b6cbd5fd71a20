"""Preprocessing presets and how a model's input becomes a manifest `Preprocess`.

The device reproduces exactly what is written here, so everything that was
inferred rather than told is listed in ``Preprocess.assumed`` and shown to the
user at conversion time.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

from edgepipe.device.bundle import ColorOrder, Preprocess, ResizeMode
from edgepipe.device.errors import EdgepipeError


@dataclass(frozen=True)
class Preset:
    name: str
    summary: str
    mean: tuple
    std: tuple
    color: ColorOrder = ColorOrder.RGB
    resize: ResizeMode = ResizeMode.STRETCH
    crop_fraction: float = 1.0


PRESETS: dict = {
    p.name: p
    for p in (
        Preset("mobilenet", "Keras MobileNet/EfficientNet-lite style: pixels to [-1, 1]",
               mean=(127.5, 127.5, 127.5), std=(127.5, 127.5, 127.5)),
        Preset("imagenet", "torchvision ImageNet: RGB mean/std, resize + centre crop 0.875",
               mean=(123.675, 116.28, 103.53), std=(58.395, 57.12, 57.375),
               resize=ResizeMode.CENTER_CROP, crop_fraction=0.875),
        Preset("imagenet-caffe", "Keras ResNet50/VGG 'caffe' mode: BGR, mean subtracted, no scaling",
               mean=(103.939, 116.779, 123.68), std=(1.0, 1.0, 1.0), color=ColorOrder.BGR),
        Preset("unit", "pixels to [0, 1]", mean=(0.0, 0.0, 0.0), std=(255.0, 255.0, 255.0)),
        Preset("raw", "pixels as 0..255 floats (the model rescales itself)",
               mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)),
    )
}


class PreprocessError(EdgepipeError, ValueError):
    """The model's input or the requested preprocessing cannot work; user-facing."""


@dataclass(frozen=True)
class PreprocessRequest:
    """What the user asked for on the command line (any field may be None)."""

    preset: Optional[str] = None
    mean: Optional[tuple] = None
    std: Optional[tuple] = None
    color: Optional[str] = None
    resize: Optional[str] = None
    crop_fraction: Optional[float] = None

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}


def image_layout(shape: Sequence) -> tuple:
    """(layout, height, width, channels) for an image input shape, else PreprocessError."""
    dims = [int(d) if d is not None else -1 for d in shape]
    if len(dims) == 3:  # no batch dimension
        dims = [1] + dims
    if len(dims) != 4:
        raise PreprocessError(
            f"model input shape {tuple(shape)} is not image-shaped (expected N,H,W,C or N,C,H,W)")
    if dims[3] in (1, 3):
        layout, h, w, c = "nhwc", dims[1], dims[2], dims[3]
    elif dims[1] in (1, 3):
        layout, h, w, c = "nchw", dims[2], dims[3], dims[1]
    else:
        raise PreprocessError(
            f"model input shape {tuple(shape)} has no 1- or 3-channel axis; cannot feed it images")
    if h <= 0 or w <= 0:
        raise PreprocessError(
            f"model input shape {tuple(shape)} has no fixed height/width; give an input size",
            param="input_size")
    return layout, h, w, c


def _per_channel(values: tuple, channels: int, what: str, assumed: list) -> tuple:
    if len(values) == channels:
        return tuple(float(v) for v in values)
    if len(values) == 1:
        return tuple(float(values[0]) for _ in range(channels))
    if channels == 1:
        avg = sum(values) / len(values)
        assumed.append(f"{what} averaged over RGB for a 1-channel model ({avg:g})")
        return (float(avg),)
    raise PreprocessError(f"{what} needs 1 or {channels} values, got {len(values)}", param=what)


def _preset(request: PreprocessRequest, rescales_itself: bool, assumed: list):
    """The preset the request names, or the one assumed (noted in ``assumed``)."""
    if request.preset is not None:
        if request.preset not in PRESETS:
            raise PreprocessError(
                f"unknown preprocessing preset {request.preset!r}; choose from {', '.join(PRESETS)}",
                param="preset")
        return PRESETS[request.preset]
    if request.mean is not None or request.std is not None:
        return PRESETS["raw"]
    if rescales_itself:
        assumed.append("model starts with a rescaling layer: fed raw 0..255 pixels (preset 'raw')")
        return PRESETS["raw"]
    # Stored in the manifest and shown by every front end, so it names the preset, not a flag.
    assumed.append("no preprocessing preset given: pixels scaled to [0, 1] (preset 'unit')")
    return PRESETS["unit"]


def _color(request: PreprocessRequest, preset, channels: int) -> ColorOrder:
    color = ColorOrder(request.color) if request.color else preset.color
    if channels == 1:
        return ColorOrder.GRAY
    if color == ColorOrder.GRAY:
        raise PreprocessError(f"gray colour does not fit a {channels}-channel model input", param="color")
    return color


def _crop(request: PreprocessRequest, preset, resize: ResizeMode) -> float:
    crop = request.crop_fraction if request.crop_fraction is not None else preset.crop_fraction
    if resize == ResizeMode.STRETCH and request.crop_fraction is None:
        crop = 1.0
    if not 0.0 < crop <= 1.0:
        raise PreprocessError(f"the crop fraction must be in (0, 1], got {crop}", param="crop_fraction")
    return crop


def resolve(input_shape: Sequence, request: PreprocessRequest, *, rescales_itself: bool = False) -> Preprocess:
    """Turn the model's input shape and the user's request into a full Preprocess.

    ``rescales_itself``: the model starts with a Rescaling/Normalization layer,
    so it expects raw 0..255 pixels when nothing else is said.
    """
    layout, h, w, c = image_layout(input_shape)
    assumed: list = []
    preset = _preset(request, rescales_itself, assumed)
    color = _color(request, preset, c)
    resize = ResizeMode(request.resize) if request.resize else preset.resize
    crop = _crop(request, preset, resize)
    mean = _per_channel(request.mean if request.mean is not None else preset.mean, c, "mean", assumed)
    std = _per_channel(request.std if request.std is not None else preset.std, c, "std", assumed)
    if any(s <= 0 for s in std):
        raise PreprocessError("the std must be positive", param="std")
    if request.preset is None and request.resize is None:
        assumed.append(f"resized ({resize.value}, bilinear) to {h}x{w}")
    return Preprocess(
        height=h, width=w, color=color, resize=resize, crop_fraction=float(crop),
        interpolation="bilinear", layout=layout, mean=mean, std=std,
        preset=request.preset if request.mean is None and request.std is None else None,
        assumed=tuple(assumed),
    )
