"""Decoders for detection and segmentation outputs (pure numpy; no runtime import).

Conventions: post-processed detections (boxes, classes, scores, count), raw
SSD heads with anchors generated from recorded options, YOLO single tensors,
and segmentation masks. Boxes come back in source-image pixels via the
preprocessing geometry (stretch, centre-crop, letterbox).
"""
from edgepipe.device.decode.anchors import ssd_anchors
from edgepipe.device.decode.decoder import Decoder, infer_decoder, make_decoder
from edgepipe.device.decode.detect import POSTPROCESSED_ORDERS, dequantize
from edgepipe.device.decode.geometry import (PreprocessGeometry, geometry_for, letterbox, stretch,
                                             to_source_coords)
from edgepipe.device.decode.nms import batched_nms, iou_matrix, nms
from edgepipe.device.decode.segment import rle_decode, rle_encode, write_mask_png
from edgepipe.device.decode.spec import (Activation, AnchorOptions, ClassArea, DecodeError, DecodeResult,
                                         DecoderKind, DecoderSpec, Detection, Segmentation)

__all__ = [
    "Activation", "AnchorOptions", "ClassArea", "DecodeError", "DecodeResult", "Decoder", "DecoderKind",
    "DecoderSpec", "Detection", "POSTPROCESSED_ORDERS", "PreprocessGeometry", "Segmentation", "batched_nms",
    "dequantize", "geometry_for", "infer_decoder", "iou_matrix", "letterbox", "make_decoder", "nms",
    "rle_decode", "rle_encode", "ssd_anchors", "stretch", "to_source_coords", "write_mask_png",
]
