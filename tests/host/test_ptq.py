"""Activation-range methods for int8 (edgepipe.pipeline.ptq): ranges from histograms, and real quantized models."""

import numpy as np
import pytest

pytestmark = pytest.mark.host


def test_method_names_parse_and_bad_ones_say_why():
    from edgepipe.pipeline.ptq import Method, PTQError

    assert Method.parse("minmax") == Method("minmax", True)
    assert Method.parse("percentile:99.99 per-tensor") == Method("percentile:99.99", False)
    assert Method.parse("mse").name == "mse" and Method("mse", False).name == "mse per-tensor"
    assert Method.parse("mse+bias per-tensor") == Method("mse", False, True)
    assert Method.parse("minmax+bias").name == "minmax+bias"
    for bad in ("entropy", "entropy+bias", "+bias", "percentile:40", "percentile:x", "mse per-layer", "",
                "minmax per-tensor extra"):
        with pytest.raises(PTQError) as e:
            Method.parse(bad)
        assert "\n" not in str(e.value) and "not a calibration method" in str(e.value)


def _hist(values, lo=None, hi=None):
    from edgepipe.pipeline.ptq import Histogram

    h = Histogram(float(values.min() if lo is None else lo), float(values.max() if hi is None else hi))
    h.add(values)
    return h


def test_percentile_and_mse_clip_outliers_and_keep_dense_ranges():
    from edgepipe.pipeline.ptq import Calibrated

    rng = np.random.default_rng(0)
    relu = np.maximum(rng.normal(0, 1, 200_000), 0)
    relu[:20] = 40.0  # a few outliers stretch min-max 10x
    cal = Calibrated(model=b"", hists={0: _hist(relu), 1: _hist(rng.uniform(-1, 1, 100_000))}, images=1)
    mm = cal.ranges(Method_("minmax"))
    assert mm[0] == (0.0, 40.0)
    lo, hi = cal.ranges(Method_("percentile:99.99"))[0]
    assert lo == 0.0 and 3.0 < hi < 5.0  # 99.99th percentile of a half-normal is ~3.9
    # MSE weighs an error by its square: 20 values 36 above a clip cost more than the finer step saves.
    assert cal.ranges(Method_("mse"))[0] == (0.0, pytest.approx(40.0, rel=0.02))
    heavy = np.abs(rng.standard_t(3, 200_000))  # a long continuous tail: there MSE clips
    cal.hists[2] = _hist(heavy, lo=0.0)
    lo, hi = cal.ranges(Method_("mse"))[2]
    assert lo == 0.0 and cal.ranges(Method_("percentile:99.99"))[2][1] < hi < 0.9 * heavy.max()
    # A uniform tensor is best left (nearly) whole, and both tails are kept for a signed one.
    lo, hi = cal.ranges(Method_("mse"))[1]
    assert lo < -0.9 and hi > 0.9
    lo, hi = cal.ranges(Method_("percentile:99.9"))[1]
    assert -1.0 <= lo < -0.99 and 0.99 < hi <= 1.0


def Method_(ranges):  # noqa: N802 - a short constructor for the tests above
    from edgepipe.pipeline.ptq import Method

    return Method(ranges)


@pytest.fixture(scope="module")
def outlier_model(tf):
    keras = tf.keras
    keras.utils.set_random_seed(0)
    inp = keras.Input((8,))
    hidden = keras.layers.Dense(32, activation="relu", name="hidden")
    head = keras.layers.Dense(4, name="out")
    model = keras.Model(inp, head(hidden(inp)))
    w, b = hidden.get_weights()
    # Input 7 is 0 except in one calibration sample, where it drives units 0-3 to ~60: the hidden tensor's
    # min-max range is 30x what the data needs. The head ignores units 0-3, so the output range stays sane.
    w[7, :] = 0.0
    w[7, :4] = 60.0
    hidden.set_weights([w, b])
    hw, hb = head.get_weights()
    hw[:4] = 0.0
    head.set_weights([hw, hb])
    rng = np.random.default_rng(1)
    calib = rng.uniform(-1, 1, (256, 8)).astype(np.float32)
    calib[:, 7] = 0.0
    calib[0, 7] = 1.0  # inside the input's range: only the hidden activation sees an outlier
    val = rng.uniform(-1, 1, (200, 8)).astype(np.float32)
    val[:, 7] = 0.0
    return model, calib, val


def _scales(model_bytes, tf):
    interp = tf.lite.Interpreter(model_content=model_bytes)
    return {d["name"]: d["quantization_parameters"]["scales"] for d in interp.get_tensor_details()}


@pytest.mark.slow
def test_clipped_ranges_give_a_finer_step_and_a_better_model(tf, outlier_model):
    from edgepipe.pipeline import metrics
    from edgepipe.pipeline.ptq import Method, calibrate, for_selective
    from edgepipe.pipeline.model_run import float_outputs, run_tflite

    model, calib, val = outlier_model
    cal = calibrate(model, calib, max_hist_images=256)
    assert cal.images == 256 and cal.hists  # activations were histogrammed
    ref = float_outputs(model, val)
    snr = {}
    for text in ("minmax", "percentile:99", "mse"):
        q = cal.quantize(Method.parse(text))
        snr[text] = metrics.snr_db(run_tflite(q, val), ref)
        hidden = [s for n, s in _scales(q, tf).items() if "hidden" in n and "Relu" in n]
        assert hidden, "the hidden activation is quantized"
        snr[text + " step"] = float(hidden[0][0])
    assert snr["percentile:99 step"] < snr["minmax step"] / 5
    assert snr["percentile:99"] > snr["minmax"] + 6.0  # 4x less error, at least
    assert snr["mse"] >= snr["minmax"]  # never worse; a handful of far outliers it keeps (see above)
    # Per-tensor weights: one scale for the hidden layer's kernel instead of one per output unit.
    per_channel = max(len(s) for n, s in _scales(cal.quantize(Method.parse("minmax")), tf).items() if "hidden" in n)
    per_tensor = max(len(s) for n, s in _scales(cal.quantize(Method.parse("minmax per-tensor")), tf).items()
                     if "hidden" in n)
    assert per_channel == 32 and per_tensor == 1
    # The selective search's re-quantization keeps the chosen ranges.
    dbg = for_selective(cal, Method.parse("percentile:99"), [])
    assert dbg.quantize([]) == cal.quantize(Method.parse("percentile:99"))


def _convert(*args):
    from click.testing import CliRunner

    from edgepipe.pipeline.cli import main

    return CliRunner().invoke(main, ["convert", *map(str, args)])


def test_calib_method_flag_is_checked_before_converting(tmp_path):
    from edgepipe.pipeline import samples

    model = samples.fashion_mnist_model_path()
    r = _convert(model, "--recipes", "int8", "--calib", samples.fashion_mnist_test_dir(), "--out", tmp_path,
                 "--calib-method", "entropy")
    assert r.exit_code != 0 and r.output.strip().splitlines()[-1].startswith("Error: --calib-method: 'entropy'")
    r = _convert(model, "--recipes", "fp16", "--out", tmp_path, "--calib-method", "mse")
    assert r.exit_code != 0 and "needs the int8 recipe" in r.output
    assert not any(tmp_path.iterdir())  # nothing converted


@pytest.mark.slow
def test_convert_with_calib_method_measures_on_val(tmp_path):
    import json

    from edgepipe.pipeline import samples

    calib = samples.fashion_mnist_test_dir().parent / "calib"
    r = _convert(samples.fashion_mnist_model_path(), "--recipes", "int8", "--calib", calib, "--calib-count", "40",
                 "--preprocess", "unit", "--val", samples.fashion_mnist_test_dir(), "--calib-method",
                 "percentile:99.99", "--out", tmp_path, "--no-cache", "--no-edgetpu")
    assert r.exit_code == 0, r.output
    manifest = json.loads(next(tmp_path.glob("*int8*/manifest.json")).read_text())
    block = manifest["extra"]["calibration_method"]
    assert block["measured_on"] == "validation images" and block["eval_images"] == 300
    assert block["asked"] == "percentile:99.99" and block["chosen"] in ("minmax", "percentile:99.99")
    assert set(block["agreement"]) == set(block["snr_db"]) == {"minmax", "percentile:99.99"}
    better = (block["agreement"]["percentile:99.99"], block["snr_db"]["percentile:99.99"]) > \
        (block["agreement"]["minmax"], block["snr_db"]["minmax"])
    assert block["chosen"] == ("percentile:99.99" if better else "minmax")
    assert all(0.9 < a <= 1.0 for a in block["agreement"].values())


@pytest.mark.slow
def test_without_val_the_images_calibration_did_not_pick_are_held_back(tmp_path):
    """No --val: agreement is measured on the calibration folder's other images; only when none are left on
    the calibration images themselves, and the manifest says which."""
    import json

    from edgepipe.pipeline import samples

    calib = samples.fashion_mnist_test_dir().parent / "calib"  # 200 images
    blocks = {}
    for count in (40, 200):
        out = tmp_path / str(count)
        r = _convert(samples.fashion_mnist_model_path(), "--recipes", "int8", "--calib", calib, "--calib-count",
                     str(count), "--preprocess", "unit", "--calib-method", "mse", "--out", out, "--no-cache",
                     "--no-edgetpu")
        assert r.exit_code == 0, r.output
        blocks[count] = json.loads(next(out.glob("*int8*/manifest.json")).read_text())["extra"]["calibration_method"]
    assert blocks[40]["measured_on"] == "held-back images" and blocks[40]["eval_images"] == 160
    assert blocks[200]["measured_on"] == "calibration images" and blocks[200]["eval_images"] == 200


@pytest.mark.slow
def test_bias_correction_removes_mean_shift_on_fashion_mnist(tf):
    """The sample CNN on held-out test images: +bias raises the output SNR (39.6 -> 40.2 dB) and changes only biases."""
    from edgepipe.device.bundle import ColorOrder, Preprocess
    from edgepipe.pipeline import metrics, samples
    from edgepipe.pipeline.evaluate import load_dataset, load_inputs
    from edgepipe.pipeline.ptq import Method, calibrate
    from edgepipe.pipeline.model_run import float_outputs, run_tflite
    from edgepipe.pipeline.tfenv import captured_output

    with captured_output():
        model = tf.keras.models.load_model(str(samples.fashion_mnist_model_path()), compile=False)
    spec = Preprocess(height=28, width=28, color=ColorOrder.GRAY, mean=(0.0,), std=(255.0,))
    x = load_inputs(load_dataset(samples.fashion_mnist_test_dir(), limit=300).paths, spec)
    calib, val = x[:100], x[100:]
    cal = calibrate(model, calib)
    ref = float_outputs(model, val)
    plain, fixed = cal.quantize(Method("minmax")), cal.quantize(Method.parse("minmax+bias"))
    snr_plain = metrics.snr_db(run_tflite(plain, val), ref)
    snr_fixed = metrics.snr_db(run_tflite(fixed, val), ref)
    assert snr_fixed > snr_plain + 0.3, (snr_plain, snr_fixed)

    from tensorflow.lite.tools import flatbuffer_utils as fu

    def constants(m):  # tensor name -> (TFLite type, bytes) of every tensor with data
        mt = fu.read_model_from_bytearray(bytearray(m))
        return {t.name: (t.type, bytes(np.asarray(mt.buffers[t.buffer].data, np.uint8)))
                for t in mt.subgraphs[0].tensors if mt.buffers[t.buffer].data is not None}

    before, after = constants(plain), constants(fixed)
    assert before.keys() == after.keys()
    changed = {n for n in before if before[n] != after[n]}
    assert changed and all(before[n][0] == 2 for n in changed)  # only int32 tensors (biases) moved
