"""edgepipe convert: every recipe on tiny models, parity with the float model on real photos, cache."""
from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import numpy as np
import pytest

from edgepipe.device.bundle import load_bundle
from edgepipe.device.preprocess import list_images, load_image
from edgepipe.device.runtime import load_model
from edgepipe.pipeline.convert import ConvertRequest, convert_model
from edgepipe.pipeline.preprocessing import PreprocessRequest
from edgepipe.pipeline.recipes import RECIPES, parse_recipes

pytestmark = pytest.mark.host
SCHEMA = json.loads((Path(__file__).resolve().parents[2] / "device/schemas/bundle.schema.json").read_text())


@pytest.fixture(scope="module")
def all_bundles(cnn_keras, photos, tmp_path_factory):
    out = tmp_path_factory.mktemp("bundles")
    cache = tmp_path_factory.mktemp("cache")
    req = ConvertRequest(model=cnn_keras, recipes=parse_recipes("all"), out_dir=out, calib_dir=photos,
                         calib_count=16, preprocess=PreprocessRequest(preset="mobilenet"), cache_dir=cache)
    results = convert_model(req)
    return req, results


def _float_reference(keras_path, batch):
    import keras

    return keras.models.load_model(keras_path, compile=False).predict(batch, verbose=0)


def test_every_recipe_converts_and_runs_through_the_device_runtime(all_bundles, photos):
    req, results = all_bundles
    assert [r.recipe for r in results] == list(RECIPES)
    assert all(r.error is None for r in results)
    img = None
    for r in results:
        bundle = load_bundle(r.bundle)  # verifies sha256 and size against the manifest
        assert bundle.manifest.recipe == r.recipe
        m = load_model(bundle.model_path)
        if img is None:
            img = load_image(list_images(photos)[0][0], bundle.manifest.preprocess)
        out = m.predict([img[None]])[0]
        assert out.shape == (1, 10) and np.all(np.isfinite(out))
    io = load_bundle(req.out_dir / "small_cnn-int8-io").manifest
    assert io.inputs[0].dtype == "uint8" and io.outputs[0].dtype == "uint8"
    assert io.inputs[0].quantization is not None
    assert load_bundle(req.out_dir / "small_cnn-int8").manifest.inputs[0].dtype == "float32"


def test_manifests_validate_against_the_schema(all_bundles):
    req, results = all_bundles
    for r in results:
        manifest = json.loads((r.bundle / "manifest.json").read_text())
        jsonschema.validate(manifest, SCHEMA)
        assert manifest["preprocess"]["preset"] == "mobilenet"
        assert manifest["source_model"]["name"] == "small_cnn.keras"
        if RECIPES[r.recipe].needs_calibration:
            assert manifest["calibration"]["count"] == 16 and manifest["calibration"]["seed"] == 0
        else:
            assert manifest["calibration"] is None


def test_int8_agrees_with_the_float_model_on_real_photos(all_bundles, cnn_keras, photos):
    """Stated tolerance: on logits, mean abs error <= 3% and max <= 10% of the float output range."""
    req, _ = all_bundles
    paths = list_images(photos)[0][:12]
    for recipe in ("int8", "int8-io", "int16x8", "dynamic", "fp16"):
        bundle = load_bundle(req.out_dir / f"small_cnn-{recipe}")
        spec = bundle.manifest.preprocess
        batch = np.stack([load_image(p, spec) for p in paths])
        ref = _float_reference(cnn_keras, batch)
        m = load_model(bundle.model_path)
        got = np.concatenate([m.predict([x[None]])[0] for x in batch])
        span = float(ref.max() - ref.min())
        err = np.abs(got - ref)
        assert err.mean() <= 0.03 * span, (recipe, err.mean(), span)
        assert err.max() <= 0.10 * span, (recipe, err.max(), span)
        agree = np.mean(got.argmax(1) == ref.argmax(1))
        assert agree >= 0.75, (recipe, agree)


def test_int8_is_under_035x_of_fp32(all_bundles):
    _, results = all_bundles
    by = {r.recipe: r for r in results}
    assert by["int8"].size < 0.35 * by["fp32"].size
    assert by["int8"].ratio_to_fp32 == pytest.approx(by["int8"].size / by["fp32"].size, abs=1e-3)
    assert by["fp16"].size < 0.6 * by["fp32"].size


def test_second_identical_run_is_served_from_the_cache(all_bundles):
    req, first = all_bundles
    again = convert_model(req)
    assert all(r.cache_hit for r in again)
    assert all(not r.cache_hit for r in first)
    for a, b in zip(first, again):
        assert (a.bundle / "model.tflite").read_bytes() == (b.bundle / "model.tflite").read_bytes()


def test_cache_key_changes_with_calibration_and_preprocessing(all_bundles, photos, tmp_path):
    req, _ = all_bundles
    from dataclasses import replace

    other_seed = convert_model(replace(req, recipes=parse_recipes("int8,fp32"), calib_seed=1,
                                       out_dir=tmp_path / "a"))
    assert [r.cache_hit for r in other_seed] == [False, True]  # fp32 needs no calibration
    other_pre = convert_model(replace(req, recipes=parse_recipes("fp32"), out_dir=tmp_path / "b",
                                      preprocess=PreprocessRequest(preset="unit")))
    assert not other_pre[0].cache_hit


@pytest.mark.parametrize("fixture", ["cnn_h5", "cnn_savedmodel"])
def test_h5_and_savedmodel_inputs(fixture, request, photos, tmp_path):
    model = request.getfixturevalue(fixture)
    res = convert_model(ConvertRequest(model=model, recipes=parse_recipes("fp32,int8"), out_dir=tmp_path,
                                       calib_dir=photos, calib_count=4,
                                       preprocess=PreprocessRequest(preset="unit")))
    assert all(r.error is None for r in res)
    spec = load_bundle(res[1].bundle).manifest.preprocess
    assert (spec.height, spec.width, spec.channels) == (32, 32, 3)


def test_grayscale_model_calibrates_on_colour_photos(gray_keras, photos, tmp_path):
    res = convert_model(ConvertRequest(model=gray_keras, recipes=parse_recipes("int8"), out_dir=tmp_path,
                                       calib_dir=photos, calib_count=8))
    m = load_bundle(res[0].bundle).manifest
    assert m.preprocess.color.value == "gray" and m.preprocess.mean == (0.0,) and m.preprocess.std == (1.0,)
    assert any("rescaling layer" in a for a in m.preprocess.assumed)
    assert m.inputs[0].shape == (1, 28, 28, 1)


def test_input_size_override_fixes_the_input(cnn_keras, tmp_path):
    res = convert_model(ConvertRequest(model=cnn_keras, recipes=parse_recipes("fp32"), out_dir=tmp_path,
                                       input_size=(48, 40)))
    m = load_bundle(res[0].bundle).manifest
    assert m.inputs[0].shape == (1, 48, 40, 3)
    assert (m.preprocess.height, m.preprocess.width) == (48, 40)


def test_labels_make_a_classification_bundle(cnn_keras, tmp_path):
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(f"class {i}" for i in range(10)) + "\n")
    res = convert_model(ConvertRequest(model=cnn_keras, recipes=parse_recipes("fp32"), out_dir=tmp_path / "o",
                                       labels=labels))
    b = load_bundle(res[0].bundle)
    assert b.manifest.task.value == "classification" and b.labels[3] == "class 3"


def test_input_size_on_a_fixed_size_functional_model(tf, tmp_path):
    """Keras enforces a functional model's declared input; the converter rebuilds it at the new size."""
    import keras

    keras.utils.set_random_seed(0)
    inp = keras.Input((32, 32, 3))
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(inp)
    out = keras.layers.Dense(4)(keras.layers.GlobalAveragePooling2D()(x))
    path = tmp_path / "functional.keras"
    keras.Model(inp, out).save(path)
    res = convert_model(ConvertRequest(model=path, recipes=parse_recipes("fp32"), out_dir=tmp_path / "o",
                                       input_size=(24, 40)))
    assert res[0].error is None, res[0].error
    assert load_bundle(res[0].bundle).manifest.inputs[0].shape == (1, 24, 40, 3)


def test_one_line_picks_the_error_line_of_a_traceback_like_message():
    from edgepipe.pipeline.modelio import one_line

    msg = "in user code:\n\n    File \"x.py\", line 3\n        y = f(x)\n\n    ValueError: Input 0 is incompatible\n"
    assert one_line(ValueError(msg)) == "ValueError: Input 0 is incompatible"


def test_temporary_tensorflow_logs_go_when_a_conversion_succeeds(cnn_keras, photos, tmp_path, monkeypatch):
    """Every captured TF log lands in the temp folder; a successful run leaves none behind."""
    import tempfile

    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    req = ConvertRequest(model=cnn_keras, recipes=parse_recipes("fp32,int8"), out_dir=tmp_path / "out",
                         calib_dir=photos, calib_count=4, preprocess=PreprocessRequest(preset="mobilenet"))
    results = convert_model(req)
    assert all(r.error is None for r in results)
    # (TensorFlow's autograph leaves its own generated modules there; ours all start "edgepipe")
    assert sorted(p.name for p in tmp.iterdir() if p.name.startswith("edgepipe")) == []


def test_a_failing_block_keeps_its_tensorflow_log(tmp_path, monkeypatch):
    import os
    import tempfile

    from edgepipe.pipeline.tfenv import captured_output

    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    with captured_output() as ok_log:
        os.write(2, b"native chatter\n")
    assert not ok_log.exists()
    with pytest.raises(RuntimeError):
        with captured_output() as bad_log:
            os.write(2, b"error: the converter gave up\n")
            raise RuntimeError("boom")
    assert [p.name for p in tmp.iterdir()] == [bad_log.name]
    assert "the converter gave up" in bad_log.read_text()
    with pytest.raises(ValueError):
        with captured_output():
            raise ValueError("failed before TensorFlow said anything")
    assert [p.name for p in tmp.iterdir()] == [bad_log.name]  # an empty log points at nothing


def test_load_keras_passes_a_model_through_and_names_an_unreadable_file(cnn_keras, tmp_path):
    """One loader serves selective float, --calib-method, distillation and the layer debugger."""
    from edgepipe.pipeline.modelio import ModelError, load_keras

    model = load_keras(cnn_keras)
    assert hasattr(model, "predict") and load_keras(model) is model
    assert len(model.layers) == len(load_keras(str(cnn_keras)).layers)  # a str path loads the same model
    bad = tmp_path / "broken.keras"
    bad.write_bytes(b"not a zip")
    with pytest.raises(ModelError, match=r"^cannot load broken\.keras as a Keras model \(") as e:
        load_keras(bad)
    assert "\n" not in str(e.value)
