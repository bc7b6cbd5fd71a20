"""int8 fine-tuned against the float model's own outputs (distillation: unlabelled images, no labels).

The quantization-aware training toolchain (tensorflow-model-optimization)
works only with tf-keras (Keras 2), not with the Keras 3 that TensorFlow 2.16+
and the rest of edgepipe use, and Keras 3 files cannot be loaded by tf-keras.
So the float model is handed over as data, not as a file: its functional
config rewritten to Keras 2's format plus its weights by layer name, and a
child process (:mod:`edgepipe.pipeline.distill_worker`, ``TF_USE_LEGACY_KERAS=1``)
rebuilds it, checks the copy gives the same outputs, folds BatchNormalization,
wraps it with fake quantization (``tfmot.quantization.keras.quantize_model``),
sets activation ranges by min/max over the calibration images, fine-tunes for
``steps`` Adam steps so the fake-quantized outputs match the float model's on
those images (KL divergence for probability outputs, MSE otherwise), and
converts to full-integer int8 (float I/O, edgepipe's ``int8`` recipe).

Agreement and SNR of the result are measured here, on ``val`` (images not
trained on), with the device runtime; give ``baseline`` (the plain int8
model) to get its figures on the same images.

    from edgepipe.pipeline.distill import distill_int8
    result = distill_int8("model.keras", calib_x, val_x, steps=30, baseline=int8_bytes)
    result.tflite, result.before, result.after
"""
from __future__ import annotations

import enum
import importlib.util
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from edgepipe.device.errors import EdgepipeError
from edgepipe.pipeline.modelio import load_keras

# --no-deps: tf-keras depends on the full `tensorflow` wheel (a second copy next to tensorflow-cpu) and
# tfmot pins absl-py~=1.2; neither is needed at run time (tested with TF 2.21, absl-py 2.x).
INSTALL = ("pip install --no-deps 'tf-keras>=2.21,<2.22' 'tensorflow-model-optimization==0.8.1' "
           "'dm-tree>=0.1.8'")
MAX_STEPS = 10_000
DEFAULT_TIMEOUT_S = 1800.0  # conversion of a QAT MobileNetV2 alone took 2.5-14 min on a loaded 2-core host
_CHILD_ENV = {"TF_USE_LEGACY_KERAS": "1", "TF_CPP_MIN_LOG_LEVEL": "3", "TF_ENABLE_ONEDNN_OPTS": "0",
              "GRPC_VERBOSITY": "ERROR", "ABSL_MIN_LOG_LEVEL": "3", "PYTHONUNBUFFERED": "1"}
_MAX_LINE = 64 * 1024


class DistillError(EdgepipeError, RuntimeError):
    """Distillation cannot run or failed; one-line reason."""


class DistillUnavailable(DistillError):
    """tf-keras / tensorflow-model-optimization are not installed."""


class Loss(str, enum.Enum):
    AUTO = "auto"  # kl when the outputs are probabilities, else mse
    KL = "kl"
    MSE = "mse"


@dataclass(frozen=True)
class DistillProgress:
    phase: str  # prepare, prepared, train, converting, evaluate
    step: int = 0
    steps: int = 0
    loss: Optional[float] = None
    agreement: Optional[float] = None  # fake-quantized model on val (prepared / converting)


@dataclass(frozen=True)
class Quality:
    agreement: float  # top-1 agreement with the float model on val
    snr_db: float

    def to_dict(self) -> dict:
        return {"agreement": round(self.agreement, 4), "snr_db": round(self.snr_db, 2)}


@dataclass(frozen=True)
class DistillResult:
    tflite: bytes
    after: Quality
    before: Optional[Quality]  # the baseline model, when given
    steps: int
    batch: int
    loss: Loss
    lr: float
    calib_images: int
    val_images: int
    sim_agreement_before: float  # fake-quantized model in tf-keras, before / after the fine-tune
    sim_agreement_after: float
    folded_bn: int
    seconds_prepare: float
    seconds_train: float
    seconds_convert: float
    seconds_total: float
    versions: dict = field(default_factory=dict)
    dropped_config_keys: tuple = ()

    def to_dict(self) -> dict:
        """For a manifest's ``extra`` block or --json output (no model bytes)."""
        return {
            "method": "quantization-aware fine-tune against the float model's outputs (tfmot, tf-keras)",
            "steps": self.steps, "batch": self.batch, "loss": self.loss.value, "lr": self.lr,
            "calib_images": self.calib_images, "val_images": self.val_images,
            "before": self.before.to_dict() if self.before else None, "after": self.after.to_dict(),
            "sim_agreement": {"before": round(self.sim_agreement_before, 4),
                              "after": round(self.sim_agreement_after, 4)},
            "folded_batchnorm": self.folded_bn,
            "seconds": {"prepare": round(self.seconds_prepare, 1), "train": round(self.seconds_train, 1),
                        "convert": round(self.seconds_convert, 1), "total": round(self.seconds_total, 1)},
            "versions": dict(self.versions), "dropped_config_keys": list(self.dropped_config_keys),
        }


def missing_dependencies() -> list:
    """Distribution names of the toolchain packages this interpreter cannot import."""
    from edgepipe.pipeline.distill_worker import REQUIRED

    return [_dist(module) for module in REQUIRED if importlib.util.find_spec(module) is None]


def _dist(module: str) -> str:
    """The pip distribution of a toolchain module (tf_keras -> tf-keras)."""
    return module.replace("_", "-")


def unavailable_message(missing) -> str:
    return (f"distillation needs {' and '.join(missing)} (Keras 2 quantization-aware training), which "
            f"{'is' if len(missing) == 1 else 'are'} not installed: {INSTALL}")


def _tensor_ref(arg, kwargs: dict) -> list:
    if not (isinstance(arg, dict) and arg.get("class_name") == "__keras_tensor__"):
        raise DistillError(f"unsupported layer call argument {str(arg)[:80]}")
    name, node, index = arg["config"]["keras_history"]
    return [name, node, index, kwargs]


def _node(node: dict, layer: str) -> list:
    kwargs = {k: v for k, v in (node.get("kwargs") or {}).items() if v is not None}
    args = node.get("args") or []
    if len(args) != 1 or any(not isinstance(v, (bool, int, float, str)) for v in kwargs.values()):
        raise DistillError(f"layer {layer}: calls with several tensor arguments cannot be distilled")
    arg = args[0]
    if isinstance(arg, (list, tuple)):  # Add, Concatenate, ...: one list of tensors
        return [_tensor_ref(a, {}) for a in arg]
    return [_tensor_ref(arg, kwargs)]


def to_tf_keras_config(config: dict) -> dict:
    """A Keras 3 functional model config (``model.get_config()``) in tf-keras' functional format.

    Layer configs are passed through (the worker drops what tf-keras does not
    know); layer calls become Keras 2 inbound nodes; dtype policies become
    their names. Nested models are refused.
    """
    layers = []
    for layer in config["layers"]:
        cls, conf = layer["class_name"], dict(layer["config"])
        if cls in ("Functional", "Sequential", "Model"):
            raise DistillError(f"layer {layer['name']} is a nested model, which distillation does not support")
        if isinstance(conf.get("dtype"), dict):
            conf["dtype"] = conf["dtype"].get("config", {}).get("name", "float32")
        if cls == "InputLayer":
            conf = {"batch_input_shape": conf.get("batch_shape"), "dtype": conf.get("dtype", "float32"),
                    "sparse": bool(conf.get("sparse")), "ragged": False, "name": conf["name"]}
        layers.append({"class_name": cls, "name": layer["name"], "config": conf,
                       "inbound_nodes": [_node(n, layer["name"]) for n in layer.get("inbound_nodes", [])]})
    return {"class_name": "Functional",
            "config": {"name": config.get("name", "model"), "layers": layers,
                       "input_layers": config["input_layers"], "output_layers": config["output_layers"]}}


def _functional(model):
    """Single-input, single-output functional view (a built Sequential model becomes one)."""
    import keras

    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise DistillError("distillation supports models with one input and one output")
    if isinstance(model, keras.Sequential):
        model = keras.Model(model.inputs, model.outputs, name=model.name)
    return model


def _choose_loss(loss: Loss, ref: np.ndarray) -> Loss:
    if loss is not Loss.AUTO:
        return loss
    probabilities = bool(np.all(ref >= 0) and np.allclose(ref.sum(axis=1), 1.0, atol=1e-3))
    return Loss.KL if probabilities else Loss.MSE


def _check_inputs(steps: int, batch: int, lr: float, calib: np.ndarray, val: np.ndarray, shape) -> None:
    if not 1 <= steps <= MAX_STEPS:
        raise DistillError(f"steps must be between 1 and {MAX_STEPS}, not {steps}", param="steps")
    if batch < 1:
        raise DistillError(f"batch must be at least 1, not {batch}", param="batch")
    if not 0 < lr < 1:
        raise DistillError(f"learning rate must be in (0, 1), not {lr}", param="lr")
    for name, x in (("calibration", calib), ("validation", val)):
        if x.ndim < 2 or len(x) == 0:
            raise DistillError(f"no {name} images to distill with", param=name)
        if tuple(x.shape[1:]) != tuple(d for d in shape[1:]):
            raise DistillError(f"{name} images have shape {tuple(x.shape[1:])}, the model takes "
                               f"{tuple(shape[1:])}", param=name)


def distill_int8(keras_model, calib: np.ndarray, val: np.ndarray, *, steps: int = 30, batch: int = 8,
                 lr: float = 1e-5, loss: Loss = Loss.AUTO, seed: int = 0, baseline: Optional[bytes] = None,
                 timeout_s: float = DEFAULT_TIMEOUT_S,
                 on_progress: Optional[Callable[[DistillProgress], None]] = None,
                 python: Optional[str] = None) -> DistillResult:
    """Full-integer int8 model fine-tuned for ``steps`` steps to reproduce the float model's outputs.

    ``keras_model``: a Keras 3 model or .keras/.h5 path (one input, one output).
    ``calib``: unlabelled model inputs to fine-tune and calibrate on; ``val``:
    other inputs the returned figures are measured on. ``baseline``: the
    plain int8 model, measured on ``val`` too (``result.before``). Runs the
    fine-tune in a child process (``python``, default this interpreter)
    bounded by ``timeout_s``; raises :class:`DistillUnavailable` when the
    toolchain is not installed, :class:`DistillError` on any other failure.
    """
    from edgepipe.pipeline.model_run import float_outputs

    missing = missing_dependencies() if python is None else []
    if missing:
        raise DistillUnavailable(unavailable_message(missing))
    t_start = time.perf_counter()
    model = _functional(load_keras(keras_model))
    calib, val = np.asarray(calib, np.float32), np.asarray(val, np.float32)
    _check_inputs(steps, batch, lr, calib, val, model.inputs[0].shape)
    _emit(on_progress, DistillProgress("prepare"))
    ref = float_outputs(model, val)
    loss = _choose_loss(Loss(loss), ref)
    params = {"steps": int(steps), "batch": int(batch), "lr": float(lr), "loss": loss.value, "seed": int(seed)}
    work = Path(tempfile.mkdtemp(prefix="edgepipe-distill-"))
    try:
        _write_inputs(work, model, calib, val, ref, params)
        out = _run_worker(work, timeout_s, on_progress, python or sys.executable)
        tflite = (work / "distilled.tflite").read_bytes()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    _emit(on_progress, DistillProgress("evaluate"))
    after = _quality(tflite, val, ref)
    before = _quality(baseline, val, ref) if baseline is not None else None
    return DistillResult(
        tflite=tflite, after=after, before=before, steps=int(steps), batch=int(batch), loss=loss, lr=float(lr),
        calib_images=len(calib), val_images=len(val), sim_agreement_before=out["sim_agreement_before"],
        sim_agreement_after=out["sim_agreement_after"], folded_bn=out["folded_bn"],
        seconds_prepare=out["seconds_prepare"], seconds_train=out["seconds_train"],
        seconds_convert=out["seconds_convert"], seconds_total=time.perf_counter() - t_start,
        versions=out["versions"], dropped_config_keys=tuple(out["dropped_config_keys"]))


def _emit(on_progress, event: DistillProgress) -> None:
    if on_progress is not None:
        on_progress(event)


def _quality(tflite: bytes, val: np.ndarray, ref: np.ndarray) -> Quality:
    from edgepipe.pipeline import metrics
    from edgepipe.pipeline.model_run import run_tflite

    out = run_tflite(tflite, val)
    return Quality(metrics.top1_agreement(out, ref), metrics.snr_db(out, ref))


def _write_inputs(work: Path, model, calib, val, ref, params: dict) -> None:
    (work / "model.json").write_text(json.dumps(to_tf_keras_config(model.get_config())))
    weights = {f"{layer.name}/{i}": np.asarray(w) for layer in model.layers
               for i, w in enumerate(layer.get_weights())}
    np.savez(work / "weights.npz", **weights)
    np.savez(work / "data.npz", calib=calib, val=val, ref=ref)
    (work / "params.json").write_text(json.dumps(params))


def _run_worker(work: Path, timeout_s: float, on_progress, python: str) -> dict:
    """Run the worker to completion or the deadline; its result.json, or a one-line DistillError."""
    from edgepipe.pipeline.distill_worker import MISSING_EXIT, PROGRESS_PREFIX

    fd, log_name = tempfile.mkstemp(prefix="edgepipe-distill-", suffix=".log")
    log = Path(log_name)
    with os.fdopen(fd, "wb") as log_f:
        proc = subprocess.Popen([python, "-m", "edgepipe.pipeline.distill_worker", str(work)],
                                stdout=subprocess.PIPE, stderr=log_f, stdin=subprocess.DEVNULL,
                                env={**os.environ, **_CHILD_ENV}, start_new_session=True)
        lines: queue.Queue = queue.Queue()
        reader = threading.Thread(target=_read_lines, args=(proc.stdout, lines), daemon=True)
        reader.start()
        deadline = time.monotonic() + timeout_s
        while proc.poll() is None or reader.is_alive():
            if time.monotonic() > deadline:
                _kill(proc)
                raise DistillError(f"distillation did not finish within {timeout_s:.0f} s (log: {log})")
            try:
                line = lines.get(timeout=0.5)
            except queue.Empty:
                continue
            if line.startswith(PROGRESS_PREFIX):
                _emit(on_progress, _progress(line[len(PROGRESS_PREFIX):]))
        proc.wait()
    if proc.returncode == 0 and (work / "result.json").is_file():
        log.unlink(missing_ok=True)
        return json.loads((work / "result.json").read_text())
    err = _error(work)
    if proc.returncode == MISSING_EXIT:
        log.unlink(missing_ok=True)
        raise DistillUnavailable(unavailable_message([_dist(err.get("module", "tf_keras"))]))
    from edgepipe.pipeline.tfenv import last_error_line

    reason = err.get("message") or last_error_line(log) or f"the worker exited with code {proc.returncode}"
    raise DistillError(f"distillation failed: {reason} (log: {log})")


def _read_lines(stream, out: queue.Queue) -> None:
    with stream:
        while True:
            raw = stream.readline(_MAX_LINE)
            if not raw:
                return
            out.put(raw.decode("utf-8", "replace").rstrip("\n"))


def _progress(text: str) -> DistillProgress:
    try:
        d = json.loads(text)
        return DistillProgress(str(d.get("phase", "")), int(d.get("step", 0)), int(d.get("steps", 0)),
                               d.get("loss"), d.get("sim_agreement"))
    except (ValueError, TypeError):
        return DistillProgress("unknown")


def _error(work: Path) -> dict:
    try:
        return json.loads((work / "error.json").read_text())
    except (OSError, ValueError):
        return {}


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
