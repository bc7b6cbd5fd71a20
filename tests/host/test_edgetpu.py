"""Parsing edgetpu_compiler output (format as documented by Coral and seen in its logs)."""
from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from edgepipe.pipeline import edgetpu

SUMMARY = """Edge TPU Compiler version 16.0.384591198
Started a compilation timeout timer of 180 seconds.

Model compiled successfully in 1354 ms.

Input model: model.tflite
Input size: 3.94MiB
Output model: model_edgetpu.tflite
Output size: 4.04MiB
On-chip memory used for caching model parameters: 3.78MiB
On-chip memory remaining for caching model parameters: 4.25MiB
Off-chip memory used for streaming uncached model parameters: 41.75KiB
Number of Edge TPU subgraphs: 1
Total number of operations: 72
Operation log: model_edgetpu.log

Model successfully compiled but not all operations are supported by the Edge TPU. A percentage of the model will instead run on the CPU, which is slower. If possible, consider updating your model to use only operations supported by the Edge TPU. For details, visit g.co/coral/model-reqs.
Number of operations that will run on Edge TPU: 65
Number of operations that will run on CPU: 7
See the operation log file for individual operation details.
"""

LOG = """Edge TPU Compiler version 16.0.384591198
Input: model.tflite
Output: model_edgetpu.tflite

Operator                       Count      Status

CONV_2D                        35         Mapped to Edge TPU
DEPTHWISE_CONV_2D              17         Mapped to Edge TPU
ADD                            10         Mapped to Edge TPU
QUANTIZE                       1          Mapped to Edge TPU
MEAN                           1          Operation is otherwise supported, but not mapped due to some unspecified limitation
FULLY_CONNECTED                1          More than one subgraph is not supported
SOFTMAX                        1          More than one subgraph is not supported
DEQUANTIZE                     2          Operation is working on an unsupported data type
TRANSPOSE                      2          Operation not supported
"""


def test_summary_sizes_and_counts():
    p = edgetpu.parse_output(SUMMARY)
    assert p["compiler_version"] == "16.0.384591198"
    assert p["compile_ms"] == 1354
    assert p["on_chip_memory_used_bytes"] == round(3.78 * 1024 ** 2)
    assert p["on_chip_memory_remaining_bytes"] == round(4.25 * 1024 ** 2)
    assert p["off_chip_memory_used_bytes"] == round(41.75 * 1024)
    assert (p["subgraphs"], p["total_ops"], p["tpu_ops"], p["cpu_ops"]) == (1, 72, 65, 7)
    assert p["log_file"] == "model_edgetpu.log"
    assert p["ops"] == [] and not p["fully_mapped"]


def test_operation_log_rows_and_reasons():
    p = edgetpu.parse_output(LOG)
    assert len(p["ops"]) == 9
    assert p["ops"][0] == {"op": "CONV_2D", "count": 35, "status": "Mapped to Edge TPU", "on_tpu": True}
    assert p["tpu_ops"] == 63 and p["cpu_ops"] == 7
    assert "Operation not supported" in p["cpu_reasons"]
    assert "More than one subgraph is not supported" in p["cpu_reasons"]


def test_summary_then_log_keeps_summary_counts_and_log_rows_once():
    p = edgetpu.parse_output(SUMMARY + LOG + "\n" + LOG)
    assert len(p["ops"]) == 9  # the table is read once even when printed twice
    assert p["tpu_ops"] == 65 and p["cpu_ops"] == 7  # the compiler's own summary wins


@pytest.mark.parametrize("text,expected", [("0.00B", 0), ("512B", 512), ("1.50KiB", 1536), ("2.00GiB", 2 << 30),
                                           ("n/a", None)])
def test_parse_size(text, expected):
    assert edgetpu.parse_size(text) == expected


def test_compile_model_runs_the_compiler_and_reads_its_log(tmp_path, monkeypatch):
    """A stand-in compiler on PATH that writes the documented files and output."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    script = bindir / "edgetpu_compiler"
    (tmp_path / "summary.txt").write_text(SUMMARY)
    (tmp_path / "log.txt").write_text(LOG)
    script.write_text(f"""#!/bin/sh
# args: -s -o OUTDIR MODEL
out="$3"; model="$4"; stem=$(basename "$model" .tflite)
cp "$model" "$out/${{stem}}_edgetpu.tflite"
cp "{tmp_path}/log.txt" "$out/${{stem}}_edgetpu.log"
cat "{tmp_path}/summary.txt"
""")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    model = tmp_path / "work" / "model.tflite"
    model.parent.mkdir()
    model.write_bytes(b"model")
    p = edgetpu.compile_model(model, model.parent)
    assert p["model_file"] == "model_edgetpu.tflite"
    assert (model.parent / "model_edgetpu.tflite").read_bytes() == b"model"
    assert p["cpu_ops"] == 7 and len(p["ops"]) == 9


def test_compiler_failure_is_one_line(tmp_path, monkeypatch):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    script = bindir / "edgetpu_compiler"
    script.write_text("#!/bin/sh\necho 'Edge TPU Compiler version 16.0'\necho 'Compilation failed: "
                      "Compilation failed due to large activation tensors in model.' >&2\nexit 1\n")
    script.chmod(0o755)
    monkeypatch.setenv("PATH", str(bindir))
    with pytest.raises(edgetpu.EdgeTPUError, match="large activation tensors"):
        edgetpu.compile_model(Path(tmp_path / "m.tflite"), tmp_path)
