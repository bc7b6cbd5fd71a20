"""Detection end to end on the host: convert a detector .tflite, evaluate agreement and mAP, decode the sample detector.

The tiny YOLO model (tests/data/models/yolo_boxes.tflite) puts one box at a
known place, so mAP against a label file describing that box is exactly 1.
The sample SSDLite person detector is built once into the cache
(scripts/sample_data/build_detector.py, ~45 s with TensorFlow) and reused.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from edgepipe.device.runner import run_source
from edgepipe.pipeline.cli import main
from edgepipe.pipeline.evaluate_detection import DetectionEvalError, evaluate_detection, format_detection_results

ROOT = Path(__file__).resolve().parents[2]
YOLO = ROOT / "tests" / "data" / "models" / "yolo_boxes.tflite"
FRAMES = ROOT / "sample_data" / "detector"


def convert(*args):
    return CliRunner().invoke(main, ["convert", *map(str, args)], catch_exceptions=False)


@pytest.fixture(scope="module")
def yolo_bundles(tmp_path_factory):
    pytest.importorskip("ai_edge_quantizer")
    root = tmp_path_factory.mktemp("yolo")
    (root / "labels.txt").write_text("thing\nother\n")
    (root / "decoder.json").write_text(json.dumps({"kind": "yolo", "score_threshold": 0.5}))
    calib = root / "calib"
    calib.mkdir()
    for i, v in enumerate((0, 128, 255)):
        Image.new("RGB", (64, 64), (v, v, v)).save(calib / f"{i}.png")
    res = convert(YOLO, "--recipes", "fp32,int8", "--calib", calib, "--preprocess", "unit", "--labels",
                  root / "labels.txt", "--decoder", root / "decoder.json", "--out", root / "b", "--no-cache")
    assert res.exit_code == 0, res.output
    return root / "b"


@pytest.fixture
def labelled(tmp_path) -> Path:
    data = tmp_path / "data"
    data.mkdir()
    Image.new("RGB", (128, 64), (255, 255, 255)).save(data / "white.png")
    (data / "white.txt").write_text("0 0.5 0.5 0.25 0.25\n")  # the box (48, 24)-(80, 40) in pixels
    Image.new("RGB", (128, 64), (240, 240, 240)).save(data / "grey.png")
    (data / "grey.txt").write_text("0 0.5 0.5 0.25 0.25\n")
    return data


def test_agreement_and_map_with_text_labels(yolo_bundles, labelled):
    results = evaluate_detection([yolo_bundles / "yolo_boxes-fp32", yolo_bundles / "yolo_boxes-int8"], labelled)
    fp32, int8 = results
    assert fp32.agreement["precision"] == fp32.agreement["recall"] == 1.0 and fp32.agreement["reference"] == 2
    assert fp32.accuracy["map50"] == pytest.approx(1.0) and fp32.accuracy["map50_95"] == pytest.approx(1.0)
    assert int8.reference.endswith("yolo_boxes-fp32") and int8.agreement["matched"] == 2
    assert int8.agreement["mean_iou"] > 0.8 and int8.accuracy["map50"] == pytest.approx(1.0)
    assert "mAP@.5" in format_detection_results(results)


def test_coco_labels_and_a_miss(yolo_bundles, labelled, tmp_path):
    coco = {"images": [{"id": 1, "file_name": "white.png", "width": 128, "height": 64},
                       {"id": 2, "file_name": "grey.png", "width": 128, "height": 64}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 0, "bbox": [48, 24, 32, 16]},
                            {"id": 2, "image_id": 2, "category_id": 0, "bbox": [0, 40, 32, 16]}],  # not found
            "categories": [{"id": 0, "name": "thing"}]}
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    (r,) = evaluate_detection([yolo_bundles / "yolo_boxes-fp32"], labelled, labels_file=tmp_path / "coco.json")
    assert 0.3 < r.accuracy["map50"] < 0.7


def test_without_labels_agreement_only_and_missing_reference_is_one_line(yolo_bundles, tmp_path):
    data = tmp_path / "d"
    data.mkdir()
    Image.new("RGB", (64, 64), (255, 255, 255)).save(data / "w.png")
    (r,) = evaluate_detection([yolo_bundles / "yolo_boxes-int8"], data)
    assert "map50" not in r.accuracy and r.agreement["recall"] == 1.0 and r.notes
    lone = tmp_path / "lone"
    lone.mkdir()
    import shutil

    shutil.copytree(yolo_bundles / "yolo_boxes-int8", lone / "yolo_boxes-int8")
    with pytest.raises(DetectionEvalError, match="no float reference"):
        evaluate_detection([lone / "yolo_boxes-int8"], data)


# ------------------------------------------------------------------ the sample SSDLite detector


@pytest.fixture(scope="session")
def sample_detector():
    """The built sample detector folder (built once into the cache when missing; needs TensorFlow)."""
    pytest.importorskip("tensorflow")
    from edgepipe.pipeline.samples_build.build import build_sample

    return build_sample("ssdlite_person").parent  # cached after the first build


@pytest.mark.slow
def test_raw_ssd_and_postprocessed_decoders_agree_on_the_sample_detector(sample_detector, tmp_path):
    """The raw head (generated anchors, box coder, numpy NMS) finds what TFLite's post-processing op finds."""
    found = {}
    for name in ("ssdlite_person_raw.tflite", "ssdlite_person.tflite"):
        res = convert(sample_detector / name, "--recipes", "fp32", "--preprocess", "mobilenet", "--labels",
                      sample_detector / "labels.txt", "--decoder", sample_detector / "decoder.json",
                      "--out", tmp_path, "--no-cache")
        assert res.exit_code == 0, res.output
        lines = []
        report = run_source(tmp_path / f"{Path(name).stem}-fp32", str(FRAMES), on_prediction=lines.append)
        assert report["detections"]["classes"].get("person", 0) >= 3
        found[name] = {ln["source"]: ln["detections"] for ln in lines}
    raw, pp = found["ssdlite_person_raw.tflite"], found["ssdlite_person.tflite"]
    for frame in pp:
        assert len(raw[frame]) == len(pp[frame]) > 0, frame
        for a, b in zip(sorted(raw[frame], key=lambda d: d["box"]), sorted(pp[frame], key=lambda d: d["box"])):
            np.testing.assert_allclose(a["box"], b["box"], atol=1.0)
            assert a["score"] == pytest.approx(b["score"], abs=1e-3) and a["label"] == b["label"] == "person"


def test_evaluate_cli_takes_the_detection_path(yolo_bundles, labelled):
    res = CliRunner().invoke(main, ["evaluate", str(yolo_bundles / "yolo_boxes-int8"), "--data", str(labelled),
                                    "--json", "--quiet"])
    assert res.exit_code == 0, res.output
    (r,) = json.loads(res.stdout)["results"]
    assert r["accuracy"]["task"] == "detection" and r["accuracy"]["map50"] == pytest.approx(1.0)
    assert r["agreement"]["matched"] == 2
    bad = CliRunner().invoke(main, ["evaluate", str(yolo_bundles / "yolo_boxes-int8"), "--data",
                                    str(labelled / "missing")])
    assert bad.exit_code != 0 and "no such file or directory" in bad.output and "Traceback" not in bad.output
