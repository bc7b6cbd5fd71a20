"""Quantizing a float ``.tflite`` (what model zoos ship) with the LiteRT quantizer.

TensorFlow's converter cannot start from a ``.tflite``, so every recipe but
fp32 goes through ``ai-edge-quantizer`` (Google's maintained quantizer for
LiteRT models): fp16 casts weights to float16, dynamic quantizes weights to
int8 with float activations, int8 and int16x8 calibrate activations on the
same preprocessed images as the TF path and keep float model inputs/outputs
(quantize/dequantize at the edges), int8-io keeps integer inputs/outputs. The
quantizer gives int8 I/O; ``uint8`` I/O (the Edge TPU's classic choice) adds
one requantize op per integer input and output. The manifest's ``converter``
says which tool made each variant.

Models without a signature (most older exports) get one ``serving_default``
signature over the graph's inputs and outputs, which the quantizer needs to
run calibration; nothing else in the graph changes.
"""
from __future__ import annotations

import importlib.metadata
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Tuple

import numpy as np

from edgepipe.device import __version__
from edgepipe.pipeline.convert import ConvertError
from edgepipe.pipeline.modelio import ModelError, ModelKind, one_line
from edgepipe.pipeline.recipes import Recipe

TOOL = "ai-edge-quantizer"
SIGNATURE = "serving_default"
MAX_MODEL_BYTES = 2 << 30  # flatbuffers without external buffers stop at 2 GiB
_FLOAT_EDGES = [{"regex": ".*", "operation": op, "algorithm_key": "no_quantize", "op_config": {}}
                for op in ("INPUT", "OUTPUT")]
_FP16 = [{"regex": ".*", "operation": "*", "algorithm_key": "float_casting",
          "op_config": {"weight_tensor_config": {"num_bits": 16, "dtype": "FLOAT"},
                        "compute_precision": "FLOAT", "explicit_dequantize": True}}]


def quantizer_version() -> str:
    """The installed ai-edge-quantizer's version ("absent" when it is not installed)."""
    try:
        return importlib.metadata.version(TOOL)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


@dataclass
class TfliteSource:
    """A float .tflite as a conversion source (the ``LoadedSource`` fields the convert session reads)."""

    path: Path
    data: bytes
    input_shape: tuple
    output_shapes: tuple
    kind: ModelKind = ModelKind.TFLITE
    rescales_itself: bool = False

    def resolved_input_shape(self, input_size: Optional[tuple]) -> tuple:
        if input_size:
            raise ModelError("a .tflite model cannot be resized: its input shape is fixed", param="input_size")
        return self.input_shape


def load_tflite(path: Path) -> TfliteSource:
    """Read a .tflite and check it is a float, single-input model (ModelError otherwise)."""
    from edgepipe.device.runtime import RuntimeLoadError, load_model

    try:
        data = path.read_bytes()
    except OSError as e:
        raise ModelError(f"{path}: cannot read ({e.strerror or e})") from None
    if len(data) > MAX_MODEL_BYTES:
        raise ModelError(f"{path}: larger than 2 GiB")
    try:
        loaded = load_model(path)
    except (RuntimeLoadError, ValueError) as e:
        raise ModelError(f"{path}: not a loadable .tflite ({one_line(e)})") from None
    if len(loaded.inputs) != 1:
        raise ModelError(f"{path}: {len(loaded.inputs)} inputs; edgepipe converts single-input models")
    spec = loaded.inputs[0]
    if spec.dtype != "float32" or spec.scale:
        raise ModelError(f"{path}: input is {spec.dtype}{' (quantized)' if spec.scale else ''}; "
                         "edgepipe quantizes float .tflite models")
    return TfliteSource(path, data, tuple(int(d) for d in spec.shape),
                        tuple(tuple(int(d) for d in o.shape) for o in loaded.outputs))


def quantize(source: TfliteSource, recipe: Recipe, arrays: Optional[np.ndarray]) -> Tuple[bytes, dict]:
    """One recipe applied to the .tflite: (model bytes, the manifest's ``converter`` block)."""
    if recipe.name == "fp32":
        return source.data, {"tool": "copy", "version": __version__, "edgepipe": __version__}
    rules = _recipe_rules(recipe)
    try:
        from ai_edge_quantizer import quantizer
    except ImportError:
        raise ConvertError(f"{recipe.name}: quantizing a .tflite needs {TOOL}: pip install {TOOL}") from None
    model, sig, input_name = with_signature(source.data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the calibrator's note on keeping every tensor: expected here
            data = _run_quantizer(quantizer, model, rules, sig, input_name, arrays, recipe)
    except ConvertError:
        raise
    except Exception as e:  # noqa: BLE001 - the quantizer raises many types; one line for the user
        raise ConvertError(f"{recipe.name}: {TOOL} failed: {one_line(e)}") from None
    if recipe.io_type == "uint8":
        data = uint8_io(data)
    _check_loads(data, recipe)
    return data, {"tool": TOOL, "version": quantizer_version(), "edgepipe": __version__}


def _run_quantizer(quantizer, model: bytes, rules: list, sig: str, input_name: str, arrays,
                   recipe: Recipe) -> bytes:
    """Calibrate (when the rules need it) and quantize; the quantized model bytes."""
    q = quantizer.Quantizer(bytearray(model), rules)
    calib = None
    if q.need_calibration:
        if arrays is None:  # pragma: no cover - validate() asks for --calib first
            raise ConvertError(f"{recipe.name}: needs calibration images")
        calib = _calibrate(model, rules, {sig: [{input_name: x[None].astype(np.float32)} for x in arrays]})
    return bytes(q.quantize(calib, enable_progress_bar=False, enable_progress_report=False).quantized_model)


def _calibrate(model: bytes, rules: list, data: dict) -> dict:
    """Activation ranges as the global min/max over the calibration images, like TensorFlow's converter.

    The quantizer's default update is a moving average (weight 0.95 on what was
    seen before), which for a few hundred images or fewer depends on their order
    and can shrink a range to a fraction of what the data covers.
    """
    from ai_edge_quantizer import calibrator, recipe_manager
    from ai_edge_quantizer.utils import qsv_utils

    manager = recipe_manager.RecipeManager()
    manager.load_quantization_recipe(rules)
    cal = calibrator.Calibrator(memoryview(model), qsv_update_func=qsv_utils.min_max_update)
    cal.calibrate(data, manager)
    return cal.get_model_qsvs()


def _recipe_rules(recipe: Recipe) -> list:
    """The quantizer's recipe (a list of rules) for one of edgepipe's recipes."""
    from ai_edge_quantizer import recipe as presets

    if recipe.name == "fp16":
        return list(_FP16)
    if recipe.name == "dynamic":
        return list(presets.dynamic_wi8_afp32())
    if recipe.name == "int8":
        return list(presets.static_wi8_ai8()) + _FLOAT_EDGES
    if recipe.name == "int8-io":
        return list(presets.static_wi8_ai8())
    if recipe.name == "int16x8":
        return list(presets.static_wi8_ai16()) + _FLOAT_EDGES
    raise ConvertError(f"{recipe.name}: no {TOOL} recipe for it")


def _read(data: bytes) -> Any:
    from ai_edge_litert.tools import flatbuffer_utils

    return flatbuffer_utils.read_model_from_bytearray(bytearray(data))


def _write(model: Any) -> bytes:
    from ai_edge_litert.tools import flatbuffer_utils

    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def _name(tensor: Any) -> str:
    return tensor.name.decode() if isinstance(tensor.name, bytes) else str(tensor.name)


def with_signature(data: bytes) -> Tuple[bytes, str, str]:
    """(model, signature key, input name): a ``serving_default`` signature added when the model has none."""
    from ai_edge_litert import schema_py_generated as fb

    model = _read(data)
    if model.signatureDefs:
        sig = model.signatureDefs[0]
        return data, _name_of(sig.signatureKey), _name_of(sig.inputs[0].name)
    sg = model.subgraphs[0]
    model.signatureDefs = [fb.SignatureDefT(
        inputs=[fb.TensorMapT(_name(sg.tensors[i]), i) for i in sg.inputs],
        outputs=[fb.TensorMapT(_name(sg.tensors[i]), i) for i in sg.outputs],
        signatureKey=SIGNATURE, subgraphIndex=0)]
    return _write(model), SIGNATURE, _name(sg.tensors[sg.inputs[0]])


def _name_of(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def uint8_io(data: bytes) -> bytes:
    """int8 graph inputs/outputs turned into uint8 ones (zero point + 128) through a requantize op each.

    Float inputs/outputs (e.g. a detector's post-processing op) stay as they are.
    """
    from ai_edge_litert import schema_py_generated as fb

    model = _read(data)
    sg = model.subgraphs[0]
    code = _quantize_opcode(model, fb)
    moved = {}
    for pos, t in enumerate(list(sg.inputs)):
        if sg.tensors[t].type == fb.TensorType.INT8:
            new = _uint8_twin(sg, t, fb)
            sg.operators.insert(0, fb.OperatorT(opcodeIndex=code, inputs=[new], outputs=[t]))
            sg.inputs[pos], moved[t] = new, new
    for pos, t in enumerate(list(sg.outputs)):
        if sg.tensors[t].type == fb.TensorType.INT8:
            new = _uint8_twin(sg, t, fb)
            sg.operators.append(fb.OperatorT(opcodeIndex=code, inputs=[t], outputs=[new]))
            sg.outputs[pos], moved[t] = new, new
    for sig in model.signatureDefs or []:
        for m in list(sig.inputs or []) + list(sig.outputs or []):
            m.tensorIndex = moved.get(m.tensorIndex, m.tensorIndex)
    return _write(model)


def _quantize_opcode(model: Any, fb: Any) -> int:
    for i, oc in enumerate(model.operatorCodes):
        if max(oc.builtinCode, oc.deprecatedBuiltinCode) == fb.BuiltinOperator.QUANTIZE:
            oc.version = max(oc.version, 2)  # version 2 covers int8 <-> uint8 requantization
            return i
    model.operatorCodes.append(fb.OperatorCodeT(builtinCode=fb.BuiltinOperator.QUANTIZE,
                                                deprecatedBuiltinCode=fb.BuiltinOperator.QUANTIZE, version=2))
    return len(model.operatorCodes) - 1


def _uint8_twin(sg: Any, t: int, fb: Any) -> int:
    """A uint8 tensor with the same real values as int8 tensor ``t`` (same scale, zero point + 128)."""
    src = sg.tensors[t]
    q = src.quantization
    if q is None or q.scale is None or len(q.scale) != 1:
        raise ConvertError(f"int8-io: tensor {_name(src)} is not per-tensor quantized")
    twin = fb.TensorT()
    twin.shape, twin.shapeSignature, twin.type, twin.buffer = list(src.shape), src.shapeSignature, \
        fb.TensorType.UINT8, 0
    twin.name = _name(src) + "_uint8"
    twin.quantization = fb.QuantizationParametersT()
    twin.quantization.scale = [float(q.scale[0])]
    twin.quantization.zeroPoint = [int(q.zeroPoint[0]) + 128]
    sg.tensors.append(twin)
    return len(sg.tensors) - 1


def _check_loads(data: bytes, recipe: Recipe) -> None:
    """The variant must load and run once in the runtime the device uses, or the recipe fails here."""
    import tempfile

    from edgepipe.device.runtime import load_model

    with tempfile.NamedTemporaryFile(suffix=".tflite") as f:
        f.write(data)
        f.flush()
        try:
            m = load_model(Path(f.name))
            m.set_input(0, np.zeros(m.inputs[0].shape, np.dtype(m.inputs[0].dtype)))
            m.invoke()
        except Exception as e:  # noqa: BLE001 - any failure means the variant is unusable
            raise ConvertError(f"{recipe.name}: the quantized model does not run ({one_line(e)})") from None


__all__ = ["TOOL", "TfliteSource", "load_tflite", "quantize", "quantizer_version", "uint8_io", "with_signature"]
