"""Host-side fixtures: tiny Keras models built once per session, real photos."""
from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PHOTOS = REPO / "sample_data" / "images"


@pytest.fixture(scope="session")
def tf():
    from edgepipe.pipeline.tfenv import import_tf

    return import_tf()


@pytest.fixture(scope="session")
def photos() -> Path:
    """Real photos committed in sample_data (see sample_data/README.md)."""
    if not PHOTOS.is_dir() or not any(PHOTOS.iterdir()):
        pytest.fail(f"{PHOTOS} is missing: the sample photos are part of the repository")
    return PHOTOS


def _build_cnn(tf, input_shape=(32, 32, 3), rescale=False):
    import keras

    keras.utils.set_random_seed(0)
    layers = [keras.Input(input_shape)]
    if rescale:
        layers.append(keras.layers.Rescaling(1 / 255.0))
    layers += [
        keras.layers.Conv2D(16, 3, strides=2, padding="same", activation="relu"),
        keras.layers.Conv2D(32, 3, padding="same", activation="relu"),
        keras.layers.MaxPooling2D(),
        keras.layers.Conv2D(64, 3, padding="same", activation="relu"),
        keras.layers.Conv2D(128, 3, padding="same", activation="relu"),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(10),
    ]
    return keras.Sequential(layers)


@pytest.fixture(scope="session")
def cnn_keras(tf, tmp_path_factory) -> Path:
    """A small RGB CNN (~100k params, so weights dominate the file size)."""
    path = tmp_path_factory.mktemp("models") / "small_cnn.keras"
    _build_cnn(tf).save(path)
    return path


@pytest.fixture(scope="session")
def gray_keras(tf, tmp_path_factory) -> Path:
    """A grayscale model that rescales its own input (28x28x1, like Fashion-MNIST)."""
    path = tmp_path_factory.mktemp("models") / "gray_cnn.keras"
    _build_cnn(tf, (28, 28, 1), rescale=True).save(path)
    return path


@pytest.fixture(scope="session")
def dense_keras(tf, tmp_path_factory) -> Path:
    """A model whose input is not an image (for the calibration error)."""
    import keras

    keras.utils.set_random_seed(0)
    m = keras.Sequential([keras.Input((10,)), keras.layers.Dense(4)])
    path = tmp_path_factory.mktemp("models") / "dense.keras"
    m.save(path)
    return path


@pytest.fixture(scope="session")
def cnn_h5(tf, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("models") / "small_cnn.h5"
    _build_cnn(tf).save(path)
    return path


@pytest.fixture(scope="session")
def cnn_savedmodel(tf, tmp_path_factory) -> Path:
    from edgepipe.pipeline.tfenv import captured_output

    path = tmp_path_factory.mktemp("models") / "small_cnn_savedmodel"
    with captured_output():
        _build_cnn(tf).export(str(path))
    return path


@pytest.fixture
def cache_dir(tmp_path) -> Path:
    return tmp_path / "cache"
