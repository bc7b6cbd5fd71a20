"""The device side never imports TensorFlow or the host `pipeline` package.

Two proofs: a source scan of every module under device/, and a fresh
interpreter in which `tensorflow` and `pipeline` cannot be imported at all,
importing every device module and running a model end to end.

The one sanctioned path to TensorFlow is edgepipe.device.runtime's backend table
(`tensorflow.lite` as the last fallback runtime), reached only when no
lighter runtime is installed or the user forces `--backend tensorflow.lite`;
it is data, not an import statement, so the scan below stays strict.
"""
from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DEVICE = ROOT / "device"
FORBIDDEN = ("tensorflow", "edgepipe.pipeline", "pipeline", "tf_keras", "keras")


def _forbidden(name: str) -> bool:
    return any(name == f or name.startswith(f + ".") for f in FORBIDDEN)


def _device_sources():
    files = sorted(p for p in DEVICE.rglob("*.py") if "__pycache__" not in p.parts)
    assert len(files) >= 5, files
    return files


def _forbidden_imports(path: Path):
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    shown = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    bad = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        elif isinstance(node, ast.Call):
            f = node.func
            fname = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
            if fname in ("import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant):
                names = [str(node.args[0].value)]
        bad += [f"{shown}:{node.lineno}: {n}" for n in names if _forbidden(n)]
    return bad


def test_scan_finds_forbidden_imports_when_present(tmp_path):
    # the scanner itself must be able to fail
    probe = tmp_path / "probe.py"
    probe.write_text("import os\nfrom edgepipe.pipeline.convert import x\nimport importlib\n"
                     "importlib.import_module('tensorflow.lite')\nimport tensorflow as tf\n")
    found = sorted(b.rsplit(": ", 1)[1] for b in _forbidden_imports(probe))
    assert found == ["edgepipe.pipeline.convert", "tensorflow", "tensorflow.lite"]


def test_device_sources_never_import_tensorflow_or_pipeline():
    bad = [b for f in _device_sources() for b in _forbidden_imports(f)]
    assert bad == []


BLOCKER = """
import importlib.abc, sys
FORBIDDEN = {forbidden!r}
ATTEMPTS = []
class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if any(name == f or name.startswith(f + '.') for f in FORBIDDEN):
            ATTEMPTS.append(name)
            raise ModuleNotFoundError(f"{{name}} is forbidden on the device side", name=name)
        return None
sys.meta_path.insert(0, Blocker())
"""


def test_every_device_module_imports_and_runs_without_tensorflow():
    code = BLOCKER.format(forbidden=FORBIDDEN) + textwrap.dedent(f"""
        import importlib, json, pkgutil
        import numpy as np
        import edgepipe.device
        failed, names = {{}}, []
        for m in pkgutil.walk_packages(edgepipe.device.__path__, "edgepipe.device."):
            names.append(m.name)
            try:
                importlib.import_module(m.name)
            except Exception as e:
                failed[m.name] = f"{{type(e).__name__}}: {{e}}"
        from edgepipe.device.runtime import load_model
        from edgepipe.device.bench import run_bench
        m = load_model({str(ROOT / "tests/data/models/int8_io.tflite")!r})
        y = m.predict([np.zeros(m.inputs[0].shape, np.float32)])
        r = run_bench({str(ROOT / "tests/data/models/float.tflite")!r}, runs=2, warmup=0, min_secs=0)
        print(json.dumps({{"modules": names, "failed": failed, "attempts": ATTEMPTS,
                           "loaded": sorted(k for k in sys.modules if any(k == f or k.startswith(f + '.') for f in FORBIDDEN)),
                           "backend": r["runtime"]["backend"], "n": r["latency_ms"]["n"]}}))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert {"edgepipe.device.runtime", "edgepipe.device.bench", "edgepipe.device.cli_bench", "edgepipe.device.sysinfo"} <= set(res["modules"])
    assert res["failed"] == {}
    assert res["attempts"] == [] and res["loaded"] == []
    assert res["backend"] != "tensorflow.lite" and res["n"] == 2
