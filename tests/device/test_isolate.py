"""Bad models through edgerun: one-line runtime errors, crashes contained by the child-process probe."""
from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _edgerun(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONFAULTHANDLER"}
    return subprocess.run([sys.executable, "-m", "edgepipe.device.cli", *args], capture_output=True, text=True,
                          timeout=180, cwd=ROOT, env=env, stdin=subprocess.DEVNULL)


@pytest.fixture
def no_inputs_model(float_model, tmp_path, changed_model):
    """A model whose subgraph declares no inputs: the first invoke fails with 'Input tensor 0 lacks data'."""
    def drop_inputs(m):
        m.subgraphs[0].inputs = []
    path = tmp_path / "no_inputs.tflite"
    path.write_bytes(changed_model(float_model, drop_inputs))
    return path


@pytest.fixture
def nan_scale_model(uint8_io_model, tmp_path, changed_model):
    """uint8_io with a NaN quantization scale on its quantize op's output (SIGSEGV in allocate_tensors on
    ai_edge_litert 2.3)."""
    def nan_scale(m):
        m.subgraphs[0].tensors[8].quantization.scale = [math.nan]
    path = tmp_path / "nan_scale.tflite"
    path.write_bytes(changed_model(uint8_io_model, nan_scale))
    return path


def test_runtime_error_on_first_invoke_is_one_typed_line(no_inputs_model):
    from edgepipe.device.bench import run_bench
    from edgepipe.device.runtime import ModelRunError, Stage

    with pytest.raises(ModelRunError) as e:
        run_bench(no_inputs_model, runs=1, warmup=0)
    assert e.value.stage == Stage.FIRST_INVOKE.value and e.value.model == str(no_inputs_model)
    assert "lacks data" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("isolate", ["--isolate", "--no-isolate"])
def test_cli_bench_prints_one_error_line_not_a_traceback(no_inputs_model, isolate):
    out = _edgerun("bench", str(no_inputs_model), "--runs", "1", "--warmup", "0", "--min-secs", "0", isolate)
    assert out.returncode == 1, out.stderr
    assert "Traceback" not in out.stderr
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "while running the first invoke" in lines[0]


def test_probe_of_a_good_model_passes(float_model):
    from edgepipe.device.isolate import preflight, probe_model

    r = probe_model(float_model)
    assert r.ok and not r.crashed and r.stage is None and r.signal is None and r.exit_status == 0
    assert r.backend and r.elapsed_ms > 0
    assert preflight(float_model) is None  # auto mode: a sound graph is not probed
    assert preflight(float_model, isolate=True).ok


def test_probe_reports_a_refusal_with_its_stage(no_inputs_model):
    from edgepipe.device.isolate import ModelRefusedError, preflight, probe_model

    r = probe_model(no_inputs_model)
    assert not r.ok and r.expected and not r.crashed and r.signal is None
    assert r.stage == "running the first invoke" and "lacks data" in r.reason
    with pytest.raises(ModelRefusedError, match="lacks data"):
        preflight(no_inputs_model, isolate=True)


def test_a_crashing_model_is_contained_and_named(nan_scale_model):
    from edgepipe.device.graphcheck import doubts
    from edgepipe.device.isolate import ModelCrashError, needs_probe, preflight, probe_model

    assert doubts(nan_scale_model.read_bytes()) and needs_probe(nan_scale_model)
    r = probe_model(nan_scale_model)
    if r.ok or r.expected:
        pytest.skip(f"this runtime does not crash on a NaN scale ({r.reason or 'loads it'})")
    assert r.signal == "SIGSEGV" and r.stage == "allocating tensors" and r.crashed
    assert "allocate_tensors" in r.fault_log  # the child's fault dump is kept for logs
    with pytest.raises(ModelCrashError) as e:
        preflight(nan_scale_model)  # auto: the graph looks malformed, so it is probed
    assert str(e.value).startswith(f"{nan_scale_model} crashed the runtime with SIGSEGV while allocating tensors: "
                                   "the model is malformed or unsupported by ")

    out = _edgerun("bench", str(nan_scale_model), "--runs", "1", "--warmup", "0")
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert [ln for ln in out.stderr.splitlines() if ln.strip()] == [f"Error: {e.value}"]

    plain = _edgerun("bench", str(nan_scale_model), "--runs", "1", "--warmup", "0", "--no-isolate")
    assert plain.returncode == -11  # the crash itself, no longer hidden: the fault dump reaches stderr
    assert "Fatal Python error: Segmentation fault" in plain.stderr and "allocate_tensors" in plain.stderr
    assert "Traceback" not in plain.stderr


def test_cli_run_contains_the_crash_too(nan_scale_model, tmp_path):
    from edgepipe.device.isolate import probe_model

    if not probe_model(nan_scale_model).crashed:
        pytest.skip("this runtime does not crash on a NaN scale")
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    out = _edgerun("run", str(nan_scale_model), "--source", str(tmp_path / "x.png"))
    assert out.returncode == 1 and "Traceback" not in out.stderr
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "crashed the runtime with SIGSEGV while allocating tensors" in lines[0]


def test_crash_reason_wording():
    from edgepipe.device.isolate import ProbeResult, crash_reason

    seg = ProbeResult(False, stage="allocating tensors", signal="SIGSEGV", backend="ai_edge_litert",
                      version="2.3.0", exit_status=-11)
    assert crash_reason(seg) == ("crashed the runtime with SIGSEGV while allocating tensors: the model is "
                                 "malformed or unsupported by ai_edge_litert 2.3.0")
    assert seg.crashed
    quiet_exit = ProbeResult(False, stage="building the interpreter", exit_status=134)
    assert crash_reason(quiet_exit) == ("made the runtime exit with status 134 while building the interpreter: "
                                        "the model is malformed or unsupported by this runtime")


def test_a_probe_that_overruns_its_deadline_is_killed(float_model):
    from edgepipe.device.isolate import probe_model

    r = probe_model(float_model, timeout_s=0.01)
    assert not r.ok and r.crashed and "did not finish within 0.01 s" in r.reason
    assert r.exit_status is not None and r.exit_status < 0  # killed, and reaped
