"""The HTML report's detection section: accuracy and latency per variant, annotated frames embedded."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from PIL import Image

from edgepipe.device.bundle import load_bundle
from edgepipe.device.report import new_report
from edgepipe.device.runner import run_source
from edgepipe.pipeline.html_report import render_html
from edgepipe.pipeline.reporting import row

ROOT = Path(__file__).resolve().parents[2]
YOLO = ROOT / "tests" / "data" / "models" / "yolo_boxes.tflite"


def test_section_shows_accuracy_latency_and_frames(tmp_path):
    frames = tmp_path / "frames"
    frames.mkdir()
    for i in range(6):
        Image.new("RGB", (128, 64), (255, 255, 255)).save(frames / f"f{i}.png")
    run = run_source(YOLO, str(frames), annotate=tmp_path / "ann")
    assert run["detections"]["annotated"]["frames"] == 6
    ev = new_report("eval", model={"name": run["model"]["name"], "recipe": run["model"]["recipe"],
                                   "sha256": run["model"]["sha256"], "size": run["model"]["size"]})
    ev["accuracy"] = {"task": "detection", "agreement": {"precision": 0.97, "recall": 0.93, "mean_iou": 0.96},
                      "map50": 0.71, "map50_95": 0.42}
    rows = [row(run), row(ev)]
    html = render_html(rows, source="test")
    section = html[html.index('<section id="detection">'):]
    section = section[:section.index("</section>")]
    assert section.count("<img") == 4  # at most four frames, embedded
    assert "data:image/jpeg;base64," in section and "0.970" in section and "0.710" in section
    assert f"<td>{rows[0]['fps']:.1f}</td>" in section  # the run's FPS beside the eval's accuracy
    shutil.rmtree(tmp_path / "ann")  # frames gone: the section stays, without pictures
    assert "<img" not in render_html(rows, source="test").split('<section id="detection">')[1].split("</section>")[0]


def test_no_detection_section_without_detections(tmp_path):
    bench = new_report("bench")
    assert '<section id="detection">' not in render_html([row(bench)], source="test")
