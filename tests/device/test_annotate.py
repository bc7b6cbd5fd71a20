"""Annotated output: boxes and masks drawn where the decoder put them, JPEG folders, MP4 files."""
from __future__ import annotations

import io
import sys

import numpy as np
import pytest
from PIL import Image

from edgepipe.device.annotate import AnnotateError, Annotator, colour, draw
from edgepipe.device.bundle import ColorOrder
from edgepipe.device.decode import DecodeResult, DecoderKind, Detection, Segmentation


def result(*boxes):
    return DecodeResult(kind=DecoderKind.SSD, detections=tuple(
        Detection(box_xyxy=b, class_id=i, score=0.9, label=f"c{i}") for i, b in enumerate(boxes)))


def test_draw_puts_the_box_outline_on_the_box():
    img = Image.new("RGB", (200, 100), (0, 0, 0))
    out = np.asarray(draw(img, result((50, 40, 150, 90)), line=2))
    c = colour(0)
    assert tuple(out[65, 50]) == c and tuple(out[65, 149]) == c and tuple(out[89, 100]) == c
    assert tuple(out[65, 100]) == (0, 0, 0)  # inside the box untouched
    assert tuple(out[10, 10]) == (0, 0, 0)
    assert out[30:40, 50:70].any()  # the label tab sits above the box
    assert np.asarray(img).max() == 0  # the input is not modified


def test_draw_mask_overlay_only_on_foreground():
    mask = np.zeros((10, 20), np.int32)
    mask[:, 10:] = 1
    seg = DecodeResult(kind=DecoderKind.SEGMENTATION, segmentation=Segmentation(mask=mask, areas=()))
    out = np.asarray(draw(Image.new("RGB", (20, 10), (100, 100, 100)), seg))
    assert (out[:, :10] == 100).all()
    assert (out[:, 10:] != 100).any(axis=2).all()


def jpeg_bytes(w=64, h=48):
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (10, 200, 10)).save(buf, format="JPEG")
    return buf.getvalue()


def test_annotator_writes_a_jpeg_per_frame(tmp_path):
    bgr = np.zeros((48, 64, 3), np.uint8)
    bgr[:, :, 0] = 255  # blue in BGR order
    with Annotator(tmp_path / "out", "images", queue_size=2) as ann:
        ann.submit(jpeg_bytes(), result((5, 5, 30, 30)), name="a.jpg")
        ann.submit(bgr, result(), name="frame 2.png", order=ColorOrder.BGR)
        for i in range(5):
            ann.submit(Image.new("RGB", (64, 48)), result((1, 1, 9, 9)))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "a.jpg", "frame 2.jpg"] + [f"frame_{i:06d}.jpg" for i in range(2, 7)]
    blue = np.asarray(Image.open(tmp_path / "out" / "frame 2.jpg"))[20, 20]
    assert blue[2] > 200 and blue[0] < 60  # BGR frames come out the right colour
    assert ann.written == 7


def test_annotator_reports_a_bad_frame_on_close(tmp_path):
    ann = Annotator(tmp_path / "out", "images")
    ann.submit(b"not an image", result())
    with pytest.raises(AnnotateError, match="annotation failed after 0 frame") as err:
        ann.close()
    assert "\n" not in str(err.value)


def test_annotator_writes_an_mp4(tmp_path):
    cv2 = pytest.importorskip("cv2")
    out = tmp_path / "clip.mp4"
    with Annotator(out, "video", fps=10) as ann:
        for i in range(12):
            frame = np.full((96, 128, 3), i * 20, np.uint8)
            ann.submit(frame, result((10 + i, 10, 60 + i, 70)), order=ColorOrder.BGR)
    cap = cv2.VideoCapture(str(out))
    frames = 0
    while cap.read()[0]:
        frames += 1
    cap.release()
    assert frames == 12 and out.stat().st_size > 1000


def test_mp4_without_opencv_is_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "cv2", None)
    with pytest.raises(AnnotateError, match="needs OpenCV") as err:
        Annotator(tmp_path / "x.mp4", "video")
    assert "\n" not in str(err.value)


def test_bad_output_places(tmp_path):
    with pytest.raises(AnnotateError, match="no such directory"):
        Annotator(tmp_path / "missing" / "x.mp4", "video")
    (tmp_path / "file").write_text("x")
    with pytest.raises(AnnotateError, match="cannot create the annotation folder"):
        Annotator(tmp_path / "file" / "sub", "images")
