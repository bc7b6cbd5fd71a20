"""Decoder parameters (validated from a manifest dict) and decoded results.

A bundle's manifest names a decoder (``{"kind": "ssd", "score_threshold": 0.5, ...}``);
:meth:`DecoderSpec.from_dict` checks every field and raises :class:`DecodeError`
with a one-line reason for anything it cannot use, so a bad manifest never
reaches numpy as a traceback.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Mapping, Optional, Tuple

from edgepipe.device.errors import EdgepipeError

SCORE_DECIMALS = 5
BOX_DECIMALS = 2


class DecodeError(EdgepipeError, ValueError):
    """Decoder parameters or model outputs that cannot be decoded; one line."""


class DecoderKind(str, Enum):
    POSTPROCESSED = "postprocessed"  # boxes, classes, scores, count (TFLite_Detection_PostProcess)
    SSD = "ssd"                      # raw box regressors + class scores, anchors, NMS
    YOLO = "yolo"                    # one (1, N, 4+C[+1]) or (1, 4+C[+1], N) tensor, NMS
    SEGMENTATION = "segmentation"    # (1, H, W, C) class scores or (1, H, W[, 1]) foreground


class Activation(str, Enum):
    NONE = "none"
    SIGMOID = "sigmoid"
    SOFTMAX = "softmax"


def _num(d: Mapping, key: str, default: float, lo: float, hi: float) -> float:
    v = d.get(key, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not lo <= v <= hi:
        raise DecodeError(f"decoder {key} must be a number in [{lo}, {hi}], got {v!r}")
    return float(v)


def _int(d: Mapping, key: str, default: int, lo: int, hi: int) -> int:
    v = d.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise DecodeError(f"decoder {key} must be an integer in [{lo}, {hi}], got {v!r}")
    return v


def _bool(d: Mapping, key: str, default: bool) -> bool:
    v = d.get(key, default)
    if not isinstance(v, bool):
        raise DecodeError(f"decoder {key} must be true or false, got {v!r}")
    return v


def _enum(d: Mapping, key: str, enum: type, default: Any) -> Any:
    v = d.get(key, default)
    try:
        return enum(v)
    except ValueError:
        choices = ", ".join(e.value for e in enum)
        raise DecodeError(f"decoder {key} must be one of {choices}, got {v!r}") from None


def _choice(d: Mapping, key: str, choices: Tuple[str, ...], default: str) -> str:
    v = d.get(key, default)
    if v not in choices:
        raise DecodeError(f"decoder {key} must be one of {', '.join(choices)}, got {v!r}")
    return v


def _floats(d: Mapping, key: str, default: tuple, n: Optional[int] = None, positive: bool = True) -> tuple:
    v = d.get(key, default)
    ok = isinstance(v, (list, tuple)) and (n is None or len(v) == n) and len(v) > 0 and all(
        isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and (x > 0 or not positive)
        for x in v)
    if not ok:
        what = f"{n} " if n else ""
        raise DecodeError(f"decoder {key} must be a list of {what}{'positive ' if positive else ''}numbers, got {v!r}")
    return tuple(float(x) for x in v)


@dataclass(frozen=True)
class AnchorOptions:
    """SSD anchor generator options, named as in MediaPipe's SsdAnchorsCalculator.

    Equivalent to the TF Object Detection API's ``ssd_anchor_generator``; anchors
    are (y_centre, x_centre, h, w), normalised to the model input.
    """

    num_layers: int
    min_scale: float
    max_scale: float
    input_size_height: int
    input_size_width: int
    strides: tuple
    aspect_ratios: tuple = (1.0,)
    anchor_offset_x: float = 0.5
    anchor_offset_y: float = 0.5
    feature_map_height: tuple = ()
    feature_map_width: tuple = ()
    reduce_boxes_in_lowest_layer: bool = False
    interpolated_scale_aspect_ratio: float = 1.0
    fixed_anchor_size: bool = False

    @classmethod
    def from_dict(cls, d: Any) -> "AnchorOptions":
        if not isinstance(d, Mapping):
            raise DecodeError(f"decoder anchors must be an object of SSD anchor options, got {type(d).__name__}")
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise DecodeError(f"unknown anchor option(s): {', '.join(sorted(unknown))}")
        n = _int(d, "num_layers", 0, 1, 16)
        strides = tuple(int(s) for s in _floats(d, "strides", ()))
        if len(strides) != n:
            raise DecodeError(f"anchor strides has {len(strides)} entries for num_layers {n}")
        fmh, fmw = (), ()
        if "feature_map_height" in d or "feature_map_width" in d:
            fmh = tuple(int(x) for x in _floats(d, "feature_map_height", ()))
            fmw = tuple(int(x) for x in _floats(d, "feature_map_width", ()))
            if not len(fmh) == len(fmw) == n:
                raise DecodeError(f"anchor feature_map_height and feature_map_width need {n} entries each")
        return cls(
            num_layers=n, min_scale=_num(d, "min_scale", 0.0, 1e-6, 10.0),
            max_scale=_num(d, "max_scale", 0.0, 1e-6, 10.0),
            input_size_height=_int(d, "input_size_height", 0, 1, 1 << 16),
            input_size_width=_int(d, "input_size_width", 0, 1, 1 << 16), strides=strides,
            aspect_ratios=_floats(d, "aspect_ratios", (1.0,)),
            anchor_offset_x=_num(d, "anchor_offset_x", 0.5, 0.0, 1.0),
            anchor_offset_y=_num(d, "anchor_offset_y", 0.5, 0.0, 1.0),
            feature_map_height=fmh, feature_map_width=fmw,
            reduce_boxes_in_lowest_layer=_bool(d, "reduce_boxes_in_lowest_layer", False),
            interpolated_scale_aspect_ratio=_num(d, "interpolated_scale_aspect_ratio", 1.0, 0.0, 100.0),
            fixed_anchor_size=_bool(d, "fixed_anchor_size", False))

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items() if v != ()}


_COMMON = {"kind", "score_threshold", "iou_threshold", "max_detections", "class_agnostic", "label_offset"}
_ALLOWED = {
    DecoderKind.POSTPROCESSED: _COMMON | {"outputs"},
    DecoderKind.SSD: _COMMON | {"anchors", "box_scales", "box_order", "score_activation", "background_class",
                                "num_coords", "box_coord_offset", "exp_box_size"},
    DecoderKind.YOLO: _COMMON | {"layout", "objectness", "score_activation", "box_units"},
    DecoderKind.SEGMENTATION: _COMMON | {"mode", "mask_threshold", "score_activation", "background_class"},
}


@dataclass(frozen=True)
class DecoderSpec:
    """Which convention to decode and its parameters (one frozen value, from the manifest)."""

    kind: DecoderKind
    score_threshold: float = 0.5
    iou_threshold: float = 0.5
    max_detections: int = 100
    class_agnostic: bool = False
    # Added to a class id before looking up its label (e.g. 1 when labels.txt
    # starts with a "background" or "???" line the model never predicts).
    label_offset: int = 0
    # postprocessed: output index for each role, or None to identify by name/shape.
    outputs: Optional[Mapping[str, int]] = None
    # ssd
    anchors: Optional[AnchorOptions] = None
    box_scales: tuple = (10.0, 10.0, 5.0, 5.0)  # y, x, h, w
    box_order: str = "yxhw"
    score_activation: Activation = Activation.NONE
    background_class: bool = False
    num_coords: int = 4
    box_coord_offset: int = 0
    # TF OD API: h = exp(th / h_scale) * anchor_h; MediaPipe face/pose detectors: linear (th / h_scale * anchor_h).
    exp_box_size: bool = True
    # yolo
    layout: str = "auto"  # "auto", "boxes-last" (1, N, 4+C), "boxes-first" (1, 4+C, N)
    objectness: bool = False
    box_units: str = "auto"  # "auto", "normalized", "pixels" (of the model input)
    # segmentation
    mode: str = "auto"  # "auto", "argmax", "threshold"
    mask_threshold: float = 0.5

    @classmethod
    def from_dict(cls, d: Any) -> "DecoderSpec":
        """Validate a manifest ``decoder`` block; DecodeError (one line) on anything wrong."""
        if not isinstance(d, Mapping):
            raise DecodeError(f"decoder parameters must be a JSON object, got {type(d).__name__}")
        kind = _enum(d, "kind", DecoderKind, None)
        unknown = set(d) - _ALLOWED[kind]
        if unknown:
            raise DecodeError(f"unknown {kind.value} decoder parameter(s): {', '.join(sorted(unknown))}")
        default_act = Activation.SIGMOID if kind == DecoderKind.SSD else Activation.NONE
        spec = cls(
            kind=kind, score_threshold=_num(d, "score_threshold", 0.5, 0.0, 1.0),
            iou_threshold=_num(d, "iou_threshold", 0.5, 0.0, 1.0),
            max_detections=_int(d, "max_detections", 100, 1, 10000),
            class_agnostic=_bool(d, "class_agnostic", False),
            label_offset=_int(d, "label_offset", 0, -1, 1000),
            outputs=_roles(d.get("outputs")),
            anchors=AnchorOptions.from_dict(d["anchors"]) if "anchors" in d else None,
            box_scales=_floats(d, "box_scales", (10.0, 10.0, 5.0, 5.0), 4),
            box_order=_choice(d, "box_order", ("yxhw", "xywh"), "yxhw"),
            score_activation=_enum(d, "score_activation", Activation, default_act),
            background_class=_bool(d, "background_class", False),
            num_coords=_int(d, "num_coords", 4, 4, 1024),
            box_coord_offset=_int(d, "box_coord_offset", 0, 0, 1020),
            exp_box_size=_bool(d, "exp_box_size", True),
            layout=_choice(d, "layout", ("auto", "boxes-last", "boxes-first"), "auto"),
            objectness=_bool(d, "objectness", False),
            box_units=_choice(d, "box_units", ("auto", "normalized", "pixels"), "auto"),
            mode=_choice(d, "mode", ("auto", "argmax", "threshold"), "auto"),
            mask_threshold=_num(d, "mask_threshold", 0.5, 0.0, 1.0))
        if kind == DecoderKind.SSD and spec.anchors is None:
            raise DecodeError("an ssd decoder needs anchors (SSD anchor generator options)")
        if spec.box_coord_offset + 4 > spec.num_coords:
            raise DecodeError(f"box_coord_offset {spec.box_coord_offset} + 4 exceeds num_coords {spec.num_coords}")
        return spec

    def to_dict(self) -> dict:
        """The manifest form (only the fields that matter for this kind)."""
        out = {}
        for f in dataclasses.fields(self):
            if f.name not in _ALLOWED[self.kind]:
                continue
            v = getattr(self, f.name)
            if v is None:
                continue
            if isinstance(v, Enum):
                v = v.value
            elif isinstance(v, AnchorOptions):
                v = v.to_dict()
            elif isinstance(v, tuple):
                v = list(v)
            elif isinstance(v, Mapping):
                v = dict(v)
            out[f.name] = v
        return out

    def with_thresholds(self, score: Optional[float] = None, iou: Optional[float] = None,
                        max_detections: Optional[int] = None) -> "DecoderSpec":
        """A copy with command-line overrides applied (validated like the manifest)."""
        d = self.to_dict()
        for key, v in (("score_threshold", score), ("iou_threshold", iou), ("max_detections", max_detections)):
            if v is not None:
                d[key] = v
        return DecoderSpec.from_dict(d)


ROLES = ("boxes", "classes", "scores", "count")


def _roles(v: Any) -> Optional[Mapping[str, int]]:
    if v is None:
        return None
    if not isinstance(v, Mapping) or set(v) != set(ROLES) or not all(
            isinstance(i, int) and not isinstance(i, bool) and 0 <= i < 8 for i in v.values()) or len(
            set(v.values())) != 4:
        raise DecodeError("decoder outputs must map boxes, classes, scores, count to 4 distinct output indices")
    return dict(v)


@dataclass(frozen=True)
class Detection:
    """One detected object, its box in source-image pixels (x0, y0, x1, y1)."""

    box_xyxy: Tuple[float, float, float, float]
    class_id: int
    score: float
    label: Optional[str] = None

    def to_dict(self) -> dict:
        return {"box": [round(float(v), BOX_DECIMALS) for v in self.box_xyxy], "label": self.label,
                "class_id": int(self.class_id), "score": round(float(self.score), SCORE_DECIMALS)}


@dataclass(frozen=True)
class ClassArea:
    class_id: int
    label: Optional[str]
    fraction: float  # of the source image's pixels

    def to_dict(self) -> dict:
        return {"class_id": self.class_id, "label": self.label, "fraction": round(self.fraction, SCORE_DECIMALS)}


@dataclass(frozen=True)
class Segmentation:
    """A per-pixel class mask in source-image pixels, summarised."""

    mask: Any  # (H, W) uint8/int class ids (0 = background for threshold mode)
    areas: Tuple[ClassArea, ...]
    rle: Mapping[str, Any] = field(default_factory=dict)  # class id (str) -> COCO uncompressed RLE

    def to_dict(self) -> dict:
        h, w = self.mask.shape[:2]
        return {"size": [int(h), int(w)], "classes": [a.to_dict() for a in self.areas], "rle": dict(self.rle)}


@dataclass(frozen=True)
class DecodeResult:
    """Decoded outputs of one frame."""

    kind: DecoderKind
    detections: Tuple[Detection, ...] = ()
    segmentation: Optional[Segmentation] = None

    def to_json(self) -> dict:
        """The JSON-ready part of a prediction line."""
        if self.kind == DecoderKind.SEGMENTATION and self.segmentation is not None:
            return {"segmentation": self.segmentation.to_dict()}
        return {"detections": [d.to_dict() for d in self.detections], "count": len(self.detections)}
