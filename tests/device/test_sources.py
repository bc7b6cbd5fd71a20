"""Frame sources on real files: folder, image, video, live replay, and absent cameras."""
from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from edgepipe.device.bundle import ColorOrder
from edgepipe.device.sources import LatestFrame, SourceError, open_source, replay_live, VideoSource

ROOT = Path(__file__).resolve().parents[2]
IMAGES = ROOT / "sample_data" / "images"
VIDEO = ROOT / "sample_data" / "video" / "vtest_short.avi"


@pytest.fixture(scope="module")
def cv2():
    return pytest.importorskip("cv2")


@pytest.fixture
def folder(tmp_path):
    photos = sorted(IMAGES.glob("*.jpg"))[:4]
    assert photos, f"no sample photos in {IMAGES}"
    for p in photos:
        shutil.copy(p, tmp_path / p.name)
    (tmp_path / "README.txt").write_text("not an image")
    (tmp_path / "sub").mkdir()
    return tmp_path, [p.name for p in photos]


def test_folder_yields_sorted_bytes_and_counts_non_images(folder):
    d, names = folder
    with open_source(str(d)) as src:
        assert src.kind == "folder" and not src.live
        frames = list(src)
        assert src.non_images == 1
        info = src.info()
    assert [f.name for f in frames] == sorted(names)
    assert [f.index for f in frames] == list(range(len(names)))
    for f in frames:
        assert f.error is None and f.data == (d / f.name).read_bytes()
        assert f.capture_ms >= 0 and f.t0_ns > 0
    assert info == {"kind": "folder", "source": str(d), "live": False, "files": len(names), "non_images": 1}


def test_single_image(folder):
    d, names = folder
    with open_source(str(d / names[0])) as src:
        frames = list(src)
    assert src.kind == "image" and len(frames) == 1 and frames[0].data == (d / names[0]).read_bytes()


def test_empty_file_is_a_frame_error_not_a_crash(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"")
    frames = list(open_source(str(tmp_path)))
    assert len(frames) == 1 and frames[0].data is not None and frames[0].error == "a.jpg: cannot read image (empty file)"


def test_empty_and_missing_folders(tmp_path):
    with pytest.raises(SourceError, match="no images in folder"):
        open_source(str(tmp_path))
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(SourceError, match=r"no images in folder \(1 other file"):
        open_source(str(tmp_path))
    with pytest.raises(SourceError, match="no such file or directory"):
        open_source(str(tmp_path / "nope"))


def test_video_frames_are_bgr_and_match_opencv(cv2):
    with open_source(str(VIDEO)) as src:
        assert src.kind == "video" and not src.live
        frames = list(src)
        info = src.info()
    cap = cv2.VideoCapture(str(VIDEO))
    direct = []
    while True:
        ok, img = cap.read()
        if not ok:
            break
        direct.append(img)
    cap.release()
    assert len(frames) == len(direct) == 50
    assert info["width"] == 384 and info["height"] == 288 and info["frame_count"] == 50
    for f, img in zip(frames, direct):
        assert f.order == ColorOrder.BGR and f.data.dtype == np.uint8 and f.data.shape == (288, 384, 3)
        np.testing.assert_array_equal(f.data, img)
    assert [f.index for f in frames] == list(range(50))


def test_bad_videos(tmp_path, cv2):
    with pytest.raises(SourceError, match="no such file or directory"):
        open_source(str(tmp_path / "missing.mp4"))
    fake = tmp_path / "fake.mp4"
    fake.write_text("definitely not a video\n" * 10)
    with pytest.raises(SourceError) as e:
        open_source(str(fake))
    assert "fake.mp4" in str(e.value) and "\n" not in str(e.value)
    other = tmp_path / "data.bin"
    other.write_bytes(bytes(range(256)))
    with pytest.raises(SourceError):
        open_source(str(other))


def test_absent_usb_camera_is_one_line(cv2):
    if Path("/dev/video7").exists():
        pytest.skip("a /dev/video7 exists here")
    with pytest.raises(SourceError) as e:
        open_source("camera:7")
    msg = str(e.value)
    assert msg.startswith("no camera at index 7") and "\n" not in msg


def test_missing_opencv_and_picamera2_give_install_hints(monkeypatch):
    monkeypatch.setitem(sys.modules, "cv2", None)  # makes `import cv2` raise ImportError
    with pytest.raises(SourceError, match="opencv-python-headless"):
        open_source("camera")
    with pytest.raises(SourceError, match="opencv-python-headless"):
        open_source(str(VIDEO))
    monkeypatch.setitem(sys.modules, "picamera2", None)
    with pytest.raises(SourceError, match="picamera2"):
        open_source("picamera")


def test_live_flag_needs_video_or_camera(folder, make_bundle, float_model):
    from click.testing import CliRunner

    from edgepipe.device.cli_run import run

    d, names = folder
    for spec in (d, d / names[0]):
        with pytest.raises(SourceError, match="live replay needs a video file or a camera") as e:
            open_source(str(spec), live=True)
        assert e.value.param == "live" and "--" not in str(e.value)  # the library names no flag...
    res = CliRunner().invoke(run, [str(make_bundle(float_model)), "--source", str(d), "--live"])
    assert res.exit_code == 1  # ...the command puts its own in front
    assert res.output.strip().splitlines()[-1] == "Error: --live: a live replay needs a video file or a camera"


def test_latest_frame_policy_drops_and_counts(cv2):
    """A clip replayed at 5x (50 fps) with a consumer taking ~8 frames/s: every frame is either taken
    (in order, newest first) or counted as dropped, never queued."""
    src = replay_live(str(VIDEO), VideoSource(str(VIDEO), VIDEO), speed=5.0)
    taken = []
    try:
        for f in src:
            taken.append(f.index)
            time.sleep(0.12)
    finally:
        src.close()
    info = src.info()
    assert info["grabbed"] == 50
    assert len(taken) + src.dropped == 50
    assert taken == sorted(set(taken)) and taken[0] <= 5
    assert src.dropped > 10 and info["dropped"] == src.dropped
    assert src.live and src.kind == "video-live"


def test_latest_frame_grabber_error_and_stall():
    def broken():
        raise OSError("device unplugged")

    g = LatestFrame(broken)
    with pytest.raises(SourceError, match="device unplugged"):
        g.take(timeout=5)
    g.stop()

    def stalled():
        time.sleep(0.5)
        return np.zeros((2, 2, 3), np.uint8), 0.0, 0

    g = LatestFrame(stalled)
    with pytest.raises(SourceError, match="no frame arrived"):
        g.take(timeout=0.05)
    g.stop()


@pytest.mark.picamera
def test_picamera_gives_frames():
    with open_source("picamera") as src:
        f = next(iter(src))
    assert f.data.ndim == 3 and f.order == ColorOrder.BGR
