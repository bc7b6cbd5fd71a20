"""Detection decoders: post-processed outputs, raw SSD (anchors), YOLO single tensors.

Each decoder is built once from the model's output specs (so the role of every
output is settled before the first frame) and then turns a frame's raw output
arrays into normalised ``x0, y0, x1, y1`` boxes, class ids and scores.
Quantized outputs are dequantized here with their own scale/zero-point.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np

from edgepipe.device.decode.anchors import ssd_anchors
from edgepipe.device.decode.nms import batched_nms
from edgepipe.device.decode.spec import ROLES, Activation, DecodeError, DecoderSpec

# Known output orders of post-processed detectors, by output position. TF1
# exports (export_tflite_ssd_graph, TFLite_Detection_PostProcess) give boxes,
# classes, scores, count; TF2 / Model Maker EfficientDet-Lite exports give
# scores, boxes, count, classes. Names win when they say which is which.
POSTPROCESSED_ORDERS: Tuple[Tuple[str, Tuple[str, ...]], ...] = (
    ("tf1 TFLite_Detection_PostProcess", ("boxes", "classes", "scores", "count")),
    ("tf2 / Model Maker", ("scores", "boxes", "count", "classes")),
    ("boxes, scores, classes, count", ("boxes", "scores", "classes", "count")),
)
NAME_HINTS = (("boxes", ("box", "loc")), ("classes", ("class", "label")), ("scores", ("score", "conf")),
              ("count", ("num", "count")))


def qparams(spec: Any) -> Tuple[float, int]:
    """(scale, zero_point) of a runtime TensorSpec or a manifest TensorInfo (0.0 = not quantized)."""
    if hasattr(spec, "scale"):
        return float(spec.scale or 0.0), int(spec.zero_point or 0)
    q = getattr(spec, "quantization", None)
    if q is None:
        return 0.0, 0
    if isinstance(q, dict):
        return float(q.get("scale", 0.0)), int(q.get("zero_point", 0))
    return float(q.scale), int(q.zero_point)


def dequantize(spec: Any, raw: np.ndarray) -> np.ndarray:
    """Real values of a raw output (float32); integer outputs use the spec's scale/zero-point."""
    a = np.asarray(raw)
    scale, zp = qparams(spec)
    if scale and np.issubdtype(a.dtype, np.integer):
        return ((a.astype(np.float32) - np.float32(zp)) * np.float32(scale)).astype(np.float32)
    return a.astype(np.float32, copy=False)


def activate(x: np.ndarray, act: Activation, axis: int = -1) -> np.ndarray:
    if act == Activation.SIGMOID:
        return (1.0 / (1.0 + np.exp(-np.clip(x, -80.0, 80.0)))).astype(np.float32)
    if act == Activation.SOFTMAX:
        e = np.exp(x - np.max(x, axis=axis, keepdims=True))
        return (e / np.sum(e, axis=axis, keepdims=True)).astype(np.float32)
    return x


@dataclass(frozen=True)
class Boxes:
    """Decoded detections before mapping: normalised xyxy in the model input, best first."""

    xyxy: np.ndarray  # (K, 4) float64
    classes: np.ndarray  # (K,) int64
    scores: np.ndarray  # (K,) float64

    @classmethod
    def empty(cls) -> "Boxes":
        return cls(np.zeros((0, 4)), np.zeros(0, np.int64), np.zeros(0))


def shape_of(spec: Any) -> Tuple[int, ...]:
    return tuple(int(s) for s in spec.shape)


def _select(xyxy, classes, scores, spec: DecoderSpec) -> Boxes:
    """Score threshold, NMS, max detections."""
    ok = np.isfinite(scores) & (scores >= spec.score_threshold) & np.all(np.isfinite(xyxy), axis=1)
    xyxy, classes, scores = xyxy[ok], classes[ok], scores[ok]
    keep = batched_nms(xyxy, scores, classes, spec.iou_threshold, spec.max_detections, spec.class_agnostic)
    return Boxes(xyxy[keep].astype(np.float64), classes[keep].astype(np.int64), scores[keep].astype(np.float64))


# ------------------------------------------------------------------ post-processed


def postprocessed_roles(outputs: Sequence[Any]) -> Tuple[Dict[str, int], str]:
    """Which output is boxes/classes/scores/count, and how that was decided."""
    if len(outputs) != 4:
        raise DecodeError(f"a post-processed detector has 4 outputs, this model has {len(outputs)}")
    shapes = [shape_of(o) for o in outputs]
    by_name: Dict[str, int] = {}
    for role, hints in NAME_HINTS:
        hits = [i for i, o in enumerate(outputs) if any(h in str(o.name).lower() for h in hints)]
        if len(hits) == 1:
            by_name[role] = hits[0]
    if len(by_name) == 4 and len(set(by_name.values())) == 4 and _shapes_fit(by_name, shapes):
        return by_name, "outputs identified by name"
    for label, order in POSTPROCESSED_ORDERS:
        roles = {role: i for i, role in enumerate(order)}
        if _shapes_fit(roles, shapes):
            return roles, f"outputs read in the {label} order"
    raise DecodeError(f"cannot tell boxes/classes/scores/count apart in outputs shaped {shapes}")


def _shapes_fit(roles: Dict[str, int], shapes) -> bool:
    b, c, s, n = (shapes[roles[r]] for r in ROLES)
    return (len(b) >= 2 and b[-1] == 4 and int(np.prod(c)) == int(np.prod(s)) == int(np.prod(b)) // 4
            and int(np.prod(n)) == 1)


class PostprocessedDecoder:
    def __init__(self, spec: DecoderSpec, outputs: Sequence[Any]):
        self.spec = spec
        self.outputs = tuple(outputs)
        if spec.outputs is not None:
            self.roles, self.assumption = dict(spec.outputs), "output roles from the manifest"
            if max(self.roles.values()) >= len(self.outputs):
                raise DecodeError(f"decoder outputs name index {max(self.roles.values())}, "
                                  f"model has {len(self.outputs)} outputs")
        else:
            self.roles, self.assumption = postprocessed_roles(self.outputs)

    def __call__(self, raw: Sequence[np.ndarray]) -> Boxes:
        get = {r: dequantize(self.outputs[i], raw[i]) for r, i in self.roles.items()}
        boxes = get["boxes"].reshape(-1, 4)
        n = int(np.clip(np.nan_to_num(get["count"].reshape(-1)[0]), 0, boxes.shape[0]))
        yx = boxes[:n].astype(np.float64)
        xyxy = yx[:, [1, 0, 3, 2]]
        scores = get["scores"].reshape(-1)[:n].astype(np.float64)
        classes = np.rint(np.nan_to_num(get["classes"].reshape(-1)[:n])).astype(np.int64)
        ok = np.isfinite(scores) & (scores >= self.spec.score_threshold)
        xyxy, classes, scores = xyxy[ok], classes[ok], scores[ok]
        order = np.argsort(-scores, kind="stable")[: self.spec.max_detections]
        return Boxes(xyxy[order], classes[order], scores[order])


# ------------------------------------------------------------------ raw SSD


def ssd_roles(outputs: Sequence[Any], n_anchors: int, num_coords: int) -> Tuple[int, int]:
    """(box regressor output, class score output) for a raw SSD head."""
    if len(outputs) != 2:
        raise DecodeError(f"a raw SSD head has 2 outputs (boxes, scores), this model has {len(outputs)}")
    sizes = [int(np.prod(shape_of(o))) for o in outputs]
    fits = [s == n_anchors * num_coords for s in sizes]
    named = [any(h in str(o.name).lower() for h in ("box", "loc", "regress")) for o in outputs]
    if named.count(True) == 1 and fits[named.index(True)]:
        b = named.index(True)
    elif fits.count(True) == 1:
        b = fits.index(True)
    elif all(fits):
        b = 0
    else:
        raise DecodeError(f"no output holds {n_anchors} anchors x {num_coords} box coordinates "
                          f"(output sizes {sizes})")
    s = 1 - b
    if sizes[s] % n_anchors:
        raise DecodeError(f"score output size {sizes[s]} is not a multiple of {n_anchors} anchors")
    return b, s


class SsdDecoder:
    def __init__(self, spec: DecoderSpec, outputs: Sequence[Any]):
        self.spec = spec
        self.outputs = tuple(outputs)
        self.anchors = ssd_anchors(spec.anchors).astype(np.float64)
        self.box_index, self.score_index = ssd_roles(self.outputs, len(self.anchors), spec.num_coords)
        self.assumption = f"{len(self.anchors)} SSD anchors from the recorded generator options"

    def boxes(self, reg: np.ndarray, anchors: np.ndarray) -> np.ndarray:
        """Box regressors (N, num_coords) at ``anchors`` -> normalised xyxy (N, 4) (the TF OD API box coder)."""
        s = self.spec
        r = reg[:, s.box_coord_offset:s.box_coord_offset + 4].astype(np.float64)
        ty, tx, th, tw = (r.T if s.box_order == "yxhw" else r[:, [1, 0, 3, 2]].T)
        ys, xs, hs, ws = s.box_scales
        ayc, axc, ah, aw = anchors.T
        yc, xc = ty / ys * ah + ayc, tx / xs * aw + axc
        if s.exp_box_size:
            with np.errstate(over="ignore"):
                h, w = np.exp(th / hs) * ah, np.exp(tw / ws) * aw
        else:
            h, w = th / hs * ah, tw / ws * aw
        return np.stack([xc - w / 2, yc - h / 2, xc + w / 2, yc + h / 2], axis=1)

    def __call__(self, raw: Sequence[np.ndarray]) -> Boxes:
        n = len(self.anchors)
        reg = dequantize(self.outputs[self.box_index], raw[self.box_index]).reshape(n, -1)
        scores = dequantize(self.outputs[self.score_index], raw[self.score_index]).reshape(n, -1)
        scores = activate(scores, self.spec.score_activation)
        if self.spec.background_class:
            scores = scores[:, 1:]
        if scores.shape[1] == 0:
            raise DecodeError("the SSD score output has no classes besides the background")
        classes = np.argmax(scores, axis=1)
        best = scores[np.arange(n), classes].astype(np.float64)
        # Box decoding only for anchors above the threshold: most are not.
        cand = np.flatnonzero(best >= self.spec.score_threshold)
        xyxy = self.boxes(reg[cand], self.anchors[cand])
        return _select(xyxy, classes[cand], best[cand], self.spec)


# ------------------------------------------------------------------ YOLO


class YoloDecoder:
    def __init__(self, spec: DecoderSpec, outputs: Sequence[Any], input_size: Optional[Tuple[int, int]] = None):
        self.spec = spec
        self.outputs = tuple(outputs)
        if len(self.outputs) != 1:
            raise DecodeError(f"a YOLO head is one output tensor, this model has {len(self.outputs)}")
        shape = shape_of(self.outputs[0])
        dims = [d for d in shape if d != 1] if len(shape) > 2 else list(shape)
        if len(dims) != 2:
            raise DecodeError(f"a YOLO output is (1, N, 4+C) or (1, 4+C, N), got {shape}")
        layout = spec.layout
        if layout == "auto":
            layout = "boxes-first" if dims[0] < dims[1] else "boxes-last"
        self.transpose = layout == "boxes-first"
        self.n, self.k = (dims[1], dims[0]) if self.transpose else (dims[0], dims[1])
        extra = 5 if spec.objectness else 4
        if self.k <= extra:
            raise DecodeError(f"a YOLO row needs 4 box values{' + objectness' if spec.objectness else ''} "
                              f"+ class scores, this one has {self.k}")
        self.input_size = input_size  # (w, h), for boxes in input pixels
        self.assumption = (f"YOLO {layout} layout: {self.n} candidates x {self.k} values "
                           f"({'with' if spec.objectness else 'no'} objectness)")

    def __call__(self, raw: Sequence[np.ndarray]) -> Boxes:
        x = dequantize(self.outputs[0], raw[0]).reshape((self.k, self.n) if self.transpose else (self.n, self.k))
        if self.transpose:
            x = x.T
        x = x.astype(np.float64)
        act = self.spec.score_activation
        if self.spec.objectness:
            scores = activate(x[:, 5:], act) * activate(x[:, 4:5], act)
        else:
            scores = activate(x[:, 4:], act)
        classes = np.argmax(scores, axis=1)
        best = scores[np.arange(self.n), classes]
        cand = np.flatnonzero(best >= self.spec.score_threshold)
        cx, cy, w, h = x[cand, :4].T
        xyxy = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)
        units = self.spec.box_units
        if units == "auto":
            units = "pixels" if x.size and float(np.nanmax(np.abs(x[:, :4]))) > 2.0 else "normalized"
        if units == "pixels":
            if not self.input_size:
                raise DecodeError("YOLO boxes are in input pixels but the model input size is unknown")
            iw, ih = self.input_size
            xyxy = xyxy / np.array([iw, ih, iw, ih], dtype=np.float64)
        return _select(xyxy, classes[cand], best[cand], self.spec)
