"""Detection/segmentation decoders: NMS vs a reference, anchors, coordinate mapping,
every output convention, bad parameters, and the real sample detector's outputs."""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edgepipe.device.bundle import Preprocess, ResizeMode
from edgepipe.device.decode import (AnchorOptions, DecodeError, DecoderKind, DecoderSpec, PreprocessGeometry,
                                    batched_nms, geometry_for, infer_decoder, iou_matrix, letterbox,
                                    make_decoder, nms, rle_decode, rle_encode, ssd_anchors, stretch,
                                    to_source_coords, write_mask_png)
from edgepipe.device.paths import user_dir

ROOT = Path(__file__).resolve().parents[2]
DETECTOR_DIR = user_dir("cache", "edgepipe", env="EDGEPIPE_CACHE") / "models" / "ssdlite_person"
FRAMES = ROOT / "sample_data" / "detector"
MESSI = ROOT / "sample_data" / "images" / "messi5.jpg"


class Spec:
    """A tensor spec as the runtime gives it (name, shape, dtype, scale, zero point)."""

    def __init__(self, name, shape, dtype="float32", scale=0.0, zero_point=0):
        self.name, self.shape, self.dtype, self.scale, self.zero_point = name, tuple(shape), dtype, scale, zero_point


# ------------------------------------------------------------------ NMS


def reference_nms(boxes, scores, thr):
    """Plain greedy NMS, pairwise, in pure Python."""
    def iou(a, b):
        iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
        ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
        inter = iw * ih
        union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
        return inter / union if union > 0 else 0.0
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    keep, dropped = [], set()
    for i in order:
        if i in dropped:
            continue
        keep.append(i)
        for j in order:
            if j not in dropped and j != i and j not in keep and iou(boxes[i], boxes[j]) > thr:
                dropped.add(j)
    return keep


def random_boxes(rng, n):
    xy = rng.uniform(0, 100, size=(n, 2))
    wh = rng.uniform(5, 40, size=(n, 2))
    return np.concatenate([xy, xy + wh], axis=1), rng.uniform(0, 1, size=n)


@pytest.mark.parametrize("seed", range(6))
def test_nms_matches_reference(seed):
    rng = np.random.default_rng(seed)
    boxes, scores = random_boxes(rng, 150)
    thr = [0.3, 0.5, 0.7][seed % 3]
    assert nms(boxes, scores, thr).tolist() == reference_nms(boxes.tolist(), scores.tolist(), thr)


def test_batched_nms_per_class_matches_reference_per_class():
    rng = np.random.default_rng(42)
    boxes, scores = random_boxes(rng, 200)
    classes = rng.integers(0, 3, size=200)
    got = batched_nms(boxes, scores, classes, 0.5)
    want = []
    for c in range(3):
        idx = np.flatnonzero(classes == c)
        want += [int(idx[i]) for i in reference_nms(boxes[idx].tolist(), scores[idx].tolist(), 0.5)]
    assert sorted(got.tolist()) == sorted(want)
    assert list(scores[got]) == sorted(scores[got], reverse=True)  # best first
    agnostic = batched_nms(boxes, scores, classes, 0.5, class_agnostic=True)
    assert agnostic.tolist() == reference_nms(boxes.tolist(), scores.tolist(), 0.5)
    assert batched_nms(boxes, scores, classes, 0.5, max_out=5).tolist() == got[:5].tolist()


def test_iou_matrix_known_values():
    a = np.array([[0, 0, 10, 10]])
    b = np.array([[0, 0, 10, 10], [5, 0, 15, 10], [20, 20, 30, 30], [0, 0, 0, 0]])
    np.testing.assert_allclose(iou_matrix(a, b), [[1.0, 50 / 150, 0.0, 0.0]])


# ------------------------------------------------------------------ anchors

SSD_OPTIONS = {"num_layers": 6, "min_scale": 0.2, "max_scale": 0.95, "input_size_height": 300,
               "input_size_width": 300, "strides": [16, 32, 64, 128, 256, 512],
               "aspect_ratios": [1.0, 2.0, 0.5, 3.0, 0.3333], "reduce_boxes_in_lowest_layer": True}
BLAZEFACE_OPTIONS = {"num_layers": 4, "min_scale": 0.1484375, "max_scale": 0.75, "input_size_height": 128,
                     "input_size_width": 128, "strides": [8, 16, 16, 16], "aspect_ratios": [1.0],
                     "fixed_anchor_size": True}


def test_ssd_anchors_match_the_tf_object_detection_layout():
    a = ssd_anchors(AnchorOptions.from_dict(SSD_OPTIONS))
    assert a.shape == (19 * 19 * 3 + (10 * 10 + 5 * 5 + 3 * 3 + 2 * 2 + 1) * 6, 4) == (1917, 4)
    # First cell of the lowest layer: (0.1, 1), (0.2, 2), (0.2, 0.5) at centre 0.5/19.
    c = 0.5 / 19
    np.testing.assert_allclose(a[:3], [[c, c, 0.1, 0.1], [c, c, 0.2 / 2 ** 0.5, 0.2 * 2 ** 0.5],
                                       [c, c, 0.2 * 2 ** 0.5, 0.2 / 2 ** 0.5]], rtol=1e-5)
    # The last anchor: the 1x1 layer's interpolated scale sqrt(0.95 * 1.0).
    np.testing.assert_allclose(a[-1], [0.5, 0.5, 0.95 ** 0.5, 0.95 ** 0.5], rtol=1e-5)


def test_blazeface_anchors():
    a = ssd_anchors(AnchorOptions.from_dict(BLAZEFACE_OPTIONS))
    assert a.shape == (16 * 16 * 2 + 8 * 8 * 6, 4) == (896, 4)
    assert np.all(a[:, 2:] == 1.0)
    np.testing.assert_allclose(a[0], [0.5 / 16, 0.5 / 16, 1, 1])


# ------------------------------------------------------------------ coordinate mapping


def test_stretch_maps_normalised_boxes_to_pixels():
    g = stretch(640, 480)
    out = to_source_coords(np.array([[0.25, 0.5, 0.75, 1.0]]), 640, 480, g)
    np.testing.assert_allclose(out, [[160, 240, 480, 480]])


def test_letterbox_undoes_the_padding():
    # 640x320 into 300x300: scale 300/640, content height 150 px, 75 px bars top and bottom.
    g = letterbox(640, 320, 300, 300)
    np.testing.assert_allclose(g.content, [0, 0.25, 1, 0.75])
    box_px = np.array([[30, 75, 150, 225]]) / 300.0  # model-input pixels, normalised
    np.testing.assert_allclose(to_source_coords(box_px, 640, 320, g), [[64, 0, 320, 320]])
    # A box in the padding is clipped onto the image edge.
    np.testing.assert_allclose(to_source_coords(np.array([[0, 0, 1, 0.2]]), 640, 320, g), [[0, 0, 640, 0]])


def test_letterbox_round_trips_a_drawn_box():
    """Draw a box in the source, letterbox the image, find it in the input, map it back."""
    src = np.zeros((200, 500, 3), np.uint8)
    src[50:150, 100:300] = 255
    g = letterbox(500, 200, 160, 160)
    scale = min(160 / 500, 160 / 200)
    w, h = round(500 * scale), round(200 * scale)
    canvas = np.zeros((160, 160, 3), np.uint8)
    top, left = (160 - h) // 2, (160 - w) // 2
    canvas[top:top + h, left:left + w] = np.asarray(Image.fromarray(src).resize((w, h), Image.Resampling.NEAREST))
    ys, xs = np.nonzero(canvas[:, :, 0])
    found = np.array([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]]) / 160.0
    np.testing.assert_allclose(to_source_coords(found, 500, 200, g), [[100, 50, 300, 150]], atol=2)


def test_geometry_for_bundle_preprocess():
    pre = Preprocess(height=224, width=224, resize=ResizeMode.CENTER_CROP, crop_fraction=0.5)
    g = geometry_for(pre, 400, 200)
    np.testing.assert_allclose(g.region, [150, 50, 250, 150])
    np.testing.assert_allclose(to_source_coords(np.array([[0, 0, 1, 1]]), 400, 200, g), [[150, 50, 250, 150]])
    assert geometry_for(Preprocess(height=10, width=10), 30, 20) == stretch(30, 20)
    with pytest.raises(DecodeError, match="geometry is for a 30x20"):
        to_source_coords(np.zeros((1, 4)), 31, 20, stretch(30, 20))


# ------------------------------------------------------------------ conventions (synthetic tensors)


def test_postprocessed_tf1_and_tf2_orders_and_quantized_scores():
    boxes = np.array([[[0.1, 0.2, 0.5, 0.6], [0.0, 0.0, 1.0, 1.0], [0, 0, 0, 0]]], np.float32)
    classes = np.array([[2, 0, 7]], np.float32)
    scores = np.array([[0.9, 0.3, 0.99]], np.float32)
    count = np.array([2], np.float32)
    tf1 = [Spec("TFLite_Detection_PostProcess", (1, 3, 4)), Spec("TFLite_Detection_PostProcess:1", (1, 3)),
           Spec("TFLite_Detection_PostProcess:2", (1, 3)), Spec("TFLite_Detection_PostProcess:3", (1,))]
    spec = DecoderSpec.from_dict({"kind": "postprocessed", "score_threshold": 0.25})
    dec = make_decoder(spec, tf1, labels=["a", "b", "c"])
    res = dec([boxes, classes, scores, count], stretch(100, 200))
    assert [(d.label, round(d.score, 2)) for d in res.detections] == [("c", 0.9), ("a", 0.3)]
    np.testing.assert_allclose(res.detections[0].box_xyxy, [20, 20, 60, 100], rtol=1e-5)
    # TF2 order with generic names and uint8 scores: same answer.
    tf2 = [Spec("StatefulPartitionedCall:1", (1, 3), "uint8", 1 / 255, 0), Spec("StatefulPartitionedCall:3", (1, 3, 4)),
           Spec("StatefulPartitionedCall:0", (1,)), Spec("StatefulPartitionedCall:2", (1, 3))]
    q = np.round(scores * 255).astype(np.uint8)
    res2 = make_decoder(spec, tf2, labels=["a", "b", "c"])([q, boxes, count, classes], stretch(100, 200))
    assert [d.label for d in res2.detections] == ["c", "a"]
    assert "tf2" in make_decoder(spec, tf2).assumption


def synthetic_ssd(anchors, hits):
    """Raw SSD outputs (yxhw regressors, logits with background column) placing ``hits`` exactly."""
    n = len(anchors)
    reg = np.zeros((1, n, 4), np.float32)
    logits = np.full((1, n, 3), -8.0, np.float32)
    for i, (box_yxyx, cls) in hits.items():
        y0, x0, y1, x1 = box_yxyx
        ayc, axc, ah, aw = anchors[i]
        reg[0, i] = [((y0 + y1) / 2 - ayc) / ah * 10, ((x0 + x1) / 2 - axc) / aw * 10,
                     np.log((y1 - y0) / ah) * 5, np.log((x1 - x0) / aw) * 5]
        logits[0, i, cls + 1] = 4.0
    return reg, logits


def test_raw_ssd_decodes_boxes_through_anchors():
    opts = AnchorOptions.from_dict(SSD_OPTIONS)
    anchors = ssd_anchors(opts)
    reg, logits = synthetic_ssd(anchors, {5: ((0.1, 0.2, 0.4, 0.5), 0), 1000: ((0.5, 0.5, 0.9, 0.7), 1)})
    spec = DecoderSpec.from_dict({"kind": "ssd", "anchors": SSD_OPTIONS, "background_class": True})
    outs = [Spec("scores", (1, 1917, 3)), Spec("box_encodings", (1, 1917, 4))]
    res = make_decoder(spec, outs, ["cat", "dog"])([logits, reg], stretch(200, 100))
    got = sorted((d.label, tuple(np.round(d.box_xyxy, 3))) for d in res.detections)
    assert got == [("cat", (40.0, 10.0, 100.0, 40.0)), ("dog", (100.0, 50.0, 140.0, 90.0))]


def test_yolo_both_layouts_objectness_and_pixel_units():
    rows = np.array([[32, 32, 20, 20, 0.9, 0.1, 0.8],   # cx cy w h obj c0 c1 (input pixels, 64x64)
                     [33, 32, 20, 20, 0.8, 0.1, 0.9],   # overlaps row 0, same class: suppressed
                     [10, 50, 8, 8, 0.95, 0.7, 0.1],
                     [50, 10, 8, 8, 0.1, 0.9, 0.9]], np.float32)  # low objectness
    for layout, arr in (("boxes-last", rows[None]), ("boxes-first", rows.T[None])):
        # 4 candidates is fewer than 7 values a row, so "auto" cannot tell: say it.
        spec = DecoderSpec.from_dict({"kind": "yolo", "objectness": True, "score_threshold": 0.4, "layout": layout})
        dec = make_decoder(spec, [Spec("out", arr.shape)], ["p", "q"], input_size=(64, 64))
        res = dec([arr], stretch(128, 128))
        assert layout in dec.assumption
        assert [(d.label, round(d.score, 3)) for d in res.detections] == [("q", 0.72), ("p", 0.665)]
        np.testing.assert_allclose(res.detections[0].box_xyxy, [44, 44, 84, 84])


def test_segmentation_argmax_areas_rle_and_letterbox():
    logits = np.zeros((1, 4, 4, 3), np.float32)
    logits[0, :, :, 0] = 1
    logits[0, 1:3, 0:2, 2] = 5  # class 2 on a 2x2 patch
    spec = DecoderSpec.from_dict({"kind": "segmentation", "background_class": True})
    dec = make_decoder(spec, [Spec("mask", (1, 4, 4, 3))], ["bg", "x", "y"])
    res = dec([logits], stretch(8, 8))
    seg = res.segmentation
    assert [(a.class_id, a.label, a.fraction) for a in seg.areas] == [(2, "y", 0.25)]
    assert rle_decode(seg.rle["2"]).sum() == 16
    assert res.to_json()["segmentation"]["size"] == [8, 8]
    # A single foreground channel with a letterboxed 8x4 source: padding rows never map back.
    fg = np.zeros((1, 4, 4, 1), np.float32)
    fg[0, 1:3, :2] = 0.9
    g = letterbox(8, 4, 4, 4)
    dec1 = make_decoder(DecoderSpec.from_dict({"kind": "segmentation"}), [Spec("m", (1, 4, 4, 1))], ["person"])
    seg1 = dec1([fg], g).segmentation
    assert seg1.mask.shape == (4, 8)
    assert seg1.mask[:, :4].all() and not seg1.mask[:, 4:].any()
    assert [(a.label, a.fraction) for a in seg1.areas] == [("person", 0.5)]


def test_rle_round_trip_and_coco_convention(tmp_path):
    rng = np.random.default_rng(3)
    m = rng.random((7, 5)) > 0.6
    rle = rle_encode(m)
    assert sum(rle["counts"]) == 35 and rle["size"] == [7, 5]
    assert (rle_decode(rle) == m).all()
    assert rle_encode(np.ones((2, 2), bool))["counts"] == [0, 4]  # starts with a (zero) run of 0s
    from edgepipe.device.decode import Segmentation
    write_mask_png(Segmentation(mask=m.astype(np.uint8), areas=()), tmp_path / "m.png")
    assert (np.asarray(Image.open(tmp_path / "m.png")) == m).all()


def test_infer_decoder_says_what_it_assumed():
    spec, why = infer_decoder([Spec("a", (1, 10, 4)), Spec("b", (1, 10)), Spec("c", (1, 10)), Spec("d", (1,))])
    assert spec.kind == DecoderKind.POSTPROCESSED and "post-processed" in why
    spec, why = infer_decoder([Spec("y", (1, 84, 8400))])
    assert spec.kind == DecoderKind.YOLO and "(1, 84, 8400)" in why
    spec, why = infer_decoder([Spec("s", (1, 256, 256, 1))])
    assert spec.kind == DecoderKind.SEGMENTATION and "foreground" in why
    with pytest.raises(DecodeError, match="cannot infer"):
        infer_decoder([Spec("x", (1, 1000))])


# ------------------------------------------------------------------ bad parameters

BAD = [
    ({}, "kind must be one of"),
    ({"kind": "retina"}, "kind must be one of"),
    ({"kind": "yolo", "score_threshold": 1.5}, "score_threshold must be a number in"),
    ({"kind": "yolo", "iou_threshold": "high"}, "iou_threshold"),
    ({"kind": "yolo", "max_detections": 0}, "max_detections"),
    ({"kind": "yolo", "anchors": {}}, "unknown yolo decoder parameter"),
    ({"kind": "ssd"}, "needs anchors"),
    ({"kind": "ssd", "anchors": {**SSD_OPTIONS, "strides": [16, 32]}}, "strides has 2 entries"),
    ({"kind": "ssd", "anchors": {**SSD_OPTIONS, "wobble": 1}}, "unknown anchor option"),
    ({"kind": "ssd", "anchors": SSD_OPTIONS, "box_scales": [10, 10, 5]}, "box_scales must be a list of 4"),
    ({"kind": "ssd", "anchors": SSD_OPTIONS, "score_activation": "relu"}, "score_activation must be one of"),
    ({"kind": "postprocessed", "outputs": {"boxes": 0}}, "decoder outputs must map"),
    ("ssd", "must be a JSON object"),
]


@pytest.mark.parametrize("params,message", BAD)
def test_bad_parameters_give_one_line_errors(params, message):
    with pytest.raises(DecodeError, match=message) as err:
        DecoderSpec.from_dict(params)
    assert "\n" not in str(err.value)


def test_outputs_that_do_not_fit_the_convention():
    spec = DecoderSpec.from_dict({"kind": "ssd", "anchors": SSD_OPTIONS})
    with pytest.raises(DecodeError, match="1917 anchors x 4"):
        make_decoder(spec, [Spec("a", (1, 100, 4)), Spec("b", (1, 100, 2))])
    with pytest.raises(DecodeError, match="4 outputs"):
        make_decoder(DecoderSpec.from_dict({"kind": "postprocessed"}), [Spec("a", (1, 10, 4))])


def test_spec_round_trips_through_the_manifest_form_and_overrides():
    spec = DecoderSpec.from_dict({"kind": "ssd", "anchors": SSD_OPTIONS, "background_class": True})
    assert DecoderSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    tighter = spec.with_thresholds(score=0.7, iou=0.3, max_detections=5)
    assert (tighter.score_threshold, tighter.iou_threshold, tighter.max_detections) == (0.7, 0.3, 5)
    with pytest.raises(DecodeError):
        spec.with_thresholds(score=-1)


# ------------------------------------------------------------------ the real sample detector

needs_detector = pytest.mark.skipif(
    not (DETECTOR_DIR / "decoder.json").is_file(),
    reason="sample detector not built (run scripts/sample_data/build_detector.py)")


def run_detector(name, photo, threshold=0.5):
    from edgepipe.device.preprocess import load_image, to_model_input
    from edgepipe.device.runtime import load_model

    params = json.loads((DETECTOR_DIR / "decoder.json").read_text())
    pre = Preprocess.from_dict(params["preprocess"])
    model = load_model(DETECTOR_DIR / name)
    spec = DecoderSpec.from_dict(params[name]).with_thresholds(score=threshold)
    dec = make_decoder(spec, model.outputs, ["person"])
    model.set_input(0, to_model_input(load_image(photo, pre), pre, model.inputs[0]))
    model.invoke()
    with Image.open(photo) as im:
        size = im.size
    return dec([model.get_output(i) for i in range(len(model.outputs))], geometry_for(pre, *size)), dec


@needs_detector
def test_real_detector_finds_the_footballer():
    res, _ = run_detector("ssdlite_person_raw.tflite", MESSI)
    assert [d.label for d in res.detections] == ["person"]
    # The player (hand-measured in the 548x342 photo) spans x 70..455, y 60..335.
    assert iou_matrix(np.array([res.detections[0].box_xyxy]), np.array([[70, 60, 455, 335]]))[0, 0] > 0.8


@needs_detector
@pytest.mark.parametrize("frame", ["vtest_frame00.jpg", "vtest_frame20.jpg", "vtest_frame40.jpg"])
def test_raw_ssd_decoder_agrees_with_tflite_postprocess_op(frame):
    """Our anchors + box coder + NMS on the raw head == TFLite_Detection_PostProcess on the same net."""
    raw, dec_raw = run_detector("ssdlite_person_raw.tflite", FRAMES / frame, 0.3)
    pp, dec_pp = run_detector("ssdlite_person.tflite", FRAMES / frame, 0.3)
    assert "1917 SSD anchors" in dec_raw.assumption and "tf1" in dec_pp.assumption
    assert len(raw.detections) >= 2  # pedestrians in every sampled frame
    assert [d.class_id for d in raw.detections] == [d.class_id for d in pp.detections]
    np.testing.assert_allclose([d.score for d in raw.detections], [d.score for d in pp.detections], atol=1e-4)
    np.testing.assert_allclose([d.box_xyxy for d in raw.detections], [d.box_xyxy for d in pp.detections], atol=0.05)
    for d in raw.detections:  # pedestrians are small and upright in this street scene
        x0, y0, x1, y1 = d.box_xyxy
        assert 0 <= x0 < x1 <= 384 and 0 <= y0 < y1 <= 288 and (y1 - y0) > (x1 - x0)
