"""Per-layer int8 quantization error against float, via TensorFlow's QuantizationDebugger.

The debugger calibrates once, then builds a model where every quantized op is
followed by a NumericVerify op that runs the same op in float on the same
(dequantized) inputs. Its per-layer numbers are therefore *local* errors: how
much each layer adds, not the error accumulated up to it, which is what makes
them good for ranking which layers to keep in float.

We rank by ``rmse / scale``: the error measured in quantization steps of the
layer's own output. Pure rounding noise is 1/sqrt(12) ~ 0.29 steps; layers far
above that lose information to clipping or a badly chosen range.

The calibrated model is kept so selective quantization can re-quantize with a
denylist without calibrating again.
"""
from __future__ import annotations

import csv
import io
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from edgepipe.pipeline.tfenv import captured_output, import_tf, last_error_line
from edgepipe.device.errors import EdgepipeError
from edgepipe.pipeline.modelio import load_keras

ROUNDING_NOISE = 1.0 / math.sqrt(12.0)


class LayerErrorError(EdgepipeError, RuntimeError):
    """Debugging could not run; one-line reason for the user."""


@dataclass(frozen=True)
class LayerError:
    """Local quantization error of one op's output."""

    tensor: str  # the op's output tensor name; what a denylist takes
    op: str  # TFLite op type, e.g. CONV_2D
    layer: str  # best-effort Keras layer name
    rmse: float
    max_abs: float
    scale: float
    num_elements: int

    @property
    def rmse_steps(self) -> float:
        """RMSE in units of the output's quantization step (sensitivity score)."""
        return self.rmse / self.scale if self.scale > 0 else math.inf

    def to_dict(self) -> dict:
        return {"tensor": self.tensor, "op": self.op, "layer": self.layer,
                "rmse": self.rmse, "max_abs": self.max_abs, "scale": self.scale,
                "rmse_steps": self.rmse_steps if math.isfinite(self.rmse_steps) else None,
                "num_elements": self.num_elements}


def keras_layer_name(tensor: str) -> str:
    """``functional_1/conv2_1/Relu;...`` -> ``conv2`` (TF appends ``_1`` to scopes)."""
    first = tensor.split(";")[0]
    parts = first.split("/")
    name = parts[1] if len(parts) > 2 else parts[0]
    return re.sub(r"_\d+$", "", name)


@dataclass
class Debugged:
    """A calibrated int8 model plus its per-layer errors (graph order)."""

    calibrated: bytes
    layers: list
    disable_per_channel: bool = False
    _tf: object = field(default=None, repr=False)

    def ranked(self) -> list:
        """Layers, most sensitive first (ties keep graph order)."""
        return sorted(self.layers, key=lambda e: -e.rmse_steps)

    def quantize(self, denylist: Sequence[str] = ()) -> bytes:
        """The int8 model with the ``denylist`` tensors' ops left in float."""
        if self._tf is None:
            self._tf = import_tf()  # quiet env before the converter's native code runs
        # The debugger's own get_nondebug_quantized_model() does exactly this
        # call, but re-instruments a debug model first each time the options
        # change; calling the quantizer directly skips that second conversion.
        from tensorflow.lite.python import convert as _convert

        with captured_output() as log:
            try:
                return _convert.mlir_quantize(
                    self.calibrated, disable_per_channel=self.disable_per_channel,
                    denylisted_nodes=list(denylist) or None)
            except Exception as e:  # noqa: BLE001 - the converter raises many types
                raise LayerErrorError(f"re-quantizing with {len(denylist)} float layer(s) failed: "
                                      f"{last_error_line(log) or e}") from None


def debug_int8(model, calib: np.ndarray, *, debug: Optional[np.ndarray] = None,
               max_debug: int = 32) -> Debugged:
    """Calibrate ``model`` (Keras model or .keras path) on ``calib`` and measure each layer.

    ``calib``/``debug`` are float model inputs stacked on axis 0 (single-input
    models). ``debug`` defaults to the calibration inputs; at most
    ``max_debug`` of them are run through the instrumented model.
    """
    tf = import_tf()
    keras_model = load_keras(model)
    calib = np.asarray(calib, dtype=np.float32)
    dbg_x = np.asarray(debug if debug is not None else calib, dtype=np.float32)[:max_debug]
    if calib.ndim < 2 or calib.shape[0] == 0:
        raise LayerErrorError("calibration: no images")

    from edgepipe.pipeline.calibration import calibrating_converter, representative_dataset

    with captured_output() as log:
        try:
            conv = calibrating_converter(keras_model, calib)
            debugger = tf.lite.experimental.QuantizationDebugger(
                converter=conv, debug_dataset=representative_dataset(dbg_x))
            debugger.run()
            buf = io.StringIO()
            debugger.layer_statistics_dump(buf)
        except Exception as e:  # noqa: BLE001
            raise LayerErrorError(f"quantization debugger failed: {last_error_line(log) or e}") from None
    buf.seek(0)
    # The model's output tensor is named after the signature, not the layer.
    out_layer = keras_model.layers[-1].name if len(keras_model.outputs) == 1 else None
    layers = []
    for row in csv.DictReader(buf):
        mse = float(row["mean_squared_error"])
        name = keras_layer_name(row["tensor_name"])
        if out_layer and name.startswith("StatefulPartitionedCall"):
            name = out_layer
        layers.append(LayerError(
            tensor=row["tensor_name"], op=row["op_name"], layer=name,
            rmse=math.sqrt(max(mse, 0.0)), max_abs=float(row["max_abs_error"]),
            scale=float(row["scale"]), num_elements=int(float(row["num_elements"]))))
    return Debugged(calibrated=debugger.calibrated_model, layers=layers,
                    disable_per_channel=bool(conv._experimental_disable_per_channel), _tf=tf)


def layer_errors(bundle_path, reference=None, top: int = 10) -> list:
    """Most sensitive layers of an int8 bundle: local int8 error of each op vs float.

    Re-calibrates the float model on the images the manifest records (same
    folder, count and seed) with TensorFlow's QuantizationDebugger; returns
    ``LayerError.to_dict()`` rows, worst first.
    """
    from edgepipe.pipeline import calibration
    from edgepipe.pipeline.evaluate import EvalError, KerasReference, find_reference, open_bundle

    b = open_bundle(Path(bundle_path))
    m = b.manifest
    if m.recipe not in ("int8", "int8-io"):
        return []
    if m.calibration is None or not m.calibration.source:
        raise EvalError(f"{b.name} records no calibration images", param="layers")
    ref = Path(reference) if reference else find_reference(b)
    if ref is None:
        raise EvalError(f"float model of {b.name} not found; give the float reference model", param="layers")
    try:
        cset = calibration.select(Path(m.calibration.source), m.calibration.count, m.calibration.seed)
        calib = calibration.load_arrays(cset, m.preprocess)
        keras_ref = KerasReference(ref)
        if keras_ref._signature is not None:
            raise EvalError(f"needs the Keras model (.keras/.h5), not the SavedModel {ref}", param="layers")
        dbg = debug_int8(keras_ref.model, calib)
    except (calibration.CalibrationError, LayerErrorError) as e:
        raise EvalError(f"{e}", param="layers") from None
    return [e.to_dict() for e in dbg.ranked()[:top]]
