"""Cross-layer equalization (edgepipe.pipeline.cle) on tiny seeded Keras models, and the +cle method grammar."""

import numpy as np
import pytest

pytestmark = pytest.mark.host


def _tiny(act, seed=0, residual=False, decades=1.0):
    """conv-BN-act-depthwise-BN-act-conv (channels deliberately unbalanced), optionally with a skip."""
    import keras

    keras.utils.set_random_seed(seed)
    L = keras.layers
    inp = keras.Input((8, 8, 3))
    x = L.Conv2D(6, 3, padding="same", use_bias=False, name="conv1")(inp)
    x = L.BatchNormalization(name="bn1")(x)
    x = act("act1")(x)
    x = L.ZeroPadding2D(1, name="pad")(x)
    x = L.DepthwiseConv2D(3, padding="valid", use_bias=False, name="dw")(x)
    x = L.BatchNormalization(name="bn2")(x)
    y = act("act2")(x)
    out = L.Conv2D(4, 1, name="conv2")(y)
    if residual:
        out = L.Add(name="add")([L.Conv2D(4, 1, name="skip")(y), out])
    model = keras.Model(inp, out, name="tiny")
    rng = np.random.default_rng(seed)
    for name in ("bn1", "bn2"):  # gammas over 2 * decades decades: the per-channel ranges differ a lot
        bn = model.get_layer(name)
        n = bn.get_weights()[0].shape[0]
        bn.set_weights([10 ** rng.uniform(-decades, decades, n) * rng.choice([-1, 1], n), rng.normal(0, 0.5, n),
                        rng.normal(0, 0.3, n), rng.uniform(0.2, 2.0, n)])
    return model


def _relu(name):
    import keras

    return keras.layers.ReLU(name=name)


def _relu6(name):
    import keras

    return keras.layers.ReLU(6.0, name=name)


def _x(n=16, seed=1):
    return np.random.default_rng(seed).normal(0, 2.0, (n, 8, 8, 3)).astype(np.float32)


def _folded(model, conv, bn, depthwise=False):
    """(kernel with the following BN folded in, per output channel last) of ``conv``."""
    k = model.get_layer(conv).get_weights()[0]
    g, _, _, var = model.get_layer(bn).get_weights()
    f = g / np.sqrt(var + model.get_layer(bn).epsilon)
    return k * (f.reshape(k.shape[-2], k.shape[-1]) if depthwise else f)


def test_equalized_model_computes_the_same_function_with_equal_ranges(tf):
    from edgepipe.pipeline.cle import equalize

    model = _tiny(_relu)
    weights_before = [w.copy() for w in model.get_weights()]
    x = _x()
    ref = np.asarray(model(x, training=False))
    new, eq = equalize(model)
    assert new is not model and [(p.first, p.second) for p in eq.pairs] == [("conv1", "dw"), ("dw", "conv2")]
    assert eq.relu6_replaced == () and eq.converged
    out = np.asarray(new(x, training=False))
    assert np.max(np.abs(out - ref)) <= 1e-5 * max(1.0, np.max(np.abs(ref)))
    assert all(np.array_equal(a, b) for a, b in zip(model.get_weights(), weights_before))  # caller's untouched

    def ranges(m):
        c1 = np.abs(_folded(m, "conv1", "bn1")).max(axis=(0, 1, 2))  # conv1's output channels
        dw = np.abs(_folded(m, "dw", "bn2", depthwise=True)).max(axis=(0, 1, 3))  # depthwise, channel c
        c2 = np.abs(m.get_layer("conv2").get_weights()[0]).max(axis=(0, 1, 3))  # conv2's input channels
        return c1, dw, c2

    c1, dw, c2 = ranges(model)
    assert np.max(c1 / dw) / np.min(c1 / dw) > 10  # not equal before
    c1, dw, c2 = ranges(new)
    np.testing.assert_allclose(c1, dw, rtol=1e-3)
    np.testing.assert_allclose(dw, c2, rtol=1e-3)
    assert all(p.mismatch_after < 1e-3 < p.mismatch_before for p in eq.pairs)
    # All three layers now share each channel's range, so both pairs report the same precision (a channel's
    # share of the per-tensor grid in both layers); how it compares with before depends on the weights.
    assert eq.pairs[0].channels == 6
    assert eq.pairs[0].precision_after == pytest.approx(eq.pairs[1].precision_after, rel=1e-3)


def test_relu6_becomes_relu_in_equalized_pairs_only_and_is_reported(tf):
    import keras

    from edgepipe.pipeline.cle import equalize

    model = _tiny(_relu6)
    new, eq = equalize(model)
    assert eq.relu6_replaced == ("act1", "act2") and len(eq.pairs) == 2
    assert new.get_layer("act1").max_value is None and model.get_layer("act1").max_value == 6.0
    twin = _tiny(_relu)  # the original with ReLU: what the equalized model must still compute
    twin.set_weights(model.get_weights())
    x = _x(seed=2) * 3.0  # large inputs so ReLU6 actually clips somewhere
    ref = np.asarray(twin(x, training=False))
    np.testing.assert_allclose(np.asarray(new(x, training=False)), ref, atol=1e-5 * np.max(np.abs(ref)))
    assert not np.allclose(np.asarray(model(x, training=False)), ref, atol=1e-3)  # ReLU6 did clip: a real change
    same, none = equalize(model, replace_relu6=False)
    assert same is model and none.pairs == () and none.relu6_replaced == ()
    assert isinstance(new, keras.Model)


def test_models_without_equalizable_pairs_pass_through(tf):
    import keras

    from edgepipe.pipeline.cle import equalize, find_pairs

    L = keras.layers
    keras.utils.set_random_seed(0)
    inp = keras.Input((8, 8, 3))
    x = L.Conv2D(4, 3, activation="sigmoid")(inp)  # not positively homogeneous
    model = keras.Model(inp, L.Conv2D(2, 1)(x))
    new, eq = equalize(model)
    assert new is model and eq.pairs == () and eq.iterations == 0
    # The depthwise output feeds two convs (conv2 and the skip): only conv1 -> dw is a pair.
    assert [(c.first, c.second) for c in find_pairs(_tiny(_relu, residual=True))] == [("conv1", "dw")]


def test_method_grammar_accepts_cle_and_rejects_bad_modifiers():
    from edgepipe.pipeline.ptq import Method, PTQError

    assert Method.parse("mse+cle+bias") == Method("mse", True, True, True)
    assert Method.parse("mse+bias+cle") == Method.parse("mse+cle+bias")  # modifiers in any order
    assert Method.parse("mse+cle+bias").name == "mse+cle+bias"
    assert Method.parse("minmax+cle per-tensor").name == "minmax+cle per-tensor"
    assert Method.parse("percentile:99.99+cle") == Method("percentile:99.99", cle=True)
    assert not Method.parse("mse+bias").cle
    for bad in ("cle", "+cle", "mse+cle+cle", "mse+bias+bias", "mse+cl", "mse+cle+", "mse++cle", "mse+cle per-layer",
                "percentile:40+cle"):
        with pytest.raises(PTQError) as e:
            Method.parse(bad)
        assert "\n" not in str(e.value) and "not a calibration method" in str(e.value)


def _float_tensors(tflite: bytes) -> int:
    """Non-constant float32 tensors (float layers left by a denylist add some)."""
    from tensorflow.lite.tools import flatbuffer_utils as fu

    m = fu.read_model_from_bytearray(bytearray(tflite))
    return sum(1 for t in m.subgraphs[0].tensors if t.type == 0 and m.buffers[t.buffer].data is None)


@pytest.mark.slow  # calibrates and quantizes (about 5-10 s)
def test_cle_method_quantizes_the_equalized_model_and_maps_float_layers(tf):
    from edgepipe.pipeline.cle import float_cost
    from edgepipe.pipeline.layer_error import debug_int8
    from edgepipe.pipeline.ptq import Method, PTQError, calibrate
    from edgepipe.pipeline.model_run import float_outputs, run_tflite

    model = _tiny(_relu6)
    calib, val = _x(64, seed=3), _x(32, seed=4)
    cal = calibrate(model, calib)
    q = cal.quantize(Method.parse("minmax+cle"))
    eq = cal.equalized()
    assert eq is cal.equalized() and eq.equalization.relu6_replaced == ("act1", "act2")
    assert run_tflite(q, val).shape == (32, 8 * 8 * 4)
    with pytest.raises(PTQError):
        eq.quantize(Method("minmax"))  # the equalized calibration only serves +cle
    cost = float_cost(eq.source, eq.equalization, val, float_outputs(model, val))  # against the ReLU6 original
    assert cost["pairs"] == 2 and cost["relu6_replaced"] == 2 and 0.0 <= cost["float_agreement"] <= 1.0
    assert np.isfinite(cost["float_snr_db"])
    # A float layer named by the ORIGINAL model's tensor (ReLU6 fused into the depthwise) stays float in the
    # equalized one, whose fused tensor is named ...Relu instead.
    dw = next(e.tensor for e in debug_int8(model, calib).layers if e.op == "DEPTHWISE_CONV_2D")
    assert "Relu6" in dw and dw in cal.tensor_names() and dw not in eq.tensor_names()
    kept = cal.quantize(Method.parse("minmax+cle"), [dw])
    assert _float_tensors(kept) > _float_tensors(q)


@pytest.mark.slow  # calibrates and quantizes (about 5-10 s)
def test_cle_makes_per_tensor_weights_as_good_as_per_channel(tf):
    """Channels four decades apart: one int8 scale per tensor drowns the small ones until CLE evens them out
    (measured: 9.6 -> 31.7 dB, per-channel 31.4 dB)."""
    from edgepipe.pipeline import metrics
    from edgepipe.pipeline.ptq import Method, calibrate
    from edgepipe.pipeline.model_run import float_outputs, run_tflite

    model = _tiny(_relu, seed=1, decades=2.0)  # ReLU: equalizing does not change the float function
    calib, val = _x(64, seed=3), _x(64, seed=5)
    cal = calibrate(model, calib)
    ref = float_outputs(model, val)
    snr = {t: metrics.snr_db(run_tflite(cal.quantize(Method.parse(t)), val), ref)
           for t in ("minmax per-tensor", "minmax+cle per-tensor", "minmax")}
    assert snr["minmax+cle per-tensor"] > snr["minmax per-tensor"] + 10.0, snr
    assert snr["minmax+cle per-tensor"] > snr["minmax"] - 1.0, snr
