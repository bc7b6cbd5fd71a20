"""Shared fixtures for the device tests (run in .venv-device: no TensorFlow here).

- the tiny committed models under tests/data/models (scripts/make_test_models.py)
- ``make_bundle``: a real bundle directory around one of them
- ``agent_server``: a started loopback agent (HTTP front end + job core), stopped at teardown
- ``assert_valid_report``: checks a report against the JSON Schema with jsonschema
- markers: ``timing`` tests skip under emulation (EDGEPIPE_EMULATED=1, set by
  scripts/test-arm64.sh); ``edgetpu`` / ``picamera`` skip without the hardware
"""
from __future__ import annotations

import ctypes.util
import glob
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MODELS = ROOT / "tests" / "data" / "models"
REPORT_SCHEMA = ROOT / "device" / "schemas" / "report.schema.json"

EMULATED = os.environ.get("EDGEPIPE_EMULATED", "") not in ("", "0")


def _edgetpu_present() -> bool:
    from edgepipe.device.delegates import edgetpu_devices, find_delegates

    return bool(find_delegates()["edgetpu"]["available"] and edgetpu_devices())


def _picamera_present() -> bool:
    try:
        import picamera2  # noqa: F401
    except ImportError:
        return False
    return bool(glob.glob("/dev/video*"))


def pytest_collection_modifyitems(config, items):
    lazy = {}
    for item in items:
        if "timing" in item.keywords and EMULATED:
            item.add_marker(pytest.mark.skip(reason="timing test: meaningless under CPU emulation"))
        if "edgetpu" in item.keywords:
            if "edgetpu" not in lazy:
                lazy["edgetpu"] = _edgetpu_present()
            if not lazy["edgetpu"]:
                item.add_marker(pytest.mark.skip(reason="needs a Coral Edge TPU (library + device)"))
        if "picamera" in item.keywords:
            if "picamera" not in lazy:
                lazy["picamera"] = _picamera_present()
            if not lazy["picamera"]:
                item.add_marker(pytest.mark.skip(reason="needs picamera2 and a Raspberry Pi camera"))


# --------------------------------------------------------------------------- models


def _model(name: str) -> Path:
    p = MODELS / name
    if not p.exists():
        pytest.fail(f"{p} missing: run '.venv/bin/python scripts/make_test_models.py'")
    return p


@pytest.fixture(scope="session")
def models_dir() -> Path:
    return MODELS


@pytest.fixture(scope="session")
def float_model() -> Path:
    """float32 in/out, (1, 8, 8, 3) -> (1, 4) softmax."""
    return _model("float.tflite")


@pytest.fixture(scope="session")
def int8_model() -> Path:
    """Full int8 kernels with float32 input/output."""
    return _model("int8_float_io.tflite")


@pytest.fixture(scope="session")
def int8_io_model() -> Path:
    return _model("int8_io.tflite")


@pytest.fixture(scope="session")
def uint8_io_model() -> Path:
    return _model("uint8_io.tflite")


@pytest.fixture(scope="session")
def two_output_model() -> Path:
    return _model("two_outputs.tflite")


@pytest.fixture(scope="session")
def int8_no_bias_model() -> Path:
    """int8 I/O with a bias-less FULLY_CONNECTED (crashes tflite-runtime 2.14 on ARM)."""
    return _model("int8_no_bias.tflite")


@pytest.fixture(scope="session")
def custom_op_model() -> Path:
    return _model("custom_op.tflite")


@pytest.fixture(scope="session")
def edgetpu_like_model() -> Path:
    return _model("edgetpu_like.tflite")


@pytest.fixture(scope="session")
def truncated_model() -> Path:
    return _model("truncated.tflite")


@pytest.fixture(scope="session")
def not_a_model() -> Path:
    return _model("not_a_model.tflite")


@pytest.fixture
def changed_model():
    """``changed_model(src, change) -> bytes``: ``src`` with ``change(model)`` applied through the
    TFLite schema's object API (tests/fuzz/mutate.py); skips where no schema module is installed."""
    mutate = pytest.importorskip("fuzz.mutate")

    def apply(src: Path, change) -> bytes:
        try:
            model = mutate.read_model(src.read_bytes())
        except ImportError:
            pytest.skip("no TFLite schema module in this environment")
        change(model)
        return mutate.write_model(model)
    return apply


MOBILENET_PRE = {"mean": (127.5, 127.5, 127.5), "std": (127.5, 127.5, 127.5)}


@pytest.fixture
def make_bundle(tmp_path):
    """``make_bundle(model_path, name=..., recipe=..., labels=[...], preprocess={...})`` -> bundle dir.

    Writes model.tflite + a manifest whose tensors come from the runtime's own
    view of the model, like ``edgepipe convert`` does.
    """
    from edgepipe.device.bundle import (LABELS, MODEL, Manifest, Preprocess, Quantization, Task, TensorInfo,
                               sha256_file, write_manifest)
    from edgepipe.device.runtime import load_model

    def make(model: Path, *, name: str = "tiny", recipe: str = "fp32", labels=None, preprocess=None,
             task: str = "classification", directory: Path | None = None) -> Path:
        d = directory or tmp_path / f"{name}-{recipe}"
        d.mkdir(parents=True, exist_ok=True)
        shutil.copy(model, d / MODEL)
        loaded = load_model(d / MODEL)

        def info(s):
            q = Quantization(s.scale, s.zero_point) if s.quantized else None
            return TensorInfo(s.name, s.shape, s.dtype, q)

        shape = loaded.inputs[0].shape
        pre = dict(MOBILENET_PRE, height=shape[1], width=shape[2])
        pre.update(preprocess or {})
        labels_file = None
        if labels:
            (d / LABELS).write_text("\n".join(labels) + "\n", encoding="utf-8")
            labels_file = LABELS
        manifest = Manifest(
            name=name, recipe=recipe, model_sha256=sha256_file(d / MODEL), model_size=(d / MODEL).stat().st_size,
            inputs=tuple(info(s) for s in loaded.inputs), outputs=tuple(info(s) for s in loaded.outputs),
            preprocess=Preprocess.from_dict(pre), task=Task(task), labels_file=labels_file,
            created="2026-01-01T00:00:00Z")
        write_manifest(d, manifest)
        return d

    return make


@pytest.fixture
def agent_server(tmp_path):
    """``agent_server(token=..., max_bytes=..., quota_bytes=..., keep_warm=...)`` -> a started loopback agent.

    A real :class:`AgentServer` over a real job core whose bundle store is
    ``tmp_path / "store"`` (data blobs under ``store/.data``); every server it
    started is stopped, and its worker process closed, at teardown.
    """
    from edgepipe.device.agent import Agent, AgentServer
    from edgepipe.device.bundle_store import DEFAULT_QUOTA, BundleStore

    started = []

    def start(*, token: str, max_bytes: int = 1 << 20, quota_bytes: int = DEFAULT_QUOTA, keep_warm: int = 2):
        worker = Agent(BundleStore(tmp_path / "store", max_bytes=max_bytes, quota_bytes=quota_bytes),
                       keep_warm=keep_warm)
        try:
            server = AgentServer(worker, "127.0.0.1", 0, token=token)
        except BaseException:
            worker.close()
            raise
        started.append((server, worker))
        server.start_background()
        return server

    yield start
    for server, worker in reversed(started):
        server.shutdown()
        server.server_close()
        worker.close()


@pytest.fixture(scope="session")
def backend():
    """``(name, version)`` of the runtime load_model picks here (ai_edge_litert on x86,
    tflite_runtime on the arm64 tflite-runtime stack)."""
    from edgepipe.device.runtime import available_backends

    found = available_backends()
    if not found:
        pytest.skip("no TFLite runtime installed")
    return found[0]


# --------------------------------------------------------------------------- reports


@pytest.fixture(scope="session")
def report_schema() -> dict:
    return json.loads(REPORT_SCHEMA.read_text(encoding="utf-8"))


@pytest.fixture
def assert_valid_report(report_schema):
    """Validate with the real jsonschema package (a dev dependency; device code never needs it)."""
    import jsonschema

    def check(report: dict) -> dict:
        jsonschema.Draft202012Validator(report_schema).validate(report)
        return report

    return check


# --------------------------------------------------------------------------- helpers


@pytest.fixture(scope="session")
def edgerun():
    """Run ``edgerun ARGS`` in a fresh interpreter (this venv); returns CompletedProcess (text)."""
    def run(*args, env=None, timeout=120, cwd=None):
        e = dict(os.environ)
        e.update(env or {})
        return subprocess.run([sys.executable, "-m", "edgepipe.device.cli", *map(str, args)], capture_output=True,
                              text=True, timeout=timeout, env=e, cwd=cwd or ROOT)

    return run


NOOP_DELEGATE_C = r"""
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
/* Layout of TfLiteDelegate (tensorflow/lite/core/c/common.h). */
typedef struct D { void* data_; int (*Prepare)(void*, struct D*); void* copy_from; void* copy_to;
                   void* free_handle; int64_t flags; void* opaque_builder; } D;
static int prepare(void* ctx, D* d) { (void)ctx; (void)d; return 0; /* claims no node */ }
D* tflite_plugin_create_delegate(char** keys, char** values, size_t n, void (*report)(const char*)) {
  for (size_t i = 0; i < n; i++)
    if (strcmp(keys[i], "fail") == 0 && strcmp(values[i], "1") == 0) {
      report("edgepipe test delegate refused to start");
      return NULL;
    }
  D* d = (D*)calloc(1, sizeof(D));
  d->Prepare = prepare;
  return d;
}
void tflite_plugin_destroy_delegate(D* d) { free(d); }
"""


@pytest.fixture(scope="session")
def c_library(tmp_path_factory):
    """``build(name, source, opt="-O1")``: a shared library ``lib<name>.so`` built from C ``source`` with the
    system C compiler; the test skips when there is no compiler or the build fails."""
    def build(name: str, source: str, opt: str = "-O1") -> Path:
        cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
        if not cc:
            pytest.skip(f"no C compiler to build {name}")
        d = tmp_path_factory.mktemp(name)
        src, lib = d / f"{name}.c", d / f"lib{name}.so"
        src.write_text(source)
        out = subprocess.run([cc, "-shared", "-fPIC", opt, "-o", str(lib), str(src)], capture_output=True, text=True)
        if out.returncode != 0:
            pytest.skip(f"cannot build {name}: {out.stderr.strip()[:200]}")
        return lib

    return build


@pytest.fixture(scope="session")
def noop_delegate(c_library) -> Path:
    """A real external delegate library that claims no ops (everything stays on the CPU).

    Built with the system C compiler; skips when there is none.
    """
    lib = c_library("noop_delegate", NOOP_DELEGATE_C)
    try:
        ctypes.CDLL(str(lib))
    except OSError as e:  # e.g. the host compiler built x86 code for an emulated aarch64 Python
        pytest.skip(f"the test delegate cannot be loaded by this Python ({e})")
    return lib


@pytest.fixture(scope="session")
def libm_path() -> Path:
    """A real shared library that is not a TFLite delegate: the libm this Python has mapped."""
    cands = []
    try:
        with open("/proc/self/maps") as f:
            cands += [ln.split()[-1] for ln in f if "/libm" in ln and ".so" in ln]
    except OSError:
        pass
    cands += [ctypes.util.find_library("m") or "", "/lib/x86_64-linux-gnu/libm.so.6", "/lib/aarch64-linux-gnu/libm.so.6"]
    for cand in cands:
        if cand and os.path.isabs(cand) and os.path.exists(cand):
            try:
                ctypes.CDLL(cand)
            except OSError:
                continue
            return Path(cand)
    pytest.skip("no loadable libm found by absolute path")
