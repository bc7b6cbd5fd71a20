"""Distillation (quantization-aware fine-tune against the float model) on a tiny seeded model."""
from __future__ import annotations

import json

import numpy as np
import pytest

from edgepipe.pipeline import distill
from edgepipe.pipeline.distill import DistillError, DistillUnavailable, Loss, distill_int8, to_tf_keras_config

needs_toolchain = pytest.mark.skipif(bool(distill.missing_dependencies()),
                                     reason="tf-keras / tensorflow-model-optimization not installed")


def _tiny(tf, softmax: bool = True):
    """Inverted-residual-like block: padding, conv+BN+ReLU6, depthwise+BN, residual add, dropout, dense."""
    import keras

    keras.utils.set_random_seed(1)
    L = keras.layers
    inp = keras.Input((16, 16, 3), name="input")
    x = L.ZeroPadding2D(1)(inp)
    x = L.Conv2D(8, 3, strides=2, use_bias=False)(x)
    x = L.BatchNormalization(epsilon=1e-5)(x)
    x = L.ReLU(6.0)(x)
    y = L.ZeroPadding2D(1)(x)
    y = L.DepthwiseConv2D(3, use_bias=False)(y)
    y = L.BatchNormalization()(y)
    y = L.Conv2D(8, 1)(y)
    x = L.Add()([x, y])
    x = L.GlobalAveragePooling2D()(x)
    x = L.Dropout(0.2)(x)
    x = L.Dense(10)(x)
    if softmax:
        x = L.Softmax()(x)
    model = keras.Model(inp, x, name="tiny")
    rng = np.random.default_rng(1)
    for layer in model.layers:  # non-trivial BN statistics so folding is really exercised
        if isinstance(layer, L.BatchNormalization):
            g, b, m, v = layer.get_weights()
            layer.set_weights([1 + 0.3 * rng.standard_normal(g.shape), 0.2 * rng.standard_normal(b.shape),
                               0.5 * rng.standard_normal(m.shape), rng.uniform(0.5, 2.0, v.shape)])
    return model


@pytest.fixture(scope="module")
def tiny_keras(tf, tmp_path_factory):
    path = tmp_path_factory.mktemp("distill") / "tiny.keras"
    _tiny(tf).save(path)
    return path


def _images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 1, (n, 16, 16, 3)).astype(np.float32)


def test_config_becomes_keras2_inbound_nodes(tf):
    cfg = to_tf_keras_config(_tiny(tf).get_config())
    layers = {ly["class_name"]: ly for ly in cfg["config"]["layers"]}
    assert list(layers["InputLayer"]["config"]["batch_input_shape"]) == [None, 16, 16, 3]
    add = layers["Add"]["inbound_nodes"]
    assert len(add) == 1 and [ref[1:3] for ref in add[0]] == [[0, 0], [0, 0]] and len(add[0]) == 2
    assert all(isinstance(ly["config"].get("dtype", "float32"), str) for ly in cfg["config"]["layers"])
    json.dumps(cfg)  # plain data for the child


def test_nested_model_is_refused(tf):
    import keras

    inner = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    inp = keras.Input((4,))
    outer = keras.Model(inp, inner(inp))
    with pytest.raises(DistillError, match="nested model"):
        to_tf_keras_config(outer.get_config())


def test_bad_arguments_are_one_line_errors(tiny_keras):
    with pytest.raises(DistillError, match="steps must be"):
        distill_int8(tiny_keras, _images(4, 0), _images(4, 1), steps=0)
    with pytest.raises(DistillError, match=r"calibration images have shape \(8, 8, 3\)"):
        distill_int8(tiny_keras, np.zeros((4, 8, 8, 3), np.float32), _images(4, 1), steps=1)


def test_missing_toolchain_names_the_install(tiny_keras, tmp_path, monkeypatch):
    """A tf_keras that cannot be imported (shadowed on the child's path) -> DistillUnavailable naming the install command."""
    fake = tmp_path / "shadow" / "tf_keras"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('tf_keras blocked by the test')\n")
    monkeypatch.setenv("PYTHONPATH", str(fake.parent))
    with pytest.raises(DistillUnavailable) as info:
        distill_int8(tiny_keras, _images(8, 0), _images(4, 1), steps=1, timeout_s=300)
    msg = str(info.value)
    assert "\n" not in msg and "tf-keras" in msg and "pip install --no-deps" in msg


def test_missing_toolchain_in_this_interpreter(monkeypatch):
    monkeypatch.setattr(distill.importlib.util, "find_spec",
                        lambda name: None if name == "tensorflow_model_optimization" else object())
    with pytest.raises(DistillUnavailable, match="tensorflow-model-optimization .*pip install --no-deps 'tf-keras"):
        distill_int8("unused.keras", _images(1, 0), _images(1, 1))


def test_worker_failure_is_one_line_with_log(tiny_keras, tmp_path, monkeypatch):
    """A worker that dies (here: a broken tensorflow_model_optimization import inside the run) -> DistillError."""
    fake = tmp_path / "shadow" / "tensorflow_model_optimization"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("import sys\nif 'tensorflow' in sys.modules:\n"
                                      "    raise RuntimeError('toolchain broke mid-run')\n")
    monkeypatch.setenv("PYTHONPATH", str(fake.parent))
    with pytest.raises(DistillError) as info:
        distill_int8(tiny_keras, _images(8, 0), _images(4, 1), steps=1, timeout_s=300)
    assert not isinstance(info.value, DistillUnavailable)
    assert "\n" not in str(info.value) and "log:" in str(info.value)


@pytest.mark.slow
@needs_toolchain
def test_distills_tiny_model_end_to_end(tiny_keras):
    from edgepipe.pipeline.model_run import run_tflite

    events = []
    calib, val = _images(32, 0), _images(16, 1)
    result = distill_int8(tiny_keras, calib, val, steps=6, batch=4, lr=1e-3, on_progress=events.append,
                          timeout_s=900)
    assert result.tflite[4:8] == b"TFL3"
    assert result.loss is Loss.KL  # softmax outputs
    assert result.folded_bn == 2 and result.steps == 6
    assert 0.0 <= result.after.agreement <= 1.0 and result.after.snr_db > 5.0
    assert result.before is None
    out = run_tflite(result.tflite, val)
    assert out.shape == (16, 10)
    trained = [e for e in events if e.phase == "train"]
    assert trained and trained[-1].step == 6 and trained[-1].steps == 6 and trained[-1].loss is not None
    assert [e.phase for e in events][0] == "prepare" and events[-1].phase == "evaluate"
    d = result.to_dict()
    assert d["versions"]["tf_keras"].startswith("2.") and d["after"]["agreement"] == round(result.after.agreement, 4)


@needs_toolchain
def test_timeout_kills_the_worker(tiny_keras):
    with pytest.raises(DistillError, match="did not finish within 1 s"):
        distill_int8(tiny_keras, _images(8, 0), _images(4, 1), steps=1, timeout_s=1)


def _convert(*args):
    from click.testing import CliRunner

    from edgepipe.pipeline.cli import main

    return CliRunner().invoke(main, ["convert", *map(str, args)])


def test_distill_steps_errors_are_one_line_and_come_before_converting(tmp_path, photos, monkeypatch):
    r = _convert("model.keras", "--recipes", "fp32", "--calib", photos, "--out", tmp_path, "--distill-steps", "5")
    assert r.exit_code != 0
    assert r.output.strip().splitlines()[-1] == "Error: --distill-steps: needs the int8 recipe in --recipes"
    monkeypatch.setattr(distill, "missing_dependencies", lambda: ["tf-keras"])
    r = _convert("model.keras", "--recipes", "int8", "--calib", photos, "--out", tmp_path, "--distill-steps", "5")
    last = r.output.strip().splitlines()[-1]
    assert r.exit_code != 0 and last.startswith("Error: --distill-steps: distillation needs tf-keras")
    assert "pip install --no-deps" in last and "Traceback" not in r.output
    assert not any(tmp_path.iterdir())


@needs_toolchain
@pytest.mark.slow
def test_convert_distill_steps_records_the_fine_tune(tmp_path):
    from edgepipe.pipeline import samples

    calib = samples.fashion_mnist_test_dir().parent / "calib"
    r = _convert(samples.fashion_mnist_model_path(), "--recipes", "int8", "--calib", calib, "--calib-count", "32",
                 "--preprocess", "unit", "--val", samples.fashion_mnist_test_dir(), "--distill-steps", "4",
                 "--out", tmp_path, "--no-cache", "--no-edgetpu")
    assert r.exit_code == 0, r.output
    manifest = json.loads(next(tmp_path.glob("*int8*/manifest.json")).read_text())
    block = manifest["extra"]["distill"]
    assert block["steps"] == 4 and block["measured_on"] == "validation" and block["kept"] in ("distilled", "int8")
    assert 0 <= block["after"]["agreement"] <= 1 and 0 <= block["before"]["agreement"] <= 1
    won = (block["after"]["agreement"], block["after"]["snr_db"]) > (block["before"]["agreement"],
                                                                     block["before"]["snr_db"])
    assert (block["kept"] == "distilled") == won
