"""The flatbuffer pre-check that keeps truncated or crash-prone models away from native code."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# --------------------------------------------------------------------------- flatbuffer pre-check


def test_flatcheck_accepts_every_good_model(models_dir):
    from edgepipe.device.flatcheck import problem

    for name in ("float", "int8_float_io", "int8_io", "uint8_io", "two_outputs", "custom_op", "edgetpu_like"):
        assert problem((models_dir / f"{name}.tflite").read_bytes()) is None, name


def test_flatcheck_catches_every_truncation(float_model, two_output_model):
    from edgepipe.device.flatcheck import problem

    for model in (float_model, two_output_model):
        data = model.read_bytes()
        missed = [n for n in range(len(data)) if problem(data[:n]) is None]
        assert missed == []


def test_flatcheck_catches_root_offset_past_the_end(float_model):
    from edgepipe.device.flatcheck import problem

    data = bytearray(float_model.read_bytes())
    data[0:4] = (len(data) + 8).to_bytes(4, "little")  # root table past the end
    assert "outside" in problem(bytes(data))


def test_truncated_models_never_crash_the_runtime(float_model, int8_io_model):
    # In a child process: a runtime that segfaults on a bad buffer (tflite-runtime
    # 2.14 does without our pre-check) must show up as a failure, not kill pytest.
    code = textwrap.dedent(f"""
        from edgepipe.device.runtime import load_model, RuntimeLoadError
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
    from edgepipe.device.flatcheck import FULLY_CONNECTED, operators

    ops = operators(int8_no_bias_model.read_bytes())
    fc = [o for o in ops if o["code"] == FULLY_CONNECTED]
    assert len(fc) == 1 and fc[0]["inputs"][2] == -1 and fc[0]["input_types"][:2] == ["int8", "int8"]
    fc = [o for o in operators(int8_io_model.read_bytes()) if o["code"] == FULLY_CONNECTED]
    assert fc[0]["inputs"][2] >= 0 and fc[0]["input_types"][2] == "int32"
    assert [o["custom"] for o in operators((int8_io_model.parent / "custom_op.tflite").read_bytes())][0] == \
        "EdgepipeTestOp"


def test_known_tflite_runtime_crash_is_refused_on_arm(int8_no_bias_model, int8_io_model):
    from edgepipe.device.flatcheck import known_crash

    data = int8_no_bias_model.read_bytes()
    assert "crashes on ARM" in known_crash("tflite_runtime", "2.14.0", data, machine="aarch64")
    assert "crashes on ARM" in known_crash("tflite_runtime", "2.11.0", data, machine="armv7l")
    assert known_crash("tflite_runtime", "2.14.0", int8_io_model.read_bytes(), machine="aarch64") is None
    assert known_crash("ai_edge_litert", "2.3.0", data, machine="aarch64") is None
    assert known_crash("tflite_runtime", "2.15.0", data, machine="aarch64") is None
    assert known_crash("tflite_runtime", "2.14.0", data, machine="x86_64") is None


def test_int8_no_bias_model_loads_or_is_refused_never_crashes(int8_no_bias_model, backend):
    # In a child process so that a crash would be a failure, not a dead test run.
    code = (f"from edgepipe.device.runtime import load_model, RuntimeLoadError\nimport numpy as np\n"
            f"try:\n    m = load_model({str(int8_no_bias_model)!r})\n"
            "    print('ran', m.predict([np.zeros(m.inputs[0].shape, np.float32)])[0].shape)\n"
            "except RuntimeLoadError as e:\n    print('refused', e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, (out.returncode, out.stderr[-300:])
    import platform

    arm_old = backend[0] == "tflite_runtime" and platform.machine().startswith(("aarch64", "arm"))
    assert out.stdout.startswith("refused" if arm_old else "ran (1, 4)"), out.stdout


# --------------------------------------------------------------------------- graph doubts


def test_sound_graphs_raise_no_doubts(models_dir):
    from edgepipe.device.graphcheck import doubts

    for p in sorted(models_dir.glob("*.tflite")):
        if p.name not in ("not_a_model.tflite", "truncated.tflite"):
            assert doubts(p.read_bytes()) == [], p.name


def _set(path: str, value):
    def change(m):
        *head, last = path.split(".")
        obj = m
        for part in head:
            obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
        if last.isdigit():
            obj[int(last)] = value
        else:
            setattr(obj, last, value)
    return change


@pytest.mark.parametrize("path, value, expect", [
    ("subgraphs.0.outputs", [-1], "outputs include index -1"),
    ("subgraphs.0.inputs", [0, 0], "inputs repeat a tensor"),
    ("subgraphs.0.operators.1.inputs.1", -1, "operator 1 has no input 1"),
    ("subgraphs.0.operators.0.outputs.0", 11, "writes tensor 11, already written by operator"),
    ("subgraphs.0.operators.0.outputs.0", 0, "a constant or subgraph input"),
    ("subgraphs.0.operators.2.inputs.0", 10, "reads tensor 10 before anything writes it"),
    ("subgraphs.0.tensors.8.quantization.scale", [float("nan")], "scale that is not a finite positive number"),
])
def test_crash_prone_graphs_are_doubted(models_dir, changed_model, path, value, expect):
    from edgepipe.device.flatcheck import problem
    from edgepipe.device.graphcheck import doubts

    data = changed_model(models_dir / "uint8_io.tflite", _set(path, value))
    assert problem(data) is None  # structurally sound: only the graph is wrong
    found = doubts(data)
    assert any(expect in d for d in found), found
