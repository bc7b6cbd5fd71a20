"""Reading source models: .keras, .h5 and SavedModel directories.

Digests are computed without TensorFlow so a fully cached conversion never
imports it; loading (which needs TensorFlow) happens only on a cache miss.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Optional
from edgepipe.device.errors import EdgepipeError


class ModelError(EdgepipeError, ValueError):
    """The source model is missing, unreadable or unusable; message is user-facing."""


class ModelKind(str, Enum):
    KERAS = "keras"
    H5 = "h5"
    SAVED_MODEL = "savedmodel"
    TFLITE = "tflite"  # a float .tflite, quantized by edgepipe.pipeline.convert_tflite


def model_kind(path: Path) -> ModelKind:
    """Classify a model path, or raise ModelError with the reason."""
    if not path.exists():
        raise ModelError(f"{path}: no such file or directory")
    if path.is_dir():
        if (path / "saved_model.pb").exists() or (path / "saved_model.pbtxt").exists():
            return ModelKind.SAVED_MODEL
        raise ModelError(f"{path}: a directory but not a SavedModel (no saved_model.pb)")
    if not os.access(path, os.R_OK):
        raise ModelError(f"{path}: not readable")
    suffix = path.suffix.lower()
    if suffix == ".keras":
        return ModelKind.KERAS
    if suffix in (".h5", ".hdf5"):
        return ModelKind.H5
    if suffix == ".tflite":
        return ModelKind.TFLITE
    raise ModelError(f"{path}: unsupported model format {suffix or '(no extension)'!r}; "
                     "expected .keras, .h5, .tflite or a SavedModel directory")


def model_digest(path: Path) -> str:
    """sha256 of a model file, or of a SavedModel tree (relative paths + bytes, sorted)."""
    h = hashlib.sha256()
    try:
        if path.is_file():
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            return h.hexdigest()
        for p in sorted(q for q in path.rglob("*") if q.is_file()):
            h.update(str(p.relative_to(path)).encode() + b"\0")
            with open(p, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
    except OSError as e:
        raise ModelError(f"{path}: cannot read ({e.strerror or e})") from None
    return h.hexdigest()


@dataclass
class LoadedSource:
    """A source model loaded into TensorFlow, ready to hand to the converter."""

    kind: ModelKind
    path: Path
    input_shape: tuple  # including batch (None when free)
    output_shapes: tuple
    rescales_itself: bool
    keras_model: Optional[Any] = None  # keras.Model for .keras/.h5

    def make_converter(self, tf, input_size: Optional[tuple] = None):
        """A fresh TFLiteConverter (converters are single-use once configured)."""
        if self.kind == ModelKind.SAVED_MODEL:
            if input_size:
                raise ModelError("--input-size is only supported for Keras models")
            return tf.lite.TFLiteConverter.from_saved_model(str(self.path))
        shape = fixed_input_shape(self.input_shape, input_size)
        if shape == tuple(self.input_shape[1:]) and self.input_shape[0] in (None, 1):
            return tf.lite.TFLiteConverter.from_keras_model(self.keras_model)
        model = self.keras_model
        if None not in self.input_shape[1:] and shape != tuple(self.input_shape[1:]):
            model = with_input_size(model, shape[:2])
        # A fixed batch-1 signature pins free spatial dims (or a new size) for TFLite.
        fn = tf.function(lambda x: model(x, training=False))
        concrete = fn.get_concrete_function(tf.TensorSpec((1,) + shape, tf.float32))
        return tf.lite.TFLiteConverter.from_concrete_functions([concrete], model)

    def resolved_input_shape(self, input_size: Optional[tuple]) -> tuple:
        return (1,) + fixed_input_shape(self.input_shape, input_size)


def fixed_input_shape(shape: tuple, input_size: Optional[tuple]) -> tuple:
    """Per-example input shape (no batch), with ``input_size`` (h, w) applied to NHWC."""
    dims = tuple(shape[1:])
    if input_size is None:
        return dims
    if len(dims) != 3:
        raise ModelError(f"--input-size needs an image input, the model takes {tuple(shape)}")
    return (int(input_size[0]), int(input_size[1]), dims[2])


def with_input_size(model, size: tuple):
    """The same Keras model (same weights) declared for ``size`` = (h, w) inputs.

    Fully convolutional models with global pooling accept any size, but Keras
    enforces the declared input shape; rebuilding from the config with a new
    input shape and copying the weights lifts that.
    """
    cfg = model.get_config()
    layers = cfg.get("layers", [])
    inputs = [ly for ly in layers if ly.get("class_name") == "InputLayer"]
    if len(inputs) != 1:
        raise ModelError("--input-size needs a model with one declared Input layer")
    shape = list(inputs[0]["config"]["batch_shape"])
    if len(shape) != 4:
        raise ModelError(f"--input-size needs an image input, the model takes {tuple(shape)}")
    inputs[0]["config"]["batch_shape"] = [None, int(size[0]), int(size[1]), shape[3]]
    try:
        new = model.__class__.from_config(cfg)
        new.set_weights(model.get_weights())
    except (ValueError, TypeError) as e:
        raise ModelError(f"cannot change the input size to {size[0]}x{size[1]} ({one_line(e)})") from None
    return new


def one_line(e: BaseException, limit: int = 200) -> str:
    """The telling line of a possibly multi-line (traceback-like) TensorFlow error."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    for ln in reversed(lines):
        if "Error" in ln or "error" in ln:
            return ln[:limit]
    return (lines[-1] if lines else type(e).__name__)[:limit]


def load_keras(model) -> Any:
    """``model`` itself, or the Keras model at that path (uncompiled, TensorFlow's chatter captured).

    One loader for every stage that re-works a bundle from its Keras source (selective float, calibration
    methods, distillation, the layer debugger); an unreadable file is a :class:`ModelError` with one line.
    """
    if not (isinstance(model, (str, bytes)) or hasattr(model, "__fspath__")):
        return model
    from edgepipe.pipeline.tfenv import captured_output, import_tf

    tf = import_tf()
    path = os.fsdecode(model)
    try:
        with captured_output():
            return tf.keras.models.load_model(path, compile=False)
    except Exception as e:  # noqa: BLE001 - Keras raises anything from OSError to ValueError
        raise ModelError(f"cannot load {Path(path).name} as a Keras model ({one_line(e)})") from None


_RESCALING = ("Rescaling", "Normalization")


def load_source(tf, path: Path) -> LoadedSource:
    """Load a model for conversion; every failure becomes a one-line ModelError."""
    kind = model_kind(path)
    try:
        if kind == ModelKind.SAVED_MODEL:
            loaded = tf.saved_model.load(str(path))
            sig = loaded.signatures.get("serving_default")
            if sig is None:
                raise ModelError(f"{path}: SavedModel has no 'serving_default' signature")
            inputs = list(sig.structured_input_signature[1].values())
            if len(inputs) != 1:
                raise ModelError(f"{path}: {len(inputs)} inputs; edgepipe converts single-input models")
            outs = tuple(tuple(t.shape.as_list()) for t in sig.structured_outputs.values())
            return LoadedSource(kind, path, tuple(inputs[0].shape.as_list()), outs, False)
        import keras

        model = keras.models.load_model(str(path), compile=False)
    except ModelError:
        raise
    except Exception as e:  # noqa: BLE001 - loaders raise anything from OSError to ValueError
        raise ModelError(f"{path}: cannot load model ({one_line(e)})") from None
    if len(model.inputs) != 1:
        raise ModelError(f"{path}: {len(model.inputs)} inputs; edgepipe converts single-input models")
    first_layers = [type(layer).__name__ for layer in model.layers[:3]]
    return LoadedSource(
        kind=kind,
        path=path,
        input_shape=tuple(model.inputs[0].shape),
        output_shapes=tuple(tuple(o.shape) for o in model.outputs),
        rescales_itself=any(n in _RESCALING for n in first_layers),
        keras_model=model,
    )
