"""Detection accuracy: agreement with the float model, label files, and COCO mAP via pycocotools."""
from __future__ import annotations

import json
import sys

import pytest

from edgepipe.device.decode import Detection
from edgepipe.pipeline.detection_metrics import (DetectionMetricsError, agreement, load_coco_labels,
                                                 load_text_labels, match, mean_average_precision)


def det(box, cls=0, score=0.9, label=None):
    return Detection(box_xyxy=tuple(float(v) for v in box), class_id=cls, score=score, label=label)


def test_match_is_one_to_one_same_class_best_score_first():
    ref = [det((0, 0, 10, 10)), det((20, 20, 30, 30), cls=1)]
    var = [det((1, 0, 11, 10), score=0.5), det((0, 0, 10, 10), score=0.9),  # both want ref 0
           det((20, 20, 30, 30), cls=2)]                                      # wrong class
    assert match(ref, var) == [(1, 0, 1.0)]
    assert match(ref, []) == [] and match([], var) == []


def test_agreement_counts_precision_recall_and_mean_iou():
    ref = {"a.jpg": [det((0, 0, 10, 10)), det((50, 50, 60, 60))], "b.jpg": [det((0, 0, 4, 4))]}
    var = {"a.jpg": [det((0, 0, 10, 8)), det((100, 100, 110, 110))], "b.jpg": [det((0, 0, 4, 4))]}
    a = agreement(ref, var)
    assert (a.images, a.reference, a.variant, a.matched) == (2, 3, 3, 2)
    assert a.precision == pytest.approx(2 / 3) and a.recall == pytest.approx(2 / 3)
    assert a.mean_iou == pytest.approx((0.8 + 1.0) / 2)
    empty = agreement({"a.jpg": []}, {"a.jpg": []})
    assert empty.precision is None and empty.recall is None and empty.mean_iou is None
    assert agreement(ref, ref).to_dict()["precision"] == 1.0


def coco_file(tmp_path):
    data = {"images": [{"id": 7, "file_name": "imgs/a.jpg", "width": 100, "height": 80},
                       {"id": 8, "file_name": "b.jpg", "width": 50, "height": 50}],
            "categories": [{"id": 1, "name": "person"}, {"id": 3, "name": "car"}],
            "annotations": [{"id": 1, "image_id": 7, "category_id": 1, "bbox": [10, 10, 20, 40]},
                            {"id": 2, "image_id": 7, "category_id": 3, "bbox": [50, 20, 40, 30]},
                            {"id": 3, "image_id": 8, "category_id": 1, "bbox": [0, 0, 25, 25]}]}
    p = tmp_path / "labels.json"
    p.write_text(json.dumps(data))
    return p


def test_coco_labels_load_and_perfect_detections_score_one(tmp_path):
    pytest.importorskip("pycocotools")
    labels = load_coco_labels(coco_file(tmp_path))
    assert labels.boxes["a.jpg"] == ((1, 10, 10, 30, 50), (3, 50, 20, 90, 50))
    perfect = {"a.jpg": [det((10, 10, 30, 50), 0, 0.9, "person"), det((50, 20, 90, 50), 1, 0.8, "car")],
               "b.jpg": [det((0, 0, 25, 25), 0, 0.7, "person")]}
    assert mean_average_precision(labels, perfect) == {"map50": 1.0, "map50_95": 1.0}


def test_map_drops_with_loose_boxes_and_misses(tmp_path):
    pytest.importorskip("pycocotools")
    labels = load_coco_labels(coco_file(tmp_path))
    # Person boxes shifted: IoU 0.6-0.7, so right at 0.5, wrong at the strict thresholds.
    loose = {"a.jpg": [det((10, 16, 30, 56), 0, 0.9, "person"), det((50, 20, 90, 50), 1, 0.8, "car")],
             "b.jpg": [det((4, 4, 29, 29), 0, 0.7, "person")]}
    m = mean_average_precision(labels, loose)
    assert m["map50"] == pytest.approx(1.0) and m["map50_95"] < 0.75
    missing_car = {"a.jpg": [det((10, 10, 30, 50), 0, 0.9, "person")], "b.jpg": []}
    m2 = mean_average_precision(labels, missing_car)
    # Person: precision 1 up to recall 0.5 -> 51 of COCO's 101 recall points; car: AP 0.
    assert m2["map50"] == pytest.approx((51 / 101 + 0.0) / 2)
    assert mean_average_precision(labels, {}) == {"map50": 0.0, "map50_95": 0.0}


def test_text_labels_per_image(tmp_path):
    (tmp_path / "a.txt").write_text("0 0.5 0.5 0.2 0.5\n\n1 0.1 0.1 0.2 0.2\n")
    labels = load_text_labels(tmp_path, {"a.jpg": (100, 80), "b.jpg": (10, 10)}, ["person", "car"])
    assert labels.boxes["a.jpg"] == ((0, 40.0, 20.0, 60.0, 60.0), (1, 0.0, 0.0, 20.0, 16.0))
    assert labels.boxes["b.jpg"] == () and labels.categories == {0: "person", 1: "car"}
    (tmp_path / "a.txt").write_text("0 0.5 0.5\n")
    with pytest.raises(DetectionMetricsError, match=r"a.txt:1: expected"):
        load_text_labels(tmp_path, {"a.jpg": (100, 80)})


def test_bad_label_files_are_one_line(tmp_path):
    p = tmp_path / "x.json"
    p.write_text("{not json")
    with pytest.raises(DetectionMetricsError, match="unreadable COCO JSON"):
        load_coco_labels(p)
    p.write_text(json.dumps({"images": [{"id": 1}]}))
    with pytest.raises(DetectionMetricsError, match="not COCO detection labels") as err:
        load_coco_labels(p)
    assert "\n" not in str(err.value)


def test_map_without_pycocotools_says_what_to_install(tmp_path, monkeypatch):
    labels = load_coco_labels(coco_file(tmp_path))
    monkeypatch.setitem(sys.modules, "pycocotools", None)
    monkeypatch.setitem(sys.modules, "pycocotools.coco", None)
    with pytest.raises(DetectionMetricsError, match="pip install pycocotools"):
        mean_average_precision(labels, {})
