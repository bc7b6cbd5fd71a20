"""Edge TPU compilation: run `edgetpu_compiler` when present and parse its output.

The compiler prints a summary (sizes, on-chip/off-chip memory, op counts) and
writes an operation log with one row per (operator, status). Both are plain
text; this module turns them into the structured `edgetpu` block of the
manifest so users see which ops stay on the CPU and why.
"""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Optional
from edgepipe.device.errors import EdgepipeError

COMPILER = "edgetpu_compiler"
MAPPED = "Mapped to Edge TPU"

_UNITS = {"B": 1, "KiB": 1024, "MiB": 1024 ** 2, "GiB": 1024 ** 3}
_SIZE_FIELDS = {
    "Input size": "input_size_bytes",
    "Output size": "output_size_bytes",
    "On-chip memory used for caching model parameters": "on_chip_memory_used_bytes",
    "On-chip memory remaining for caching model parameters": "on_chip_memory_remaining_bytes",
    "Off-chip memory used for streaming uncached model parameters": "off_chip_memory_used_bytes",
}
_INT_FIELDS = {
    "Number of Edge TPU subgraphs": "subgraphs",
    "Total number of operations": "total_ops",
    "Number of operations that will run on Edge TPU": "tpu_ops",
    "Number of operations that will run on CPU": "cpu_ops",
}
_OP_ROW = re.compile(r"^([A-Z][A-Z0-9_]*)\s+(\d+)\s+(\S.*?)\s*$")


class EdgeTPUError(EdgepipeError, RuntimeError):
    """The compiler ran and failed; message is user-facing."""


def find_compiler() -> Optional[str]:
    return shutil.which(COMPILER)


def parse_size(text: str) -> Optional[int]:
    """'3.78MiB' -> bytes; None if not a size."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*(B|KiB|MiB|GiB)\s*", text)
    if not m:
        return None
    return int(round(float(m.group(1)) * _UNITS[m.group(2)]))


def parse_output(text: str) -> dict:
    """Parse the compiler's stdout (with ``-s``) and/or its ``*_edgetpu.log``.

    Returns compiler version, compile time, sizes and memory in bytes, op
    counts, and ``ops``: rows of {op, count, status, on_tpu}. Rows for the same
    operator with different statuses stay separate (e.g. 33 CONV_2D mapped,
    1 CONV_2D "More than one subgraph is not supported").
    """
    out: dict = {"ops": []}
    in_table = False
    for raw in text.splitlines():
        line = raw.strip()
        if not line:
            continue
        if line.startswith("Operator") and "Status" in line:
            # stdout and the log both carry the table; the last one read wins
            in_table = True
            out["ops"] = []
        elif _compile_line(line, out):
            continue
        elif in_table:
            _table_row(line, out["ops"])
        else:
            _header_line(line, out)
    return _with_totals(out)


def _with_totals(out: dict) -> dict:
    """Op counts on and off the TPU (unless the compiler printed them), the CPU reasons, fully mapped or not."""
    if out["ops"]:
        out.setdefault("tpu_ops", sum(r["count"] for r in out["ops"] if r["on_tpu"]))
        out.setdefault("cpu_ops", sum(r["count"] for r in out["ops"] if not r["on_tpu"]))
    out["cpu_reasons"] = sorted({r["status"] for r in out["ops"] if not r["on_tpu"]})
    out["fully_mapped"] = bool(out["ops"]) and out.get("cpu_ops", 0) == 0
    return out


def _compile_line(line: str, out: dict) -> bool:
    """The compiler's version or compile time (anywhere in the text); True when ``line`` was one."""
    if line.startswith("Edge TPU Compiler version"):
        out["compiler_version"] = line.rsplit(" ", 1)[-1]
        return True
    m = re.match(r"Model compiled successfully in (\d+) ms", line)
    if m:
        out["compile_ms"] = int(m.group(1))
        return True
    return False


def _header_line(line: str, out: dict) -> None:
    """``key: value`` sizes and counts and the log's name (before the op table)."""
    if ":" in line:
        key, _, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if key in _SIZE_FIELDS:
            out[_SIZE_FIELDS[key]] = parse_size(value)
        elif key in _INT_FIELDS and value.isdigit():
            out[_INT_FIELDS[key]] = int(value)
        elif key == "Operation log":
            out["log_file"] = value


def _table_row(line: str, ops: list) -> None:
    m = _OP_ROW.match(line)
    if m:
        status = m.group(3)
        ops.append({"op": m.group(1), "count": int(m.group(2)), "status": status, "on_tpu": status == MAPPED})


def compile_model(model: Path, out_dir: Path, timeout: float = 600.0) -> dict:
    """Compile ``model`` into ``out_dir`` (model_edgetpu.tflite + log); returns the parsed block."""
    exe = find_compiler()
    if exe is None:
        raise EdgeTPUError(f"{COMPILER} not found on PATH")
    try:
        proc = subprocess.run([exe, "-s", "-o", str(out_dir), str(model)], capture_output=True,
                              text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise EdgeTPUError(f"{COMPILER} timed out after {timeout:.0f} s") from None
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()
        raise EdgeTPUError(f"{COMPILER} failed: {tail[-1] if tail else 'exit ' + str(proc.returncode)}")
    text = proc.stdout
    log = out_dir / (model.stem + "_edgetpu.log")
    if log.exists():
        text += "\n" + log.read_text(errors="replace")
    parsed = parse_output(text)
    compiled = out_dir / (model.stem + "_edgetpu.tflite")
    if not compiled.exists():
        raise EdgeTPUError(f"{COMPILER} reported success but wrote no {compiled.name}")
    parsed["model_file"] = compiled.name
    return parsed
