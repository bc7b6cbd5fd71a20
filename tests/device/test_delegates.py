"""edgepipe.device.delegates: delegate specs, loading failures with reasons, CPU fallback counts."""
from __future__ import annotations

import os

import numpy as np
import pytest

from edgepipe.device import delegates as dl
from edgepipe.device.runtime import RuntimeLoadError, load_model, parse_delegate



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
