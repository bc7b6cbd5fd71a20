"""edgepipe.device.runtime / edgepipe.device.delegates on the tiny committed models (no TensorFlow needed)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from edgepipe.device.runtime import (BACKENDS, LoadedModel, RuntimeLoadError, TensorSpec, available_backends,
                            get_backend, load_model)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# --------------------------------------------------------------------------- TensorSpec


def detail(**kw):
    d = {"index": 3, "name": "x", "shape": np.array([1, 4]), "shape_signature": np.array([-1, 4]),
         "dtype": np.int8, "quantization": (0.5, -3),
         "quantization_parameters": {"scales": np.array([0.5]), "zero_points": np.array([-3]),
                                     "quantized_dimension": 0}}
    d.update(kw)
    return d


def test_tensorspec_from_detail_is_frozen_and_plain():
    s = TensorSpec.from_detail(detail())
    assert s == TensorSpec(3, "x", (1, 4), "int8", 0.5, -3, (-1, 4))
    assert s.quantized and s.np_dtype == np.int8
    assert isinstance(s.shape[0], int) and isinstance(s.zero_point, int)
    with pytest.raises(Exception):
        s.scale = 1.0  # frozen
    assert s.to_dict() == {"name": "x", "shape": [1, 4], "dtype": "int8",
                           "quantization": {"scale": 0.5, "zero_point": -3}}


def test_tensorspec_uses_per_axis_single_scale_when_quantization_tuple_empty():
    s = TensorSpec.from_detail(detail(quantization=(0.0, 0)))
    assert (s.scale, s.zero_point) == (0.5, -3)


def test_float_tensor_is_not_quantized_and_casts():
    s = TensorSpec.from_detail(detail(dtype=np.float32, quantization=(0.0, 0), quantization_parameters={}))
    assert not s.quantized
    q = s.quantize([[1.25, -2.0, 3.5, 0.0]])
    assert q.dtype == np.float32 and q.tolist() == [[1.25, -2.0, 3.5, 0.0]]
    assert s.dequantize(q).dtype == np.float32


def test_quantize_rounds_then_clips_then_casts():
    s = TensorSpec(0, "x", (6,), "int8", scale=0.5, zero_point=-3)
    # x/0.5 - 3: 1.0 -> -1; 1.2 -> 2.4-3=-0.6 -> -1; 1.3 -> -0.4 -> 0; huge values clip to the int8 range
    q = s.quantize(np.array([1.0, 1.2, 1.3, 1000.0, -1000.0, 0.0]))
    assert q.dtype == np.int8
    assert q.tolist() == [-1, -1, 0, 127, -128, -3]
    u = TensorSpec(0, "x", (3,), "uint8", scale=0.1, zero_point=128)
    assert u.quantize([-100.0, 0.04, 100.0]).tolist() == [0, 128, 255]  # no wrap-around


def test_dequantize_uses_own_scale_and_zero_point_and_round_trips():
    s = TensorSpec(0, "x", (5,), "uint8", scale=0.02, zero_point=100)
    assert np.allclose(s.dequantize(np.array([100, 150, 0, 255, 101], np.uint8)),
                       [0.0, 1.0, -2.0, 3.1, 0.02])
    rng = np.random.default_rng(0)
    x = rng.uniform(*s.float_range(), size=1000).astype(np.float32)
    assert np.max(np.abs(s.dequantize(s.quantize(x)) - x)) <= s.scale / 2 + 1e-6


# --------------------------------------------------------------------------- backends


def test_available_backends_lists_installed_runtime_with_version(backend):
    found = available_backends()
    assert found[0] == backend and backend[1]  # a version string
    order = [b.name for b in BACKENDS]
    assert [n for n, _ in found] == sorted((n for n, _ in found), key=order.index)
    assert "tensorflow" not in sys.modules  # found by metadata, never imported


def test_backend_table_order_and_unknown_backend():
    assert [b.name for b in BACKENDS] == ["ai_edge_litert", "tflite_runtime", "tensorflow.lite"]
    with pytest.raises(RuntimeLoadError, match="unknown backend 'nope'.*ai_edge_litert"):
        get_backend("nope")


def _run_blocked(code: str, blocked) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter where the ``blocked`` packages cannot be imported."""
    prelude = textwrap.dedent(f"""
        import sys, importlib.abc
        BLOCK = {tuple(blocked)!r}
        class Blocker(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split('.')[0] in BLOCK:
                    raise ModuleNotFoundError(f"No module named {{name!r}}")
                return None
        sys.meta_path.insert(0, Blocker())
        import importlib.util
        _orig = importlib.util.find_spec
        def find_spec(name, package=None):
            if name.split('.')[0] in BLOCK:
                return None
            return _orig(name, package)
        importlib.util.find_spec = find_spec
    """)
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], capture_output=True,
                          text=True, cwd=ROOT, timeout=60)


def test_no_runtime_installed_gives_one_error_listing_pip_commands():
    out = _run_blocked("""
        from edgepipe.device.runtime import load_model, RuntimeLoadError, available_backends
        assert available_backends() == [], available_backends()
        try:
            load_model('tests/data/models/float.tflite')
        except RuntimeLoadError as e:
            print(e)
    """, ["ai_edge_litert", "tflite_runtime", "tensorflow"])
    assert out.returncode == 0, out.stderr
    msg = out.stdout.strip()
    assert "\n" not in msg and "no TFLite runtime is installed" in msg
    for cmd in ("pip install ai-edge-litert", "pip install tflite-runtime", "pip install tensorflow"):
        assert cmd in msg


def test_forced_backend_that_is_missing_says_how_to_install():
    have = {n for n, _ in available_backends()}
    missing = [b for b in BACKENDS if b.name not in have]
    if not missing:
        pytest.skip("every backend is installed here")
    b = missing[0]
    with pytest.raises(RuntimeLoadError, match=f"{b.name} is not usable.*'{b.pip}'"):
        get_backend(b.aliases[0])


def test_fallback_skips_to_next_backend_when_first_is_absent():
    # With ai_edge_litert blocked and tflite_runtime absent, the chain reaches
    # tensorflow.lite, or reports none when TensorFlow is absent too (.venv-device).
    out = _run_blocked("""
        import numpy as np
        from edgepipe.device.runtime import get_backend, load_model, RuntimeLoadError
        try:
            name = get_backend().info.name
        except RuntimeLoadError as e:
            print("ERR", e)
        else:
            m = load_model("tests/data/models/float.tflite", threads=1)
            (y,) = m.predict([np.zeros((1, 8, 8, 3), np.float32)])
            print(name, m.backend, m.backend_version is not None, y.shape)
    """, ["ai_edge_litert"])
    assert out.returncode == 0, out.stderr
    has = {n for n, _ in available_backends()}
    if "tflite_runtime" in has:
        assert out.stdout.strip() == "tflite_runtime tflite_runtime True (1, 4)"
    elif "tensorflow.lite" in has:  # the whole path works on TensorFlow's own interpreter too
        assert out.stdout.strip() == "tensorflow.lite tensorflow.lite True (1, 4)"
    else:
        assert out.stdout.startswith("ERR no TFLite runtime")


# --------------------------------------------------------------------------- loading and running


def test_load_float_model_specs_timings_and_predict(float_model, backend):
    m = load_model(float_model, threads=1)
    assert isinstance(m, LoadedModel)
    assert (m.backend, m.backend_version) == backend
    assert (m.delegate, m.threads, m.cpu_fallback) == ("cpu", 1, None)
    (inp,), (out,) = m.inputs, m.outputs
    assert (inp.shape, inp.dtype, inp.quantized) == ((1, 8, 8, 3), "float32", False)
    assert (out.shape, out.dtype) == ((1, 4), "float32")
    assert set(m.load_ms) == {"file_read", "interpreter_build", "delegate", "allocate", "first_invoke"}
    assert all(m.load_ms[k] >= 0 for k in ("file_read", "interpreter_build", "allocate"))
    assert m.load_ms["first_invoke"] is None
    x = np.random.default_rng(0).uniform(-1, 1, (1, 8, 8, 3)).astype(np.float32)
    (y,) = m.predict([x])
    assert y.dtype == np.float32 and y.shape == (1, 4)
    assert np.isclose(y.sum(), 1.0, atol=1e-5)  # softmax
    m.set_input(0, x)
    assert m.first_invoke() >= 0 and m.load_ms["first_invoke"] is not None
    assert np.array_equal(m.get_output(0), y)


def test_get_output_returns_a_copy(float_model):
    m = load_model(float_model)
    m.predict([np.zeros((1, 8, 8, 3), np.float32)])
    a = m.get_output(0)
    a[...] = 42
    assert not np.array_equal(m.get_output(0), a)


@pytest.mark.parametrize("name,dtype", [("int8_io_model", "int8"), ("uint8_io_model", "uint8"),
                                        ("int8_model", "float32")])
def test_quantized_variants_agree_with_float_model(request, float_model, name, dtype):
    rng = np.random.default_rng(1)
    xs = [rng.uniform(-1, 1, (1, 8, 8, 3)).astype(np.float32) for _ in range(5)]
    ref = load_model(float_model)
    q = load_model(request.getfixturevalue(name))
    assert q.inputs[0].dtype == dtype and q.outputs[0].dtype == dtype
    for x in xs:
        (yf,), (yq,) = ref.predict([x]), q.predict([x])
        assert yq.dtype == np.float32
        assert np.max(np.abs(yf - yq)) < 0.02  # a couple of output quantization steps (1/256)


def test_predict_on_int8_io_equals_manual_quantize_invoke_dequantize(int8_io_model):
    m = load_model(int8_io_model)
    x = np.random.default_rng(2).uniform(-1, 1, (1, 8, 8, 3)).astype(np.float32)
    (y,) = m.predict([x])
    i, o = m.inputs[0], m.outputs[0]
    m.set_input(0, np.clip(np.rint(x / i.scale) + i.zero_point, -128, 127).astype(np.int8))
    m.invoke()
    raw = m.get_output(0)
    assert raw.dtype == np.int8
    assert np.array_equal(y, (raw.astype(np.float32) - o.zero_point) * np.float32(o.scale))


def test_two_output_model(two_output_model):
    m = load_model(two_output_model)
    assert sorted(o.shape for o in m.outputs) == [(1, 2), (1, 4)]
    ys = m.predict([np.zeros((1, 8, 8, 3), np.float32)])
    assert [y.shape for y in ys] == [o.shape for o in m.outputs]


def test_predict_checks_input_count_and_shape(float_model):
    m = load_model(float_model)
    with pytest.raises(ValueError, match="takes 1 input"):
        m.predict([])
    with pytest.raises(ValueError, match="expected shape"):
        m.predict([np.zeros((1, 4, 4, 3), np.float32)])
    (y,) = m.predict([np.zeros((8, 8, 3), np.float32)])  # same size: reshaped
    assert y.shape == (1, 4)


def test_runtime_dict_for_report(float_model, backend):
    rt = load_model(float_model, threads=2).runtime_dict()
    assert rt == {"backend": backend[0], "version": backend[1], "delegate": "cpu", "threads": 2,
                  "cpu_fallback_ops": None}


# --------------------------------------------------------------------------- bad models: one line, a reason


@pytest.mark.parametrize("fixture,pattern", [
    ("truncated_model", r"corrupt or truncated TFLite model"),
    ("not_a_model", r"not a TFLite model \(missing the 'TFL3' identifier"),
    ("custom_op_model", r"needs custom op 'EdgepipeTestOp'.*re-convert"),
    ("edgetpu_like_model", r"compiled for the Edge TPU.*edgetpu delegate"),
])
def test_bad_models_raise_one_line_reason(request, fixture, pattern):
    with pytest.raises(RuntimeLoadError, match=pattern) as e:
        load_model(request.getfixturevalue(fixture))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("native", [IndexError("_Map_base::at"), OverflowError("too big"), MemoryError(),
                                    KeyError("tensor 7")])
def test_any_native_error_while_allocating_is_a_load_error(float_model, monkeypatch, native):
    """pybind11 turns std::out_of_range into IndexError: a malformed model must not reach callers as a bug."""
    from edgepipe.device import runtime

    real = get_backend()

    class Refusing:
        def __init__(self, **kw):
            self.inner = real.Interpreter(**kw)

        def allocate_tensors(self):
            raise native

    fake = runtime._Backend(real.info, real.version, Refusing, real.load_delegate)
    monkeypatch.setattr(runtime, "get_backend", lambda name=None: fake)
    with pytest.raises(RuntimeLoadError, match=r"cannot load model") as e:
        load_model(float_model)
    assert "\n" not in str(e.value)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(RuntimeLoadError, match="no such file"):
        load_model(tmp_path / "absent.tflite")
    (tmp_path / "empty.tflite").write_bytes(b"")
    with pytest.raises(RuntimeLoadError, match="only 0 bytes"):
        load_model(tmp_path / "empty.tflite")


def test_bad_threads(float_model):
    for bad in (0, -1, "2"):
        with pytest.raises(RuntimeLoadError, match="threads must be a positive integer"):
            load_model(float_model, threads=bad)


def test_native_chatter_stays_off_stderr(float_model):
    code = (f"from edgepipe.device.runtime import load_model; import numpy as np; m = load_model({str(float_model)!r}); "
            "m.predict([np.zeros((1,8,8,3), np.float32)]); print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.stdout.strip() == "ok"
    assert out.stderr == ""  # e.g. "INFO: Created TensorFlow Lite XNNPACK delegate for CPU." is captured


def test_default_threads_reports_what_ran(float_model, backend):
    from edgepipe.device.runtime import DEFAULTS_TO_ONE_THREAD

    m = load_model(float_model)
    assert m.threads == (1 if backend[0] in DEFAULTS_TO_ONE_THREAD else None)
    assert load_model(float_model, threads=2).threads == 2


@pytest.mark.edgetpu
def test_edgetpu_delegate_on_real_hardware(float_model):
    # A CPU model under the TPU delegate: loads, runs, and says nothing ran on the TPU.
    m = load_model(float_model, delegate="edgetpu")
    fb = m.cpu_fallback
    assert fb.cpu_ops == fb.total_ops and "not compiled for the Edge TPU" in fb.note
    assert m.predict([np.zeros((1, 8, 8, 3), np.float32)])[0].shape == (1, 4)
