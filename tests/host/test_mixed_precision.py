"""16-bit activations for chosen layers (a16w8 via ai-edge-quantizer), and the convert option that tries them."""
from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture(scope="module")
def tiny(tf):
    """A seeded conv net, its float .tflite, and calibration/validation inputs."""
    import keras

    from edgepipe.pipeline.mixed_precision import float_tflite

    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((16, 16, 3)),
        keras.layers.Conv2D(8, 3, activation="relu"),
        keras.layers.DepthwiseConv2D(3, activation="relu6"),
        keras.layers.Conv2D(16, 1),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(5),
    ])
    rng = np.random.default_rng(0)
    calib = rng.normal(size=(16, 16, 16, 3)).astype(np.float32)
    val = rng.normal(size=(12, 16, 16, 3)).astype(np.float32)
    return model, float_tflite(model), calib, val


def _op_output_types(tf, model: bytes) -> dict:
    """Output tensor name -> dtype name, for every op that is not a (de)quantize at a precision border."""
    interp = tf.lite.Interpreter(model_content=model)
    tensors = {d["index"]: d for d in interp.get_tensor_details()}
    out = {}
    for op in interp._get_ops_details():
        if op["op_name"] in ("QUANTIZE", "DEQUANTIZE"):
            continue
        for i in op["outputs"]:
            out[tensors[i]["name"]] = tensors[i]["dtype"].__name__
    return out


def test_chosen_ops_get_int16_activations_and_the_rest_int8(tf, tiny):
    from edgepipe.pipeline.mixed_precision import A16W8Quantizer, MixedPrecisionError

    _, fp, calib, _ = tiny
    aq = A16W8Quantizer(fp, calib)
    names = list(aq.scopes)  # graph order: conv, depthwise, conv, mean, dense
    assert len(names) == 5
    plain = _op_output_types(tf, aq.quantize([]))
    assert set(plain.values()) == {"int8"}
    chosen = [names[1], names[4]]  # the depthwise layer and the classifier (a graph output)
    mixed = _op_output_types(tf, aq.quantize(chosen))
    assert {n: mixed[n] for n in chosen} == {n: "int16" for n in chosen}
    assert all(mixed[n] == "int8" for n in names if n not in chosen)
    interp = tf.lite.Interpreter(model_content=aq.quantize(chosen))
    assert interp.get_input_details()[0]["dtype"] == np.float32  # model inputs/outputs stay float
    assert interp.get_output_details()[0]["dtype"] == np.float32
    with pytest.raises(MixedPrecisionError, match="no op of the float model outputs 'nope'"):
        aq.quantize(["nope"])


def test_search_reports_agreement_snr_and_latency_per_step(tiny):
    from edgepipe.pipeline.layer_error import keras_layer_name
    from edgepipe.pipeline.mixed_precision import op_scopes, search, step_counts
    from edgepipe.pipeline.model_run import run_tflite

    _, fp, calib, val = tiny
    ref = run_tflite(fp, val)
    ranked = list(reversed(list(op_scopes(fp))))  # classifier first
    res = search(fp, calib, val, ref, ranked + ["not/a/tensor"], max_layers=3)
    assert [len(s.int16_layers) for s in res.steps] == step_counts(3) == [0, 1, 2, 3]
    assert res.steps[1].int16_layers == tuple(ranked[:1]) and res.unmapped == ("not/a/tensor",)
    assert all(0.0 <= s.agreement <= 1.0 and np.isfinite(s.snr_db) and s.p50_ms > 0 for s in res.steps)
    assert res.fp32_p50_ms > 0 and res.chosen is None  # no target: nothing chosen
    # More 16-bit layers bring the outputs closer to float here (16-bit steps are 256x finer).
    assert res.steps[-1].snr_db > res.steps[0].snr_db
    block = res.to_dict()
    assert block["steps"][1]["int16_layers"] == 1 and block["steps"][1]["layers"] == [keras_layer_name(ranked[0])]
    assert block["tool"].startswith("ai-edge-quantizer ")
    reached = search(fp, calib, val, ref, ranked, max_layers=3, target=0.0, measure_latency=False)
    assert len(reached.steps) == 1 and reached.chosen is None  # unmeasured latency never qualifies


def test_choose_takes_the_first_step_reaching_the_target_only_when_not_slower_than_fp32():
    from edgepipe.pipeline.mixed_precision import Step, _choose

    steps = [Step((), 0.8, 10.0, 1.0), Step(("a",), 0.95, 12.0, 1.5), Step(("a", "b"), 0.99, 15.0, 9.0)]
    assert _choose(steps, 0.9, fp32=2.0) == 1
    assert _choose(steps, 0.97, fp32=2.0) is None  # reaches it only slower than fp32
    assert _choose(steps, 0.999, fp32=2.0) is None
    assert _choose(steps, None, fp32=2.0) is None


def test_named_ranges_clip_8bit_tensors_but_16bit_ones_keep_min_max(tf, tiny):
    from edgepipe.pipeline.mixed_precision import A16W8Quantizer

    _, fp, calib, _ = tiny
    full = A16W8Quantizer(fp, calib)
    name = list(full.scopes)[0]  # the first conv's output (names depend on how many models the session built)
    hi = float(full.qsvs[name]["max"].max())
    clipped = A16W8Quantizer(fp, calib, ranges={name: (0.0, hi / 4)})

    def scale(model):
        interp = tf.lite.Interpreter(model_content=model)
        for op in interp._get_ops_details():
            if op["op_name"] == "CONV_2D":
                d = interp.get_tensor_details()[op["outputs"][0]]
                if d["name"] == name:
                    return d["quantization_parameters"]["scales"][0]
        raise AssertionError("conv output not found")

    assert scale(clipped.quantize()) == pytest.approx(scale(full.quantize()) / 4, rel=0.01)
    assert scale(clipped.quantize([name])) == pytest.approx(scale(full.quantize([name])), rel=0.01)


def _convert(*args):
    from click.testing import CliRunner

    from edgepipe.pipeline.cli import main

    return CliRunner().invoke(main, ["convert", *map(str, args)])


def test_try_int16_flag_errors_are_one_line_and_come_before_converting(tmp_path, photos):
    r = _convert("model.keras", "--recipes", "int8", "--calib", photos, "--out", tmp_path, "--try-int16", "2")
    assert r.exit_code != 0
    assert r.output.strip().splitlines()[-1] == "Error: --try-int16: needs --target-agreement"
    r = _convert("model.keras", "--recipes", "int8", "--out", tmp_path, "--target-agreement", "0.9",
                 "--try-int16", "-1")
    assert r.exit_code != 0 and "--try-int16" in r.output.strip().splitlines()[-1]
    assert "Traceback" not in r.output
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_convert_try_int16_records_the_steps(tmp_path):
    import json

    from edgepipe.pipeline import samples

    calib = samples.fashion_mnist_test_dir().parent / "calib"
    r = _convert(samples.fashion_mnist_model_path(), "--recipes", "int8", "--calib", calib, "--calib-count", "32",
                 "--preprocess", "unit", "--val", samples.fashion_mnist_test_dir(), "--target-agreement", "0.999",
                 "--try-int16", "2", "--out", tmp_path, "--no-cache", "--no-edgetpu")
    assert r.exit_code == 0, r.output
    sel = json.loads(next(tmp_path.glob("*int8*/manifest.json")).read_text())["extra"]["selective"]
    block = sel["a16w8"]
    assert [s["int16_layers"] for s in block["steps"]][:2] == [0, 1]
    assert all(s["p50_ms"] > 0 and 0 <= s["agreement"] <= 1 for s in block["steps"])
    assert block["fp32_p50_ms"] > 0
    if block["chosen_step"] is None:  # the float search ran after the 16-bit steps
        assert sel["method"].startswith("denylist")
    else:
        assert sel["method"].startswith("16-bit") and sel["float_layers"] == []
