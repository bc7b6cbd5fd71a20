"""`edgerun run` on detection/segmentation models: decoded lines, source-pixel boxes, annotation, bad decoders.

The models are real .tflite files with outputs known in closed form
(scripts/make_detection_test_models.py): the YOLO model puts one box at
(24, 24)-(40, 40) of its 64x64 input, scored by brightness; the segmentation
model marks pixels brighter than mid-grey. Runs here need no TensorFlow, so
the arm64 device suite covers them too.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edgepipe.device.decode import rle_decode
from edgepipe.device.preprocess import LETTERBOX_FILL
from edgepipe.device.runner import run_source

UNIT = {"mean": (0.0, 0.0, 0.0), "std": (255.0, 255.0, 255.0)}


def with_decoder(bundle: Path, decoder: dict, task: str = "detection") -> Path:
    m = json.loads((bundle / "manifest.json").read_text())
    m["decoder"], m["task"] = decoder, task
    (bundle / "manifest.json").write_text(json.dumps(m))
    return bundle


@pytest.fixture
def white_128x64(tmp_path) -> Path:
    d = tmp_path / "frames"
    d.mkdir()
    Image.new("RGB", (128, 64), (255, 255, 255)).save(d / "white.png")
    return d


def run(bundle, source, **kw):
    lines = []
    report = run_source(bundle, source, on_prediction=lines.append, **kw)
    return lines, report


@pytest.mark.parametrize("resize, expected", [
    # stretch: x doubles (128 / 64), y unchanged (64 / 64)
    ("stretch", [48, 24, 80, 40]),
    # letterbox: 128x64 -> 64x32 at rows 16..48 of the input; undo the offset, then the 0.5 scale
    ("letterbox", [48, 16, 80, 48]),
])
def test_yolo_boxes_come_back_in_source_pixels(make_bundle, models_dir, white_128x64, resize, expected):
    b = make_bundle(models_dir / "yolo_boxes.tflite", name="yolo", labels=["thing", "other"], task="detection",
                    preprocess=dict(UNIT, resize=resize))
    with_decoder(b, {"kind": "yolo", "score_threshold": 0.5})
    lines, report = run(b, white_128x64)
    dets = lines[0]["detections"]
    # The score is the input's mean brightness: letterbox bars are LETTERBOX_FILL grey.
    score = 1.0 if resize == "stretch" else 0.5 + 0.5 * LETTERBOX_FILL / 255
    assert [d["label"] for d in dets] == ["thing"] and dets[0]["score"] == pytest.approx(score, abs=1e-4)
    np.testing.assert_allclose(dets[0]["box"], expected, atol=0.05)
    block = report["detections"]
    assert block["boxes"] == 1 and block["classes"] == {"thing": 1} and block["decoder"]["kind"] == "yolo"
    assert "decode" in report["stages_ms"] and report["stages_ms"]["decode"]["n"] == 1
    assert report["input"]["task"] == "detection"


def test_thresholds_from_the_command_line_override_the_manifest(make_bundle, models_dir, tmp_path):
    b = make_bundle(models_dir / "yolo_boxes.tflite", name="yolo", task="detection", preprocess=UNIT)
    with_decoder(b, {"kind": "yolo", "score_threshold": 0.5})
    img = tmp_path / "black.png"
    Image.new("RGB", (64, 64)).save(img)  # black: box 0 scores 0, box 1 scores 0.25
    from edgepipe.device.decode_stage import Thresholds

    assert run(b, img)[0][0]["count"] == 0
    lines, report = run(b, img, thresholds=Thresholds(score=0.2))
    dets = lines[0]["detections"]
    assert [d["class_id"] for d in dets] == [1]
    np.testing.assert_allclose(dets[0]["box"], [0, 0, 16, 8], atol=0.05)
    assert report["detections"]["decoder"]["score_threshold"] == 0.2


def test_plain_tflite_decoder_is_inferred_and_the_assumption_recorded(models_dir, white_128x64):
    lines, report = run(models_dir / "yolo_boxes.tflite", white_128x64)
    assert lines[0]["count"] == 1
    assumed = " ".join(report["detections"]["assumed"]) + " ".join(report["input"]["assumed"])
    assert "read as YOLO boxes" in assumed


def test_segmentation_mask_through_letterbox(make_bundle, models_dir, tmp_path):
    img = np.zeros((60, 120, 3), np.uint8)
    img[:, 80:] = 255  # right third bright
    (tmp_path / "f").mkdir()
    Image.fromarray(img).save(tmp_path / "f" / "third.png")
    b = make_bundle(models_dir / "seg_halves.tflite", name="seg", labels=["bg", "bright"], task="segmentation",
                    preprocess=dict(UNIT, resize="letterbox"))
    with_decoder(b, {"kind": "segmentation", "background_class": True}, task="segmentation")
    lines, report = run(b, tmp_path / "f", annotate=tmp_path / "ann")
    seg = lines[0]["segmentation"]
    assert seg["size"] == [60, 120]
    assert [(c["label"], c["fraction"]) for c in seg["classes"]] == [("bright", pytest.approx(1 / 3, abs=0.02))]
    mask = rle_decode(seg["rle"]["1"])
    assert mask[:, 84:].all() and not mask[:, :76].any()  # boundary within a mask pixel (2.5 px)
    assert report["detections"]["task"] == "segmentation"
    assert report["detections"]["annotated"]["frames"] == 1 and (tmp_path / "ann" / "third.jpg").is_file()


def test_annotate_writes_jpegs_for_image_sources(make_bundle, models_dir, white_128x64, tmp_path):
    b = make_bundle(models_dir / "yolo_boxes.tflite", name="yolo", task="detection", preprocess=UNIT)
    with_decoder(b, {"kind": "yolo"})
    _, report = run(b, white_128x64, annotate=tmp_path / "out")
    with Image.open(tmp_path / "out" / "white.jpg") as im:
        assert im.size == (128, 64)
        px = np.asarray(im.convert("RGB"))
    assert px[40, 48].tolist() != [255, 255, 255]  # the box outline is drawn at source pixels
    assert report["detections"]["annotated"] == {"path": str((tmp_path / "out").resolve()), "kind": "images",
                                                 "frames": 1}


@pytest.mark.slow  # 10-45 s under arm64 emulation (process start-ups); nothing here depends on the CPU or runtime
def test_bad_decoder_in_manifest_is_one_line(make_bundle, models_dir, white_128x64, edgerun):
    b = make_bundle(models_dir / "yolo_boxes.tflite", name="yolo", task="detection", preprocess=UNIT)
    with_decoder(b, {"kind": "yolo", "score_threshold": 7})
    res = edgerun("run", b, "--source", white_128x64)
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines()[-1] == \
        "Error: decoder score_threshold must be a number in [0.0, 1.0], got 7"
    with_decoder(b, {"kind": "ssd"})  # anchors missing
    res = edgerun("run", b, "--source", white_128x64)
    assert "an ssd decoder needs anchors" in res.stderr and "Traceback" not in res.stderr


@pytest.mark.slow  # 10-45 s under arm64 emulation (process start-ups); nothing here depends on the CPU or runtime
def test_annotate_refuses_a_classifier_and_a_wrong_suffix(make_bundle, float_model, models_dir, white_128x64,
                                                          tmp_path, edgerun):
    res = edgerun("run", make_bundle(float_model), "--source", white_128x64, "--annotate", tmp_path / "a")
    assert res.returncode != 0 and "needs a detection or segmentation model" in res.stderr
    b = make_bundle(models_dir / "yolo_boxes.tflite", name="yolo", task="detection", preprocess=UNIT)
    res = edgerun("run", b, "--source", white_128x64, "--annotate", tmp_path / "a.mp4")
    assert res.returncode != 0 and "folder of JPEGs" in res.stderr and "Traceback" not in res.stderr


def test_cli_prints_decoder_and_detections(make_bundle, models_dir, white_128x64, edgerun, tmp_path):
    b = make_bundle(models_dir / "yolo_boxes.tflite", name="yolo", labels=["thing", "other"], task="detection",
                    preprocess=UNIT)
    res = edgerun("run", b, "--source", white_128x64, "--score-threshold", "0.9", "--max-detections", "3",
                  "--report", tmp_path / "r.json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout.splitlines()[0])["detections"][0]["label"] == "thing"
    assert "decoder yolo" in res.stderr and "detections 1" in res.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["detections"]["decoder"]["max_detections"] == 3
