"""Per-layer error and selective quantization on the sample Fashion-MNIST CNN."""

import numpy as np
import pytest

pytestmark = pytest.mark.host


@pytest.fixture(scope="module")
def fm():
    from edgepipe.device.bundle import ColorOrder, Preprocess
    from edgepipe.pipeline import samples
    from edgepipe.pipeline.evaluate import load_dataset, load_inputs

    spec = Preprocess(height=28, width=28, color=ColorOrder.GRAY, mean=(0.0,), std=(255.0,))
    ds = load_dataset(samples.fashion_mnist_test_dir(), limit=300)
    x = load_inputs(ds.paths, spec)
    return {"model": samples.fashion_mnist_model_path(), "x": x, "labels": ds.labels}


def test_layer_names_from_tensor_names():
    from edgepipe.pipeline.layer_error import keras_layer_name

    assert keras_layer_name("functional_1/conv2_1/Relu;functional_1/conv2_1/BiasAdd") == "conv2"
    assert keras_layer_name("StatefulPartitionedCall_1:0") == "StatefulPartitionedCall_1:0"


def test_layer_error_ranks_a_clipped_layer_first():
    """A layer whose calibration range misses the real data loses most; it must rank first."""
    from edgepipe.pipeline.layer_error import debug_int8
    from edgepipe.pipeline.tfenv import import_tf

    tf = import_tf()
    keras = tf.keras
    keras.utils.set_random_seed(0)
    inp = keras.Input((8,))
    a = keras.layers.Dense(16, activation="relu", name="early")(inp)
    b = keras.layers.Dense(16, name="late")(a)
    model = keras.Model(inp, b)
    rng = np.random.default_rng(0)
    calib = rng.uniform(-1, 1, (16, 8)).astype(np.float32)
    # Debug on inputs 20x larger than calibration: every layer clips, and
    # the error in quantization steps is far above rounding noise.
    dbg = debug_int8(model, calib, debug=calib * 20)
    ranked = dbg.ranked()
    assert {e.layer for e in ranked} >= {"early", "late"}
    assert ranked[0].rmse_steps > 1.0
    calm = debug_int8(model, calib)
    assert max(e.rmse_steps for e in calm.layers) < 1.0  # in range: about rounding noise
    assert all(e.scale > 0 for e in calm.layers)


@pytest.mark.slow
def test_selective_reaches_target_with_fewer_float_layers(fm):
    from edgepipe.pipeline import metrics
    from edgepipe.pipeline.model_run import float_outputs, run_tflite
    from edgepipe.pipeline.selective import selective_int8
    from edgepipe.pipeline.tfenv import captured_output, import_tf

    tf = import_tf()
    with captured_output():
        model = tf.keras.models.load_model(str(fm["model"]), compile=False)
    x = fm["x"]
    # A deliberately thin calibration set (4 images) so plain int8 misses the target.
    calib = x[::75][:4]
    r = selective_int8(model, "int8", calib, x, 1.0, measure_latency=True)
    assert r.baseline_agreement < 1.0
    assert r.reached and r.agreement == 1.0
    assert 0 < len(r.kept) < r.layers_total
    # The returned model really is that model: re-run it independently.
    out = run_tflite(r.tflite, x)
    assert metrics.top1_agreement(out, float_outputs(model, x)) == r.agreement
    d = r.to_dict()
    assert [f["layer"] for f in d["float_layers"]] == [e.layer for e in r.kept]
    assert all("sensitivity rank" in f["reason"] for f in d["float_layers"])
    assert [lat["float_layers"] for lat in d["latency"]] == list(range(len(r.kept) + 1))
    assert all(lat["p50_ms"] > 0 for lat in d["latency"])
    assert d["steps"][0] == {"float_layers": 0, "agreement": r.baseline_agreement}


def test_selective_rejects_bad_requests(fm):
    from edgepipe.pipeline.selective import SelectiveError, selective_int8

    with pytest.raises(SelectiveError, match="only works with recipe int8"):
        selective_int8(fm["model"], "fp16", fm["x"][:2], None, 0.9)
    with pytest.raises(SelectiveError, match=r"1.5 is not in \(0, 1\]"):
        selective_int8(fm["model"], "int8", fm["x"][:2], None, 1.5)


@pytest.mark.slow
def test_convert_target_agreement_records_float_layers(tmp_path):
    """`edgepipe convert --target-agreement` rewrites the int8 bundle and says why in the manifest."""
    import json
    import os

    from click.testing import CliRunner

    from edgepipe.device.bundle import load_bundle
    from edgepipe.pipeline import samples
    from edgepipe.pipeline.cli import main

    calib = tmp_path / "calib"
    calib.mkdir()
    # Two images per class, flat (calibration reads one folder).
    for d in sorted(samples.fashion_mnist_test_dir().iterdir()):
        for p in sorted(d.glob("*.png"))[:2]:
            os.symlink(p, calib / f"{d.name}_{p.name}")
    out = tmp_path / "bundles"
    args = ["convert", str(samples.fashion_mnist_model_path()), "--recipes", "int8", "--calib", str(calib),
            "--preprocess", "unit", "--out", str(out), "--no-cache", "--target-agreement", "1.0"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    path = out / "fashion_mnist_cnn-int8"
    b = load_bundle(path)
    sel = b.manifest.extra["selective"]
    # On its own 20 calibration images plain int8 already agrees: the bundle is kept as made.
    assert sel["reached"] and sel["float_layers"] == [] and sel["eval_images"] == 20
    assert sel["steps"][0]["model"] == "plain int8"
    before = b.manifest.model_sha256

    # Judged on the 500 test images it does not; the search keeps a few layers in float.
    from edgepipe.pipeline.selective import apply_to_bundle

    res = apply_to_bundle(path, samples.fashion_mnist_model_path(), 1.0,
                          eval_dir=samples.fashion_mnist_test_dir(), eval_limit=500)
    assert res.baseline_agreement < 1.0
    assert res.reached and 0 < len(res.kept) < res.layers_total
    b = load_bundle(path)  # verifies the rewritten model's sha256
    assert b.manifest.model_sha256 != before
    sel = b.manifest.extra["selective"]
    assert sel["agreement"] == 1.0 and sel["eval_images"] == 500
    assert len(sel["latency"]) == len(sel["float_layers"]) + 1
    json.dumps(sel)  # JSON-clean

    r = CliRunner().invoke(main, args[:3] + ["fp16"] + args[4:])
    assert r.exit_code == 1 and "--target-agreement: needs the int8 recipe" in r.output
