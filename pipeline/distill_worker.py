"""Child process of :mod:`edgepipe.pipeline.distill`: quantization-aware fine-tune against the float model.

Runs under ``TF_USE_LEGACY_KERAS=1`` with tf-keras (Keras 2) and
tensorflow-model-optimization, which do not work with the Keras 3 the rest of
edgepipe uses; hence a separate process. Reads from its work directory:

* ``model.json``: the float model as a Keras-2 functional config (made by the parent),
* ``weights.npz``: ``"{layer}/{i}"`` -> the layer's i-th weight array,
* ``data.npz``: ``calib`` (unlabelled training images), ``val`` and ``ref`` (the
  float Keras 3 model's outputs on ``val``, to prove the rebuilt copy is the same model),
* ``params.json``: steps, batch, lr, loss, seed.

Writes ``distilled.tflite`` and ``result.json``; on failure ``error.json``
(``{"kind": "missing"|"failed", "message": one line}``) and a non-zero exit.
Progress goes to the original stdout as JSON lines prefixed ``PROGRESS_PREFIX``;
everything else TensorFlow prints (either fd) goes to stderr, which the parent logs.

    TF_USE_LEGACY_KERAS=1 python -m edgepipe.pipeline.distill_worker WORKDIR
"""
from __future__ import annotations

import importlib
import inspect
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from edgepipe.device.errors import one_line

PROGRESS_PREFIX = "EDGEPIPE-DISTILL "
MISSING_EXIT = 3
FAILED_EXIT = 2
REQUIRED = ("tf_keras", "tensorflow_model_optimization")
# Keras 2 Layer.__init__ accepts these on top of each class's own parameters.
_BASE_LAYER_KW = {"name", "trainable", "dtype", "input_shape", "batch_input_shape", "batch_size", "weights",
                  "activity_regularizer", "autocast", "input_dim", "dynamic"}
_FOLDABLE = ("Conv2D", "DepthwiseConv2D", "Dense")
# rebuilt model vs the parent's Keras 3 outputs: same float kernels, so only summation-order noise
REBUILD_TOLERANCE = 1e-3


class WorkerError(Exception):
    """A one-line reason the worker stops (written to error.json)."""


class _Protocol:
    """Progress lines on the parent's pipe; fd 1 itself is pointed at stderr so TF's prints stay out of it."""

    def __init__(self):
        self._out = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
        sys.stdout.flush()
        os.dup2(2, 1)

    def send(self, phase: str, **fields) -> None:
        self._out.write(PROGRESS_PREFIX + json.dumps({"phase": phase, **fields}) + "\n")


def filter_config(obj, dropped: set, is_layer: bool = False):
    """A Keras 3 layer config made acceptable to tf-keras: keys its classes do not take are dropped.

    Keys Keras 3 added (``quantization_config``, initializer axes, BatchNormalization
    ``renorm*``) are dropped only while inert (see ``_inert``);
    anything else is a feature tf-keras cannot rebuild and stops the worker. The
    rebuilt model's outputs are compared with the original's afterwards anyway.
    """
    import tf_keras as K

    if isinstance(obj, list):
        return [filter_config(o, dropped) for o in obj]
    if not isinstance(obj, dict):
        return obj
    if "class_name" not in obj or not isinstance(obj.get("config"), dict):
        return {k: filter_config(v, dropped) for k, v in obj.items()}
    conf = {k: filter_config(v, dropped) for k, v in obj["config"].items()}
    modules = (K.layers,) if is_layer else (K.initializers, K.regularizers, K.constraints)
    cls = next((getattr(m, obj["class_name"]) for m in modules
                if inspect.isclass(getattr(m, obj["class_name"], None))), None)
    if cls is None:
        if is_layer:
            raise WorkerError(f"layer type {obj['class_name']} has no tf-keras equivalent")
        return {**obj, "config": conf}
    allowed = set(inspect.signature(cls.__init__).parameters) | (_BASE_LAYER_KW if is_layer else set())
    for key in [k for k in conf if k not in allowed]:
        if not _inert(key, conf):
            raise WorkerError(f"{obj['class_name']}.{key}={conf[key]!r} cannot be rebuilt with tf-keras")
        dropped.add(f"{obj['class_name']}.{key}")
        conf.pop(key)
    return {**obj, "config": conf}


def _inert(key: str, conf: dict) -> bool:
    """A config key tf-keras lacks that changes nothing: neutral value, or an option of a switched-off feature."""
    if conf[key] in (None, False, {}, [], 0):
        return True
    return key.startswith("renorm_") and not conf.get("renorm")


def _refs(cfg: dict):
    """Every [layer, node, tensor, kwargs] reference of the functional config (inbound nodes and outputs)."""
    for layer in cfg["config"]["layers"]:
        for node in layer["inbound_nodes"]:
            yield from node
    outs = cfg["config"]["output_layers"]
    yield from ([outs] if isinstance(outs[0], str) else outs)


def fold_batchnorm(cfg: dict, weights: dict) -> int:
    """Fold each BatchNormalization into the Conv2D/DepthwiseConv2D/Dense that alone feeds it (in place).

    TFLite folds them at conversion; folding before quantization-aware training
    makes the fake-quantized kernels the ones the int8 model will really have.
    Returns how many were folded.
    """
    layers = cfg["config"]["layers"]
    by_name = {ly["name"]: ly for ly in layers}
    users: dict = {}
    for ly in layers:
        for node in ly["inbound_nodes"]:
            for ref in node:
                users.setdefault(ref[0], []).append(ly["name"])
    rename = {}
    for bn in [ly for ly in layers if ly["class_name"] == "BatchNormalization"]:
        c = bn["config"]
        nodes = bn["inbound_nodes"]
        if len(nodes) != 1 or len(nodes[0]) != 1:
            continue
        src = by_name[nodes[0][0][0]]
        channel_axes = (-1, [-1], 1, [1]) if src["class_name"] == "Dense" else (-1, [-1], 3, [3])
        if (src["class_name"] not in _FOLDABLE or users.get(src["name"]) != [bn["name"]]
                or c.get("axis") not in channel_axes):
            continue
        _fold_one(src, bn, weights)
        layers.remove(bn)
        rename[bn["name"]] = src["name"]
    for ref in _refs(cfg):
        ref[0] = rename.get(ref[0], ref[0])
    return len(rename)


def _fold_one(src: dict, bn: dict, w: dict) -> None:
    c, n, s = bn["config"], bn["name"], src["name"]
    arrays = [w.pop(f"{n}/{i}") for i in range(sum(1 for k in list(w) if k.startswith(n + "/")))]
    gamma = arrays.pop(0) if c.get("scale", True) else 1.0
    beta = arrays.pop(0) if c.get("center", True) else 0.0
    mean, var = arrays
    scale = gamma / np.sqrt(var + c["epsilon"])
    kernel = w[f"{s}/0"]
    bias = w.get(f"{s}/1", 0.0) if src["config"].get("use_bias") else 0.0
    if src["class_name"] == "DepthwiseConv2D":  # (h, w, channels, multiplier)
        kernel = kernel * np.reshape(scale, (1, 1) + kernel.shape[2:])
    else:
        kernel = kernel * scale
    w[f"{s}/0"] = kernel.astype(np.float32)
    w[f"{s}/1"] = (beta + (bias - mean) * scale).astype(np.float32)
    src["config"]["use_bias"] = True


def build(cfg: dict, weights: dict, *, student: bool):
    """The tf-keras model with the parent's weights; the student has BN folded, BN frozen, no dropout."""
    import tf_keras as K

    cfg = json.loads(json.dumps(cfg))
    weights = dict(weights)
    folded = fold_batchnorm(cfg, weights) if student else 0
    for ly in cfg["config"]["layers"]:
        if student and ly["class_name"] == "Dropout":
            ly["config"]["rate"] = 0.0  # inference ignores dropout; the short fine-tune should too
    model = K.models.model_from_json(json.dumps(cfg))
    for layer in model.layers:
        n = len(layer.get_weights())
        if n:
            layer.set_weights([weights[f"{layer.name}/{i}"] for i in range(n)])
        if isinstance(layer, K.layers.BatchNormalization):
            layer.trainable = False  # batches of a few images must not move the statistics
    return model, folded


def calibrate_ranges(student, calib: np.ndarray, batch: int) -> int:
    """Activation ranges as min/max over the calibration images (what post-training int8 uses).

    tfmot's moving-average quantizers start at [-6, 6] and move 0.1% per
    training step, so a short fine-tune would otherwise keep arbitrary ranges;
    for one eager pass over ``calib`` they run as all-values (min/max) quantizers
    from zero. Returns how many range variables were set.
    """
    import tensorflow as tf
    from tensorflow_model_optimization.python.core.quantization.keras import quant_ops, quantizers

    original = quantizers.MovingAverageQuantizer.__call__
    seen = set()

    def all_values(self, inputs, training, weights, **kwargs):
        if self.per_axis:
            return original(self, inputs, training, weights, **kwargs)
        for var in (weights["min_var"], weights["max_var"]):
            if id(var) not in seen:
                seen.add(id(var))
                var.assign(tf.zeros_like(var))
        return quant_ops.AllValuesQuantize(inputs, weights["min_var"], weights["max_var"], is_training=True,
                                           num_bits=self.num_bits, narrow_range=self.narrow_range,
                                           symmetric=self.symmetric)

    quantizers.MovingAverageQuantizer.__call__ = all_values
    try:
        for i in range(0, len(calib), batch):
            student(calib[i:i + batch], training=True)
    finally:
        quantizers.MovingAverageQuantizer.__call__ = original
    return len(seen)


def _loss_fn(kind: str):
    import tf_keras as K

    if kind == "kl":
        return K.losses.KLDivergence()
    if kind == "mse":
        return K.losses.MeanSquaredError()
    raise WorkerError(f"unknown loss {kind!r} (kl or mse)")


def train(teacher, student, calib: np.ndarray, params: dict, proto: _Protocol) -> list:
    """``steps`` Adam steps on random batches of ``calib`` (randomly mirrored): student vs teacher outputs."""
    import tensorflow as tf
    import tf_keras as K

    opt = K.optimizers.Adam(params["lr"])
    loss_fn = _loss_fn(params["loss"])
    flip = bool(params.get("flip", True)) and calib.ndim == 4

    @tf.function
    def step(x):
        if flip:
            mirror = tf.random.uniform([tf.shape(x)[0], 1, 1, 1]) < 0.5
            x = tf.where(mirror, tf.reverse(x, [2]), x)
        target = teacher(x, training=False)
        with tf.GradientTape() as tape:
            loss = loss_fn(target, student(x, training=True))
        grads = tape.gradient(loss, student.trainable_variables)
        opt.apply_gradients(zip(grads, student.trainable_variables))
        return loss

    tf.random.set_seed(params["seed"])
    rng = np.random.default_rng(params["seed"])
    steps, batch = params["steps"], min(params["batch"], len(calib))
    every = max(1, steps // 20)
    losses = []
    for k in range(steps):
        idx = rng.choice(len(calib), batch, replace=False)
        losses.append(float(step(tf.constant(calib[idx]))))
        if (k + 1) % every == 0 or k + 1 == steps:
            proto.send("train", step=k + 1, steps=steps, loss=float(np.mean(losses[-every:])))
    return losses


def convert(model, calib: np.ndarray) -> bytes:
    """Full-integer int8 TFLite with float input/output (edgepipe's ``int8`` recipe)."""
    import tensorflow as tf

    def representative():
        for i in range(len(calib)):
            yield [calib[i:i + 1]]

    conv = tf.lite.TFLiteConverter.from_keras_model(model)
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.representative_dataset = representative
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    return conv.convert()


def _agreement(model, x: np.ndarray, ref: np.ndarray) -> float:
    y = np.asarray(model.predict(x, batch_size=16, verbose=0)).reshape(len(x), -1)
    return float(np.mean(y.argmax(1) == ref.reshape(len(ref), -1).argmax(1)))


def run(workdir: Path, proto: _Protocol) -> dict:
    """The whole job: rebuild, check, quantize, calibrate, fine-tune, convert; returns result.json's content."""
    import tensorflow as tf
    import tensorflow_model_optimization as tfmot
    import tf_keras

    params = json.loads((workdir / "params.json").read_text())
    cfg = json.loads((workdir / "model.json").read_text())
    with np.load(workdir / "weights.npz") as z:
        weights = {k: z[k] for k in z.files}
    with np.load(workdir / "data.npz") as z:
        calib, val, ref = z["calib"], z["val"], z["ref"]
    t0 = time.perf_counter()
    dropped: set = set()
    cfg["config"]["layers"] = [{**ly, **filter_config({"class_name": ly["class_name"], "config": ly["config"]},
                                                      dropped, is_layer=True)} for ly in cfg["config"]["layers"]]
    teacher, _ = build(cfg, weights, student=False)
    student_float, folded = build(cfg, weights, student=True)
    for name, m in (("rebuilt", teacher), ("BN-folded", student_float)):
        diff = float(np.max(np.abs(np.asarray(m.predict(val[:8], verbose=0)).reshape(len(val[:8]), -1)
                                   - ref[:8].reshape(min(8, len(ref)), -1))))
        if not diff <= REBUILD_TOLERANCE:
            raise WorkerError(f"the {name} tf-keras model differs from the Keras model by {diff:.3g}")
    student = tfmot.quantization.keras.quantize_model(student_float)
    ranges = calibrate_ranges(student, calib, params["batch"])
    sim_before = _agreement(student, val, ref)
    t_prep = time.perf_counter() - t0
    proto.send("prepared", seconds=round(t_prep, 2), sim_agreement=sim_before, folded_bn=folded)
    t0 = time.perf_counter()
    losses = train(teacher, student, calib, params, proto)
    t_train = time.perf_counter() - t0
    sim_after = _agreement(student, val, ref)
    proto.send("converting", sim_agreement=sim_after)
    t0 = time.perf_counter()
    (workdir / "distilled.tflite").write_bytes(convert(student, calib))
    return {
        "sim_agreement_before": sim_before, "sim_agreement_after": sim_after,
        "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
        "folded_bn": folded, "range_variables": ranges, "dropped_config_keys": sorted(dropped),
        "seconds_prepare": t_prep, "seconds_train": t_train, "seconds_convert": time.perf_counter() - t0,
        "versions": {"tensorflow": tf.__version__, "tf_keras": tf_keras.__version__,
                     "tensorflow_model_optimization": tfmot.__version__},
    }


def main(argv=None) -> int:
    """Entry point; the exit code says missing dependency (3), failure (2) or success (0)."""
    argv = sys.argv[1:] if argv is None else argv
    workdir = Path(argv[0])
    os.environ["TF_USE_LEGACY_KERAS"] = "1"  # before TensorFlow is imported, or tf.keras is Keras 3
    proto = _Protocol()
    for name in REQUIRED:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            (workdir / "error.json").write_text(json.dumps({"kind": "missing", "module": name,
                                                            "message": one_line(exc)[:300]}))
            return MISSING_EXIT
        except Exception:  # installed but broken: an ordinary failure, reported below
            break
    try:
        for name in REQUIRED:
            importlib.import_module(name)
        result = run(workdir, proto)
    except Exception as exc:  # any failure becomes one line for the parent; the traceback stays in the log
        import traceback

        traceback.print_exc()
        (workdir / "error.json").write_text(json.dumps({"kind": "failed", "message": one_line(exc)[:300]}))
        return FAILED_EXIT
    (workdir / "result.json").write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
