"""Pi camera streams scaled by the ISP: the configuration asked of picamera2 (a fake camera class with
picamera2's method names) and the YUV420 -> RGB conversion against the BT.601 full-range formula."""
from __future__ import annotations

import sys
import time
import types

import numpy as np
import pytest
from PIL import Image

from edgepipe.device.bundle import ColorOrder, Preprocess, ResizeMode
from edgepipe.device.picam import model_stream_size, plan_streams, yuv420_to_rgb
from edgepipe.device.preprocess import crop_box, load_image, reference_preprocess
from edgepipe.device.sources import SourceError, open_source

MOBILENET = Preprocess(224, 224, mean=(127.5,) * 3, std=(127.5,) * 3)
IMAGENET = Preprocess(224, 224, resize=ResizeMode.CENTER_CROP, crop_fraction=0.875,
                      mean=(123.675, 116.28, 103.53), std=(58.395, 57.12, 57.375))


def bt601_full_range(y: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Reference: JFIF/sYCC YCbCr -> RGB in float64, chroma repeated over each 2x2 block, rounded, clipped."""
    up = lambda c: np.repeat(np.repeat(c.astype(np.float64) - 128.0, 2, axis=0), 2, axis=1)  # noqa: E731
    cb, cr, yy = up(u), up(v), y.astype(np.float64)
    rgb = np.stack([yy + 1.402 * cr, yy - 0.344136 * cb - 0.714136 * cr, yy + 1.772 * cb], axis=-1)
    return np.clip(np.round(rgb), 0, 255).astype(np.uint8)


def i420(y: np.ndarray, u: np.ndarray, v: np.ndarray, stride: int) -> np.ndarray:
    """Planes packed the way picamera2 hands a YUV420 stream over: (h * 3 / 2, stride) rows, padded."""
    h, w = y.shape
    flat = np.full(stride * h * 3 // 2, 17, dtype=np.uint8)  # padding bytes must be ignored
    flat[: stride * h].reshape(h, stride)[:, :w] = y
    cs, ch = stride // 2, h // 2
    flat[stride * h: stride * h + cs * ch].reshape(ch, cs)[:, : w // 2] = u
    flat[stride * h + cs * ch:].reshape(ch, cs)[:, : w // 2] = v
    return flat.reshape(h * 3 // 2, stride)


def planes(w: int, h: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, (h, w), dtype=np.uint8), rng.integers(0, 256, (h // 2, w // 2), dtype=np.uint8),
            rng.integers(0, 256, (h // 2, w // 2), dtype=np.uint8))


@pytest.mark.parametrize("w,h,stride", [(224, 224, 256), (224, 224, 224), (342, 256, 384), (6, 4, 8)])
def test_yuv420_conversion_matches_bt601_full_range(w, h, stride):
    y, u, v = planes(w, h)
    got = yuv420_to_rgb(i420(y, u, v, stride), w, h)
    want = bt601_full_range(y, u, v)
    assert got.shape == (h, w, 3) and got.dtype == np.uint8
    assert int(np.abs(got.astype(int) - want).max()) <= 1
    assert np.mean(got != want) < 0.01  # rounding differs on a few pixels only


def test_yuv420_grey_and_saturated_colours():
    y = np.array([[0, 255], [128, 128]], np.uint8)
    grey = yuv420_to_rgb(i420(y, np.full((1, 1), 128, np.uint8), np.full((1, 1), 128, np.uint8), 2), 2, 2)
    assert grey[:, :, 0].tolist() == y.tolist() and (grey == grey[:, :, :1]).all()
    red = yuv420_to_rgb(i420(np.full((2, 2), 76, np.uint8), np.full((1, 1), 85, np.uint8),
                             np.full((1, 1), 255, np.uint8), 2), 2, 2)
    assert red[0, 0].tolist() == [254, 0, 0]  # JPEG's YCbCr of pure red, one level short by the formula


def test_yuv420_bad_buffers_raise():
    with pytest.raises(ValueError, match="even"):
        yuv420_to_rgb(np.zeros((6, 4), np.uint8), 3, 4)
    with pytest.raises(ValueError, match="does not hold"):
        yuv420_to_rgb(np.zeros((6, 3), np.uint8), 4, 4)


def test_stream_sizes_cover_the_models_region():
    assert model_stream_size(MOBILENET) == (224, 224)
    w, h = model_stream_size(IMAGENET, 4 / 3)
    assert (w, h) == (342, 256)
    x0, y0, x1, y1 = crop_box(w, h, IMAGENET)
    assert x1 - x0 >= 224 and y1 - y0 >= 224 and y1 - y0 < 226  # just enough, no more
    letter = Preprocess(320, 320, resize=ResizeMode.LETTERBOX)
    assert model_stream_size(letter, 16 / 9) == (320, 180)
    assert plan_streams(None, False).model == (640, 480)
    big = Preprocess(640, 640)
    assert plan_streams(big, True).display is None  # lores may not exceed main: the model gets main


class FakePicamera2:
    """picamera2.Picamera2's surface used by edgepipe; frames are synthetic but laid out like libcamera's."""

    instances: list = []
    sensor_resolution = (4056, 3040)

    def __init__(self, index: int = 0):
        self.index, self.config, self.calls, self.captured = index, None, [], []
        FakePicamera2.instances.append(self)

    def create_preview_configuration(self, main=None, lores=None, **kw):
        self.calls.append("create_preview_configuration")
        return {"main": dict(main or {}), "lores": dict(lores) if lores else None}

    def configure(self, config):
        self.calls.append("configure")
        self.config = config

    def camera_configuration(self):
        return self.config

    def start(self):
        self.calls.append("start")

    def stop(self):
        self.calls.append("stop")

    def close(self):
        self.calls.append("close")

    def _main(self):
        w, h = self.config["main"]["size"]
        return np.full((h, w, 3), (10, 20, 30), np.uint8)

    def capture_array(self, name="main"):
        assert name == "main"
        time.sleep(0.005)  # a camera's frame period, so the grabber thread does not spin
        return self._main()

    def capture_arrays(self, names):
        assert names == ["main", "lores"]
        time.sleep(0.005)
        w, h = self.config["lores"]["size"]
        self.captured.append(planes(w, h, seed=len(self.captured)))  # frame i: self.captured[i]
        return [self._main(), i420(*self.captured[-1], stride=-(-w // 64) * 64)], {}


@pytest.fixture
def fake_picamera2(monkeypatch):
    FakePicamera2.instances = []
    monkeypatch.setitem(sys.modules, "picamera2", types.SimpleNamespace(Picamera2=FakePicamera2))
    return FakePicamera2


def test_picamera_asks_the_isp_for_the_model_size(fake_picamera2):
    with open_source("picamera", model=MOBILENET) as src:
        f = next(iter(src))
        info = src.info()
    cam = fake_picamera2.instances[0]
    assert cam.config == {"main": {"size": (224, 224), "format": "BGR888"}, "lores": None}  # R, G, B in memory
    assert f.data.shape == (224, 224, 3) and f.order == ColorOrder.RGB and f.display is None
    assert info["model_stream"] == [224, 224] and "display_stream" not in info
    assert cam.calls[-2:] == ["stop", "close"]


def test_picamera_with_annotation_gets_lores_yuv_and_a_display_frame(fake_picamera2):
    with open_source("picamera:1", model=IMAGENET, display=True) as src:
        f = next(iter(src))
    cam = fake_picamera2.instances[0]
    assert cam.index == 1
    assert cam.config["main"] == {"size": (640, 480), "format": "RGB888"}
    assert cam.config["lores"] == {"size": (342, 256), "format": "YUV420"}
    assert f.order == ColorOrder.RGB and f.display.shape == (480, 640, 3)
    rgb = np.asarray(f.data)
    assert rgb.shape == (256, 342, 3)
    assert int(np.abs(rgb.astype(int) - bt601_full_range(*cam.captured[f.index])).max()) <= 1
    # The frame preprocesses like any image: the fast path equals the reference definition.
    x = load_image(f.data, IMAGENET, order=f.order)
    assert x.shape == (224, 224, 3) and np.array_equal(x, reference_preprocess(rgb, IMAGENET))


def test_picamera_without_a_model_keeps_640x480(fake_picamera2):
    with open_source("picamera") as src:
        f = next(iter(src))
    assert fake_picamera2.instances[0].config["main"] == {"size": (640, 480), "format": "RGB888"}
    assert f.data.shape == (480, 640, 3) and f.order == ColorOrder.BGR


def test_picamera_failure_is_one_line(fake_picamera2, monkeypatch):
    def broken(self, config):
        raise RuntimeError("Camera frontend has timed out!\nmore detail")
    monkeypatch.setattr(fake_picamera2, "configure", broken)
    with pytest.raises(SourceError) as e:
        open_source("picamera", model=MOBILENET)
    assert str(e.value).startswith("no usable Raspberry Pi camera 0 (Camera frontend has timed out!)")
    assert "\n" not in str(e.value)


def test_isp_frame_preprocesses_like_an_image():
    img = Image.fromarray(bt601_full_range(*planes(224, 224)))
    assert np.array_equal(load_image(img, MOBILENET), reference_preprocess(np.asarray(img), MOBILENET))


def test_edgerun_run_on_picamera_asks_for_the_models_size(fake_picamera2, make_bundle, float_model):
    """run_source hands the bundle's preprocessing to the Pi camera: frames arrive at the model's size."""
    from edgepipe.device.bundle import load_bundle
    from edgepipe.device.runner import run_source

    bundle = make_bundle(float_model, name="tinyf", labels=["a", "b", "c"])
    pre = load_bundle(bundle).manifest.preprocess
    rep = run_source(bundle, "picamera", max_frames=3)
    cam = fake_picamera2.instances[0]
    assert cam.config["main"] == {"size": model_stream_size(pre), "format": "BGR888"}
    assert rep["throughput"]["frames"] == 3 and not rep["errors"]
    assert rep["input"]["model_stream"] == list(model_stream_size(pre))
