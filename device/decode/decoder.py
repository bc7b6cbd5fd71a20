"""Pick and build a decoder: from the manifest's parameters, or inferred from output shapes.

``make_decoder(spec, outputs, labels)`` returns a callable
``decoder(raw_outputs, geometry) -> DecodeResult`` with boxes in source pixels.
``infer_decoder(outputs)`` guesses a :class:`DecoderSpec` for a plain
``.tflite`` and says, in one sentence, what it assumed.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence, Tuple

import numpy as np

from edgepipe.device.decode.detect import (Boxes, PostprocessedDecoder, SsdDecoder, YoloDecoder,
                                           postprocessed_roles, shape_of)
from edgepipe.device.decode.geometry import PreprocessGeometry, to_source_coords
from edgepipe.device.decode.segment import SegmentationDecoder
from edgepipe.device.decode.spec import DecodeError, DecodeResult, DecoderKind, DecoderSpec, Detection


class Decoder:
    """Raw outputs of one frame -> :class:`DecodeResult` (boxes in source-image pixels)."""

    def __init__(self, spec: DecoderSpec, outputs: Sequence[Any], labels: Sequence[str] = (),
                 input_size: Optional[Tuple[int, int]] = None):
        """``outputs``: the model's output specs; ``input_size``: (w, h) of the model input."""
        self.spec = spec
        self.labels = tuple(labels)
        if spec.kind == DecoderKind.POSTPROCESSED:
            self.impl: Any = PostprocessedDecoder(spec, outputs)
        elif spec.kind == DecoderKind.SSD:
            self.impl = SsdDecoder(spec, outputs)
        elif spec.kind == DecoderKind.YOLO:
            self.impl = YoloDecoder(spec, outputs, input_size)
        else:
            self.impl = SegmentationDecoder(spec, outputs)
        self.assumption: str = self.impl.assumption

    def label(self, class_id: int) -> Optional[str]:
        j = class_id + self.spec.label_offset
        return self.labels[j] if 0 <= j < len(self.labels) else None

    def __call__(self, raw: Sequence[np.ndarray], geometry: Optional[PreprocessGeometry] = None) -> DecodeResult:
        """Decode one frame. Without ``geometry`` boxes stay normalised to the model input."""
        if self.spec.kind == DecoderKind.SEGMENTATION:
            return DecodeResult(kind=self.spec.kind, segmentation=self.impl(raw, geometry, self.labels))
        found: Boxes = self.impl(raw)
        xyxy = found.xyxy
        if geometry is not None:
            xyxy = to_source_coords(xyxy, geometry.src_w, geometry.src_h, geometry)
        dets = tuple(Detection(box_xyxy=tuple(float(v) for v in box), class_id=int(c), score=float(s),
                               label=self.label(int(c)))
                     for box, c, s in zip(xyxy, found.classes, found.scores))
        return DecodeResult(kind=self.spec.kind, detections=dets)


def make_decoder(spec: DecoderSpec, outputs: Sequence[Any], labels: Sequence[str] = (),
                 input_size: Optional[Tuple[int, int]] = None) -> Decoder:
    """Build the decoder for ``spec`` over these output specs (DecodeError if they do not fit)."""
    return Decoder(spec, outputs, labels, input_size)


def infer_decoder(outputs: Sequence[Any]) -> Tuple[DecoderSpec, str]:
    """A decoder for a model without a manifest task, from its output shapes, and the assumption made.

    Four outputs that fit boxes/classes/scores/count: post-processed. One
    (1, N, K) / (1, K, N) output with 5 <= K < N: YOLO. One (1, H, W, C) output
    with H, W >= 8: segmentation. Raw SSD heads need anchor options, which
    cannot be inferred, so they are never guessed. DecodeError otherwise.
    """
    shapes = [shape_of(o) for o in outputs]
    if len(outputs) == 4:
        _, how = postprocessed_roles(outputs)
        return (DecoderSpec(kind=DecoderKind.POSTPROCESSED),
                f"no manifest: 4 outputs read as post-processed detections ({how})")
    if len(outputs) == 1:
        s = shapes[0]
        if len(s) == 3 and s[0] == 1 and 5 <= min(s[1:]) and min(s[1:]) * 4 <= max(s[1:]):
            return (DecoderSpec(kind=DecoderKind.YOLO),
                    f"no manifest: the single {s} output is read as YOLO boxes "
                    "(xywh centre, class scores, no objectness)")
        if len(s) == 4 and s[0] == 1 and s[1] >= 8 and s[2] >= 8 and s[3] <= 1024:
            what = "a foreground score" if s[3] == 1 else f"{s[3]} class scores per pixel"
            return (DecoderSpec(kind=DecoderKind.SEGMENTATION),
                    f"no manifest: the single {s} output is read as a segmentation mask ({what})")
    raise DecodeError(f"cannot infer a detection or segmentation decoder from outputs shaped {shapes}")
