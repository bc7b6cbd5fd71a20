"""Preprocessing: the fast path against the reference, on real photos.

"Identical" here means bit-identical, for every input (JPEG, PNG, arrays) on
every CPU: after decoding, the definition is integer arithmetic (PIL's 8-bit
fixed-point resize) plus a float64 normalization table, so there is no
floating-point sum whose order or fusing (aarch64 FMA) could differ. For JPEG
paths both implementations decode at the same DCT scale (the only place the
fast path differs from a full decode), which is tested separately: the scale
is the largest that keeps the resized region at least the model size, and the
scaled decode stays close to a full decode.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edgepipe.device.bundle import ColorOrder, Preprocess, ResizeMode
from edgepipe.device.preprocess import (
    ImageError, crop_box, jpeg_draft_scale, list_images, load_image, reference_preprocess, to_model_input)

REPO = Path(__file__).resolve().parents[2]
SAMPLES = REPO / "sample_data" / "images"


def assert_same(fast: np.ndarray, ref: np.ndarray, spec: Preprocess, what: str = "") -> None:
    """The definition of "identical" in the module docstring."""
    assert fast.shape == ref.shape and fast.dtype == ref.dtype == np.float32, what
    bad = int(np.count_nonzero(fast != ref))
    assert bad == 0, f"{what}: {bad} values differ, max {np.abs(fast - ref).max()}"


MOBILENET = Preprocess(224, 224, mean=(127.5,) * 3, std=(127.5,) * 3)
CAFFE_BGR = Preprocess(224, 224, color=ColorOrder.BGR, mean=(103.939, 116.779, 123.68), std=(1.0, 1.0, 1.0))
GRAY = Preprocess(28, 28, color=ColorOrder.GRAY, mean=(0.0,), std=(255.0,))
TORCH_CROP = Preprocess(224, 224, resize=ResizeMode.CENTER_CROP, crop_fraction=0.875,
                        mean=(123.675, 116.28, 103.53), std=(58.395, 57.12, 57.375))
GRAY_CROP = Preprocess(32, 48, color=ColorOrder.GRAY, resize=ResizeMode.CENTER_CROP, crop_fraction=0.9,
                       mean=(127.5,), std=(127.5,))
BGR_CROP_NCHW = Preprocess(96, 160, color=ColorOrder.BGR, resize=ResizeMode.CENTER_CROP, crop_fraction=0.8,
                           layout="nchw", mean=(0.0,), std=(1.0,))
SPECS = {"rgb-stretch": MOBILENET, "bgr-stretch": CAFFE_BGR, "gray-stretch": GRAY,
         "rgb-crop": TORCH_CROP, "gray-crop": GRAY_CROP, "bgr-crop": BGR_CROP_NCHW}


def sample_photos(n: int) -> list:
    photos = sorted(SAMPLES.glob("*.jpg"))
    if len(photos) < n:
        pytest.skip(f"needs {n} photos in {SAMPLES}")
    # Spread over the set: different sizes, content and chroma.
    step = max(1, len(photos) // n)
    return photos[::step][:n]


def _small(path: Path, mode: str) -> Image.Image:
    """A real photo at most 320 px wide: plenty for 224x224 models, light under emulation."""
    img = Image.open(path).convert(mode)
    if img.width > 320:
        img = img.resize((320, round(img.height * 320 / img.width)), Image.Resampling.LANCZOS)
    return img


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Real photos as JPEG (originals and one upscaled to 1280x720), RGB/gray/RGBA PNG, and an RGB array."""
    d = tmp_path_factory.mktemp("photos")
    src = sample_photos(3)
    out = {"jpeg": list(src[:2])}
    big = d / "big.jpg"
    Image.open(src[0]).convert("RGB").resize((1280, 720), Image.Resampling.BICUBIC).save(big, quality=90)
    out["jpeg-720p"] = [big]
    out["png"] = []
    for name, p, mode in (("rgb.png", src[0], "RGB"), ("gray.png", src[1], "L"), ("rgba.png", src[2], "RGBA")):
        _small(p, mode).save(d / name, compress_level=1)
        out["png"].append(d / name)
    out["array"] = np.asarray(_small(src[1], "RGB"))
    return out


@pytest.mark.parametrize("kind", ["jpeg", "jpeg-720p", "png"])
@pytest.mark.parametrize("name", sorted(SPECS))
def test_fast_path_matches_reference_on_files(photos, kind, name):
    spec = SPECS[name]
    for path in photos[kind]:
        fast = load_image(path, spec)
        ref = reference_preprocess(path, spec)
        assert fast.dtype == np.float32 and fast.shape == (spec.height, spec.width, spec.channels)
        assert_same(fast, ref, spec, f"{path.name} {name}")


@pytest.mark.parametrize("name", sorted(SPECS))
def test_fast_path_matches_reference_on_arrays(photos, name):
    spec = SPECS[name]
    rgb = photos["array"]
    bgr = np.ascontiguousarray(rgb[:, :, ::-1])  # what OpenCV hands us
    gray = rgb[:, :, 1].copy()
    for arr, order in ((rgb, "rgb"), (bgr, "bgr"), (gray, "rgb"), (gray[:, :, None], "rgb")):
        fast = load_image(arr, spec, order=order)
        assert_same(fast, reference_preprocess(arr, spec, order=order), spec, f"{arr.shape} {order}")
    # A BGR frame declared as BGR is the same picture as the RGB array.
    np.testing.assert_array_equal(load_image(bgr, spec, order="bgr"), load_image(rgb, spec))
    # ... and the same as a PIL image of those pixels.
    np.testing.assert_array_equal(load_image(Image.fromarray(rgb), spec), load_image(rgb, spec))


@pytest.mark.parametrize("interp", ["nearest", "bicubic", "box", "lanczos"])
def test_other_filters_match_reference(photos, interp):
    spec = Preprocess(120, 100, resize=ResizeMode.CENTER_CROP, crop_fraction=0.7, interpolation=interp,
                      mean=(127.5,), std=(127.5,))
    for path in photos["jpeg"][:1] + photos["png"][:1]:
        assert_same(load_image(path, spec), reference_preprocess(path, spec), spec, f"{path.name} {interp}")


def test_bgr_and_gray_channels_are_what_they_say(photos):
    path = photos["png"][0]
    raw = Preprocess(224, 224, mean=(0.0,), std=(1.0,))
    rgb = load_image(path, raw)
    bgr = load_image(path, Preprocess(224, 224, color=ColorOrder.BGR, mean=(0.0,), std=(1.0,)))
    np.testing.assert_array_equal(bgr, rgb[:, :, ::-1])
    gray = load_image(path, Preprocess(224, 224, color=ColorOrder.GRAY, mean=(0.0,), std=(1.0,)))
    # Gray is PIL's 8-bit luma before the 8-bit resize: within the three roundings (< 2 levels)
    # of the luma of the resized colour picture, and about equal on average.
    luma = rgb @ np.array([0.299, 0.587, 0.114])
    assert gray.shape == (224, 224, 1) and np.abs(gray[:, :, 0] - luma).max() < 2.0
    assert abs(float(np.mean(gray[:, :, 0] - luma))) < 0.25
    # Per-channel mean/std are applied in the model's channel order.
    caffe = load_image(path, CAFFE_BGR)
    np.testing.assert_allclose(caffe, bgr - np.array([103.939, 116.779, 123.68], dtype=np.float32), atol=2e-5)


def test_jpeg_draft_scale_is_largest_keeping_target_size():
    assert jpeg_draft_scale(1280, 720, MOBILENET) == 2       # 360 >= 224, 180 < 224
    assert jpeg_draft_scale(1920, 1080, MOBILENET) == 4      # 270 >= 224
    assert jpeg_draft_scale(4000, 3000, MOBILENET) == 8
    assert jpeg_draft_scale(512, 384, MOBILENET) == 1
    assert jpeg_draft_scale(1280, 720, GRAY) == 8
    # Center-crop: relative to the crop (630 px of 720), not the frame.
    assert crop_box(1280, 720, TORCH_CROP) == (325.0, 45.0, 955.0, 675.0)
    assert jpeg_draft_scale(1280, 720, TORCH_CROP) == 2
    assert jpeg_draft_scale(1024, 1024, Preprocess(224, 224, resize=ResizeMode.CENTER_CROP,
                                                   crop_fraction=0.5)) == 2   # 512/2 = 256 >= 224
    for w, h in ((1280, 720), (1920, 1080), (1000, 999), (4000, 3000), (300, 250)):
        for spec in (MOBILENET, TORCH_CROP, GRAY_CROP, BGR_CROP_NCHW):
            s = jpeg_draft_scale(w, h, spec)
            x0, y0, x1, y1 = crop_box(w, h, spec)
            # s = 1 when even the full-size region is smaller (upscaling).
            assert s == 1 or ((x1 - x0) / s >= spec.width and (y1 - y0) / s >= spec.height)
            if s < 8:
                assert (x1 - x0) / (2 * s) < spec.width or (y1 - y0) / (2 * s) < spec.height


def test_draft_decode_is_used_and_stays_close_to_a_full_decode(photos):
    path = photos["jpeg-720p"][0]
    for spec in (MOBILENET, TORCH_CROP):
        assert jpeg_draft_scale(1280, 720, spec) == 2
        fast = load_image(path, spec)
        full = reference_preprocess(Image.open(path), spec)  # PIL input: full-size decode
        levels = np.abs(fast - full) * np.asarray(spec.std, dtype=np.float32)
        # Different (DCT-scaled) decode: not bit-equal, but the same picture, aligned.
        assert levels.max() > 0
        assert levels.mean() < 2.0, levels.mean()
    # A JPEG already near the target size decodes at full size: exactly the full-decode result.
    small = photos["jpeg"][0]
    w, h = Image.open(small).size
    spec = Preprocess(h // 2 + 1, w // 2 + 1, mean=(127.5,), std=(127.5,))
    assert jpeg_draft_scale(w, h, spec) == 1
    assert_same(load_image(small, spec), reference_preprocess(Image.open(small), spec), spec, small.name)


def test_identity_resize_is_lossless(photos):
    path = photos["png"][0]
    w, h = Image.open(path).size
    spec = Preprocess(h, w, mean=(0.0,), std=(1.0,))
    np.testing.assert_array_equal(load_image(path, spec), np.asarray(Image.open(path), dtype=np.float32))


def test_file_objects_and_bytes(photos):
    path = photos["jpeg"][1]
    data = Path(path).read_bytes()
    np.testing.assert_array_equal(load_image(io.BytesIO(data), MOBILENET), load_image(path, MOBILENET))


class _Q:
    """The runtime's TensorSpec quantize contract, for layout tests without a runtime."""

    def __init__(self, dtype, scale, zp):
        self.dtype, self.scale, self.zero_point, self.quantized = dtype, scale, zp, True

    def quantize(self, x):
        info = np.iinfo(self.dtype)
        return np.clip(np.rint(x / self.scale) + self.zero_point, info.min, info.max).astype(self.dtype)


def test_to_model_input_layout_and_quantization(photos):
    hwc = load_image(photos["jpeg"][0], BGR_CROP_NCHW)
    x = to_model_input(hwc, BGR_CROP_NCHW)
    assert x.shape == (1, 3, 96, 160) and x.flags.c_contiguous
    np.testing.assert_array_equal(x[0, 2], hwc[:, :, 2])
    m = load_image(photos["jpeg"][0], MOBILENET)
    q = to_model_input(m, MOBILENET, _Q("int8", 1 / 128, 0))
    assert q.dtype == np.int8 and q.shape == (1, 224, 224, 3)
    assert q.min() >= -128 and q.max() <= 127
    np.testing.assert_array_equal(q[0], np.clip(np.rint(m * 128), -128, 127).astype(np.int8))


def test_runtime_tensorspec_quantizes_like_the_contract(photos):
    runtime = pytest.importorskip("edgepipe.device.runtime")
    spec = runtime.TensorSpec(index=0, name="x", shape=(1, 224, 224, 3), dtype="uint8", scale=1 / 127.5,
                              zero_point=128)
    m = load_image(photos["jpeg"][0], MOBILENET)
    q = to_model_input(m, MOBILENET, spec)
    assert q.dtype == np.uint8
    np.testing.assert_array_equal(q, _Q("uint8", 1 / 127.5, 128).quantize(m[None]))


def test_list_images_sorted_and_counts_skipped(tmp_path):
    src = sample_photos(2)
    for name in ("b.JPG", "a.jpeg", "c.png"):
        (tmp_path / name).write_bytes(Path(src[0]).read_bytes())
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / ".DS_Store").write_bytes(b"\0\0")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "d.jpg").write_bytes(Path(src[1]).read_bytes())
    paths, skipped = list_images(tmp_path)
    assert [p.name for p in paths] == ["a.jpeg", "b.JPG", "c.png"]
    assert skipped == 2
    assert list_images(tmp_path / "sub") == ([tmp_path / "sub" / "d.jpg"], 0)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert list_images(empty) == ([], 0)
    with pytest.raises(FileNotFoundError):
        list_images(tmp_path / "missing")
    with pytest.raises(NotADirectoryError):
        list_images(tmp_path / "notes.txt")


def test_unreadable_images_raise_one_line_image_error(tmp_path):
    src = Path(sample_photos(1)[0]).read_bytes()
    cases = {"text.jpg": b"this is not an image\n", "empty.png": b"",
             "truncated.jpg": src[: len(src) // 3]}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ImageError) as e:
            load_image(tmp_path / name, MOBILENET)
        assert name in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ImageError):
        load_image(tmp_path / "missing.jpg", MOBILENET)


def test_bad_arrays_and_specs():
    with pytest.raises(ImageError, match="uint8"):
        load_image(np.zeros((10, 10, 3), np.float32), MOBILENET)
    with pytest.raises(ImageError, match="shape"):
        load_image(np.zeros((10, 10, 2), np.uint8), MOBILENET)
    arr = np.zeros((10, 10, 3), np.uint8)
    with pytest.raises(ImageError, match="mean"):
        load_image(arr, Preprocess(4, 4, mean=(1.0, 2.0), std=(1.0,)))
    with pytest.raises(ImageError, match="interpolation"):
        load_image(arr, Preprocess(4, 4, interpolation="magic"))
    with pytest.raises(ImageError, match="crop_fraction"):
        load_image(arr, Preprocess(4, 4, resize=ResizeMode.CENTER_CROP, crop_fraction=1.5))
    # RGBA arrays drop alpha; a 3-value equal mean serves a gray model.
    rgba = np.dstack([arr + 7, np.full((10, 10), 200, np.uint8)])
    assert np.all(load_image(rgba, Preprocess(4, 4, mean=(0.0,), std=(1.0,))) == 7.0)
    assert load_image(arr, Preprocess(4, 4, color=ColorOrder.GRAY, mean=(5.0,) * 3, std=(1.0,) * 3)).shape == (4, 4, 1)
