"""The project's sample data: where it lives, installed or not.

Shipped inside the package (``edgepipe.sample_data``, read through
``importlib.resources`` so a wheel works anywhere): real photos, a short real
video clip, the ImageNet class names, a trained Fashion-MNIST CNN and a
labelled subset of its test set. Built on request into the per-user cache
(``$EDGEPIPE_CACHE`` or ``$XDG_CACHE_HOME/edgepipe``): the real pretrained
ImageNet MobileNetV2 as a ``.keras`` file, made by ``edgepipe samples build
mobilenet_v2`` (see ``edgepipe.pipeline.samples_build``).

Nothing here downloads or builds anything: a built sample that is missing
raises ``SampleNotBuiltError``.
"""
from __future__ import annotations

import enum
import gzip
import importlib.resources
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from edgepipe.device.errors import EdgepipeError
from edgepipe.pipeline.cache import default_cache_dir

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
    """Sample data that is missing or cannot be made; the message says what is wrong."""


class SampleNotBuiltError(SampleDataError):
    """A sample that is built on request and has not been built yet (``name`` says which)."""

    def __init__(self, name: str, path: Path):
        super().__init__(f"the sample {name} is not built yet (expected at {path})")
        self.name, self.path = name, path


# ---------------------------------------------------------------- paths


def sample_data_dir() -> Path:
    """The folder of the installed ``edgepipe.sample_data`` package."""
    root = importlib.resources.files("edgepipe.sample_data")
    if not isinstance(root, Path) or not root.is_dir():
        raise SampleDataError(f"the sample data is not a folder on disk ({root}); reinstall edgepipe")
    return root


def cache_dir() -> Path:
    """Where built samples live: ``$EDGEPIPE_CACHE``, else ``$XDG_CACHE_HOME/edgepipe`` (~/.cache)."""
    return default_cache_dir()


def models_cache_dir() -> Path:
    """Built sample models: ``cache_dir()/models``."""
    return cache_dir() / "models"


def sample_images_dir() -> Path:
    """Real photos (opencv-doc examples), for calibration and comparing variants."""
    return sample_data_dir() / "images"


def sample_photos_dir() -> Path:
    """290 real photos from Debian packages (320 px JPEG), a flat folder big enough to split
    into calibration and validation images; per-file licences in ``photos_sources_path()``."""
    return sample_data_dir() / "photos"


def photos_sources_path() -> Path:
    """Tab-separated provenance of every file in ``sample_photos_dir()``: package, version, path, licence."""
    return sample_data_dir() / "photos_sources.tsv"


def sample_video_path() -> Path:
    """A few seconds of real video (opencv-doc's vtest.avi, cut and downscaled)."""
    return sample_data_dir() / "video" / "vtest_short.avi"


def imagenet_labels_path() -> Path:
    """The 1000 ImageNet class names, one a line, in torchvision's index order."""
    return sample_data_dir() / "imagenet_labels.txt"


def sample_models_dir() -> Path:
    """Models shipped with the package (the Fashion-MNIST CNN)."""
    return sample_data_dir() / "models"


def fashion_mnist_model_path() -> Path:
    """The committed Fashion-MNIST CNN (input 28x28x1, pixels / 255, softmax output)."""
    return sample_models_dir() / "fashion_mnist_cnn.keras"


def fashion_mnist_labels_path() -> Path:
    """The 10 Fashion-MNIST class names (folder names of the test subset), index order."""
    return sample_data_dir() / "fashion_mnist" / "labels.txt"


def fashion_mnist_test_dir() -> Path:
    """Labelled test subset as PNGs in ``<class_name>/`` folders (what ``evaluate --data`` reads)."""
    return sample_data_dir() / "fashion_mnist" / "test"


def fashion_mnist_calib_dir() -> Path:
    """Flat folder of Fashion-MNIST TRAINING images for ``edgepipe convert --calib``."""
    return sample_data_dir() / "fashion_mnist" / "calib"


def mobilenet_v2_path() -> Path:
    """Where the built MobileNetV2 lives (whether or not it is built)."""
    return models_cache_dir() / MOBILENET_FILE


def mobilenet_v2_keras() -> Path:
    """Path of the real pretrained ImageNet MobileNetV2 (1.0, 224) as a ``.keras`` file.

    Built by ``edgepipe samples build mobilenet_v2`` into ``cache_dir()/models``;
    raises ``SampleNotBuiltError`` when it is not there. Input: (224, 224, 3)
    float, torchvision normalisation (preset ``imagenet``); output: 1000 softmax
    probabilities, labels in ``imagenet_labels_path()``.
    """
    path = mobilenet_v2_path()
    if not path.is_file():
        raise SampleNotBuiltError("mobilenet_v2", path)
    return path


def ssdlite_person_path() -> Path:
    """The built sample person detector (post-processed .tflite; its folder also holds the raw-head
    model, labels.txt and decoder.json), whether or not it is built."""
    return models_cache_dir() / "ssdlite_person" / "ssdlite_person.tflite"


def reference_search_dirs() -> list:
    """Folders where a float reference model named by a manifest may be found."""
    return [sample_models_dir(), cache_dir(), models_cache_dir()]


# ---------------------------------------------------------------- catalogue


class SampleKind(str, enum.Enum):
    SHIPPED = "shipped"  # inside the package
    BUILT = "built"      # made on request into the cache


@dataclass(frozen=True)
class Sample:
    """One named sample: what it is, where it is, and whether it is there."""

    name: str
    kind: SampleKind
    what: str
    locate: Callable[[], Path]

    @property
    def path(self) -> Path:
        return self.locate()

    @property
    def present(self) -> bool:
        return self.path.exists()


CATALOGUE = (
    Sample("mobilenet_v2", SampleKind.BUILT,
           "ImageNet MobileNetV2 (1.0, 224), torchvision weights, .keras (preset imagenet)", mobilenet_v2_path),
    Sample("ssdlite_person", SampleKind.BUILT,
           "SSDLite MobileNetV2 person detector, float .tflite + raw-head .tflite, labels.txt, decoder.json "
           "(preset mobilenet)", ssdlite_person_path),
    Sample("fashion_mnist", SampleKind.SHIPPED, "Fashion-MNIST CNN, .keras (preset unit)",
           fashion_mnist_model_path),
    Sample("images", SampleKind.SHIPPED, "31 real photos (calibration, comparing variants)", sample_images_dir),
    Sample("photos", SampleKind.SHIPPED,
           "290 real photos, 320 px (animals, landmarks, objects, nature; calibration/validation splits)",
           sample_photos_dir),
    Sample("photos_sources", SampleKind.SHIPPED, "package, licence and credit of every file in photos/",
           photos_sources_path),
    Sample("video", SampleKind.SHIPPED, "5 s of real street video, 384x288", sample_video_path),
    Sample("imagenet_labels", SampleKind.SHIPPED, "the 1000 ImageNet class names", imagenet_labels_path),
    Sample("fashion_mnist_test", SampleKind.SHIPPED, "500 labelled Fashion-MNIST test images (class folders)",
           fashion_mnist_test_dir),
    Sample("fashion_mnist_calib", SampleKind.SHIPPED, "200 Fashion-MNIST training images (flat, --calib)",
           fashion_mnist_calib_dir),
    Sample("fashion_mnist_labels", SampleKind.SHIPPED, "the 10 Fashion-MNIST class names",
           fashion_mnist_labels_path),
)


def sample(name: str) -> Sample:
    """The catalogue entry called ``name``."""
    for s in CATALOGUE:
        if s.name == name:
            return s
    raise SampleDataError(f"no sample called {name!r} (one of {', '.join(s.name for s in CATALOGUE)})")


def sample_path(name: str) -> Path:
    """The path of sample ``name``; raises ``SampleNotBuiltError`` for a built one not built yet."""
    s = sample(name)
    if s.kind is SampleKind.BUILT and not s.present:
        raise SampleNotBuiltError(s.name, s.path)
    return s.path


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
