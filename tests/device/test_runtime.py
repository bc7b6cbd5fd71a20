"""device.runtime / device.delegates on the tiny committed models (no TensorFlow needed)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from device import delegates as dl
from device.runtime import (BACKENDS, LoadedModel, RuntimeLoadError, TensorSpec, available_backends,
                            get_backend, load_model, parse_delegate)

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
        from device.runtime import load_model, RuntimeLoadError, available_backends
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
        from device.runtime import get_backend, load_model, RuntimeLoadError
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
    ("edgetpu_like_model", r"compiled for the Edge TPU.*--delegate edgetpu"),
])
def test_bad_models_raise_one_line_reason(request, fixture, pattern):
    with pytest.raises(RuntimeLoadError, match=pattern) as e:
        load_model(request.getfixturevalue(fixture))
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
    code = (f"from device.runtime import load_model; import numpy as np; m = load_model({str(float_model)!r}); "
            "m.predict([np.zeros((1,8,8,3), np.float32)]); print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.stdout.strip() == "ok"
    assert out.stderr == ""  # e.g. "INFO: Created TensorFlow Lite XNNPACK delegate for CPU." is captured


# --------------------------------------------------------------------------- delegates


def test_parse_delegate_specs():
    assert parse_delegate("cpu").kind == "cpu" and parse_delegate("XNNPACK").label == "xnnpack"
    assert parse_delegate("edgetpu:usb").options == {"device": "usb"}
    assert parse_delegate("edgetpu:pci:0").options == {"device": "pci:0"}
    assert parse_delegate("edgetpu:1").options == {"device": ":1"}
    assert parse_delegate("edgetpu", edgetpu_device=":0").options == {"device": ":0"}
    assert parse_delegate("edgetpu").options == {}
    assert parse_delegate("/opt/x/libfoo.so").kind == "external"
    assert parse_delegate("libhexagon_delegate.so").library == "libhexagon_delegate.so"
    with pytest.raises(RuntimeLoadError, match="bad Edge TPU device"):
        parse_delegate("edgetpu:firewire")
    with pytest.raises(RuntimeLoadError, match="unknown delegate 'npu'"):
        parse_delegate("npu")


def test_find_delegates_shape_and_env_path(tmp_path, monkeypatch):
    d = dl.find_delegates()
    assert d["cpu"]["available"] is True
    assert set(d) == {"cpu", "edgetpu", "gpu"} and isinstance(d["edgetpu"]["devices"], list)
    fake = tmp_path / dl.EDGETPU_LIBS["linux"][0]
    fake.write_bytes(b"\x7fELF not really")
    monkeypatch.setattr(dl, "_platform_key", lambda: "linux")
    monkeypatch.setenv("EDGEPIPE_DELEGATE_PATH", str(tmp_path))
    assert dl.find_delegates()["edgetpu"] == {"available": True, "library": str(fake),
                                              "devices": dl.edgetpu_devices()}


def test_edgetpu_library_missing_gives_install_hint(float_model, monkeypatch):
    monkeypatch.setattr(dl, "find_library", lambda names: None)
    with pytest.raises(RuntimeLoadError, match="Edge TPU delegate library not found.*libedgetpu1-std"):
        load_model(float_model, delegate="edgetpu")


def test_edgetpu_library_unloadable_gives_reason(float_model, tmp_path, monkeypatch):
    (tmp_path / "libedgetpu.so.1").write_bytes(b"garbage")
    monkeypatch.setenv("EDGEPIPE_DELEGATE_PATH", str(tmp_path))
    monkeypatch.setattr(dl, "_platform_key", lambda: "linux")
    with pytest.raises(RuntimeLoadError, match="cannot be loaded.*architecture") as e:
        load_model(float_model, delegate="edgetpu")
    assert "\n" not in str(e.value)


def test_gpu_delegate_missing(float_model, monkeypatch):
    monkeypatch.setattr(dl, "find_library", lambda names: None)
    with pytest.raises(RuntimeLoadError, match="GPU delegate library not found.*--delegate /path"):
        load_model(float_model, delegate="gpu")


def test_external_delegate_missing_file_and_non_delegate_library(float_model, tmp_path, libm_path):
    with pytest.raises(RuntimeLoadError, match="delegate library not found"):
        load_model(float_model, delegate=str(tmp_path / "libnothere.so"))
    with pytest.raises(RuntimeLoadError, match="is not a TFLite delegate"):
        load_model(float_model, delegate=str(libm_path))


def test_external_delegate_loads_and_reports_cpu_fallback(float_model, noop_delegate):
    m = load_model(float_model, delegate=str(noop_delegate), threads=1)
    assert m.delegate == str(noop_delegate) and m.load_ms["delegate"] > 0
    fb = m.cpu_fallback
    assert (fb.total_ops, fb.delegated_ops, fb.cpu_ops) == (5, 0, 5)
    assert fb.cpu_op_names == {"CONV_2D": 1, "DEPTHWISE_CONV_2D": 1, "MEAN": 1, "FULLY_CONNECTED": 1,
                               "SOFTMAX": 1}
    assert m.runtime_dict()["cpu_fallback_ops"] == 5
    ref = load_model(float_model)
    x = np.random.default_rng(3).uniform(-1, 1, (1, 8, 8, 3)).astype(np.float32)
    assert np.allclose(m.predict([x])[0], ref.predict([x])[0], atol=1e-6)


def test_external_delegate_refusing_to_start_reports_its_message(float_model, noop_delegate):
    with pytest.raises(RuntimeLoadError, match="failed to load.*refused to start") as e:
        load_model(float_model, delegate=str(noop_delegate), delegate_options={"fail": "1"})
    assert "\n" not in str(e.value)


def _ops_for_float_model():
    # Op details as the runtime reports them for float.tflite (see test above), plus one
    # delegate node that took DEPTHWISE_CONV_2D..FULLY_CONNECTED (tensors 6 -> 9).
    return [
        {"op_name": "CONV_2D", "inputs": [0, 5, 4], "outputs": [6]},
        {"op_name": "DEPTHWISE_CONV_2D", "inputs": [6, 1, 4], "outputs": [7]},
        {"op_name": "MEAN", "inputs": [7, 3], "outputs": [8]},
        {"op_name": "FULLY_CONNECTED", "inputs": [8, 2, -1], "outputs": [9]},
        {"op_name": "SOFTMAX", "inputs": [9], "outputs": [10]},
        {"op_name": "DELEGATE", "inputs": [6, 1, 4, 3, 2], "outputs": [9]},
    ]


def test_cpu_fallback_counts_ops_outside_delegate_partitions():
    plan = dl.DelegatePlan("external", "npu.so", "npu.so")
    fb = dl.cpu_fallback(_ops_for_float_model(), plan, b"")
    assert (fb.total_ops, fb.delegated_ops, fb.cpu_ops) == (5, 3, 2)
    assert fb.cpu_op_names == {"CONV_2D": 1, "SOFTMAX": 1}
    assert dl.cpu_fallback(_ops_for_float_model(), dl.DelegatePlan("cpu", "cpu"), b"") is None


def test_cpu_fallback_edgetpu_custom_ops_count_as_accelerated():
    ops = [{"op_name": "edgetpu-custom-op", "inputs": [0], "outputs": [1]},
           {"op_name": "SOFTMAX", "inputs": [1], "outputs": [2]}]
    plan = dl.DelegatePlan("edgetpu", "edgetpu", "libedgetpu.so.1")
    fb = dl.cpu_fallback(ops, plan, b"...edgetpu-custom-op...")
    assert (fb.delegated_ops, fb.cpu_ops, fb.note) == (1, 1, None)
    fb = dl.cpu_fallback(ops[1:], plan, b"plain model")
    assert fb.cpu_ops == 1 and "not compiled for the Edge TPU" in fb.note


def test_capture_stderr_collects_native_output(capfd):
    with dl.capture_stderr() as cap:
        os.write(2, b"INFO: Created TensorFlow Lite XNNPACK delegate for CPU.\nWARNING: keep me\n")
    assert cap.text() == "INFO: Created TensorFlow Lite XNNPACK delegate for CPU.\nWARNING: keep me\n"
    assert capfd.readouterr().err == "WARNING: keep me\n"  # chatter dropped, the rest passed on
    with pytest.raises(KeyError):
        with dl.capture_stderr() as cap:
            os.write(2, b"reason for the failure\n")
            raise KeyError
    assert cap.text() == "reason for the failure\n" and capfd.readouterr().err == ""  # used in the error instead


def test_capture_stderr_is_safe_across_threads(capfd):
    import threading

    def work(i):
        for _ in range(50):
            with dl.capture_stderr():
                os.write(2, f"INFO: {i}\n".encode())
    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    os.write(2, b"still the real stderr\n")
    assert capfd.readouterr().err == "still the real stderr\n"


# --------------------------------------------------------------------------- flatbuffer pre-check


def test_flatcheck_accepts_every_good_model(models_dir):
    from device.flatcheck import problem

    for name in ("float", "int8_float_io", "int8_io", "uint8_io", "two_outputs", "custom_op", "edgetpu_like"):
        assert problem((models_dir / f"{name}.tflite").read_bytes()) is None, name


def test_flatcheck_catches_every_truncation(float_model, two_output_model):
    from device.flatcheck import problem

    for model in (float_model, two_output_model):
        data = model.read_bytes()
        missed = [n for n in range(len(data)) if problem(data[:n]) is None]
        assert missed == []


def test_flatcheck_catches_root_offset_past_the_end(float_model):
    from device.flatcheck import problem

    data = bytearray(float_model.read_bytes())
    data[0:4] = (len(data) + 8).to_bytes(4, "little")  # root table past the end
    assert "outside" in problem(bytes(data))


def test_truncated_models_never_crash_the_runtime(float_model, int8_io_model):
    # In a child process: a runtime that segfaults on a bad buffer (tflite-runtime
    # 2.14 does without our pre-check) must show up as a failure, not kill pytest.
    code = textwrap.dedent(f"""
        from device.runtime import load_model, RuntimeLoadError
        ok = errors = 0
        for path in ({str(float_model)!r}, {str(int8_io_model)!r}):
            data = open(path, 'rb').read()
            for n in range(16, len(data), 37):
                import tempfile, os
                with tempfile.NamedTemporaryFile(suffix='.tflite', delete=False) as f:
                    f.write(data[:n])
                try:
                    load_model(f.name)
                    ok += 1
                except RuntimeLoadError as e:
                    assert 'corrupt or truncated' in str(e), str(e)
                    errors += 1
                finally:
                    os.unlink(f.name)
        print(ok, errors)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, (out.returncode, out.stderr[-500:])
    ok, errors = map(int, out.stdout.split())
    assert ok == 0 and errors > 100


def test_operators_summary(int8_no_bias_model, int8_io_model):
    from device.flatcheck import FULLY_CONNECTED, operators

    ops = operators(int8_no_bias_model.read_bytes())
    fc = [o for o in ops if o["code"] == FULLY_CONNECTED]
    assert len(fc) == 1 and fc[0]["inputs"][2] == -1 and fc[0]["input_types"][:2] == ["int8", "int8"]
    fc = [o for o in operators(int8_io_model.read_bytes()) if o["code"] == FULLY_CONNECTED]
    assert fc[0]["inputs"][2] >= 0 and fc[0]["input_types"][2] == "int32"
    assert [o["custom"] for o in operators((int8_io_model.parent / "custom_op.tflite").read_bytes())][0] == \
        "EdgepipeTestOp"


def test_known_tflite_runtime_crash_is_refused_on_arm(int8_no_bias_model, int8_io_model):
    from device.flatcheck import known_crash

    data = int8_no_bias_model.read_bytes()
    assert "crashes on ARM" in known_crash("tflite_runtime", "2.14.0", data, machine="aarch64")
    assert "crashes on ARM" in known_crash("tflite_runtime", "2.11.0", data, machine="armv7l")
    assert known_crash("tflite_runtime", "2.14.0", int8_io_model.read_bytes(), machine="aarch64") is None
    assert known_crash("ai_edge_litert", "2.3.0", data, machine="aarch64") is None
    assert known_crash("tflite_runtime", "2.15.0", data, machine="aarch64") is None
    assert known_crash("tflite_runtime", "2.14.0", data, machine="x86_64") is None


def test_int8_no_bias_model_loads_or_is_refused_never_crashes(int8_no_bias_model, backend):
    # In a child process so that a crash would be a failure, not a dead test run.
    code = (f"from device.runtime import load_model, RuntimeLoadError\nimport numpy as np\n"
            f"try:\n    m = load_model({str(int8_no_bias_model)!r})\n"
            "    print('ran', m.predict([np.zeros(m.inputs[0].shape, np.float32)])[0].shape)\n"
            "except RuntimeLoadError as e:\n    print('refused', e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, (out.returncode, out.stderr[-300:])
    import platform

    arm_old = backend[0] == "tflite_runtime" and platform.machine().startswith(("aarch64", "arm"))
    assert out.stdout.startswith("refused" if arm_old else "ran (1, 4)"), out.stdout


def test_default_threads_reports_what_ran(float_model, backend):
    from device.runtime import DEFAULTS_TO_ONE_THREAD

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
