"""16-bit activations for the layers int8 hurts most: the step between plain int8 and keeping layers float.

Keeping a layer float costs a dequantize/quantize pair around it and float
kernels inside it; giving it int16 activations with int8 weights ("a16w8")
keeps it integer with 256x finer activation steps. TensorFlow's MLIR
quantizer can only do all-or-nothing int16x8, so the mixed models here come
from ai-edge-quantizer (LiteRT's quantizer): one recipe rule quantizes every
op a8w8, and one more rule per chosen op, matched on the op's *scope* (its
output tensor names joined by ``;``, plus a trailing ``;``), makes that op
a16w8; the quantizer inserts the int8 <-> int16 requantize ops at the borders.
The ranking's names are the converter's output tensor names, which the float
``.tflite`` of the same Keras model carries unchanged.

Measured cost (sample MobileNetV2, ai_edge_litert 2.3, x86): LiteRT has no
optimized int16x8 kernels for convolutions on CPU (XNNPACK does not take
them; they run on the reference kernels), so one early 112x112 convolution
at 16 bits makes the whole model several times slower than fp32, while the
last layers (pooling, classifier) cost almost nothing. Every step's p50 is
therefore measured and reported, and a step is only *chosen* when it reaches
the target without being slower than the fp32 model.

fp16 *activations* are not an option for single layers on LiteRT's CPU
path: ai-edge-quantizer's ``float_casting`` only casts weights (it refuses
an activation config: "Activation tensor quantization is not supported for
float casting") and LiteRT's built-in CPU kernels compute in float32; fp16
arithmetic exists only as a whole-graph XNNPACK/GPU-delegate setting.
"""
from __future__ import annotations

import re
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from edgepipe.device.errors import EdgepipeError
from edgepipe.pipeline import metrics
from edgepipe.pipeline.modelio import one_line
from edgepipe.pipeline.model_run import p50_ms, run_tflite

MAX_INT16_LAYERS = 64
_FLOAT_EDGES = [{"regex": ".*", "operation": op, "algorithm_key": "no_quantize", "op_config": {}}
                for op in ("INPUT", "OUTPUT")]


class MixedPrecisionError(EdgepipeError, RuntimeError):
    """A mixed int8/int16 model could not be made; one-line reason."""


@dataclass(frozen=True)
class Step:
    """One model of the search: these layers at 16-bit activations, every other quantized op int8."""

    int16_layers: Tuple[str, ...]  # output tensor names, in ranking order
    agreement: float  # top-1 agreement with the float reference on the validation inputs
    snr_db: float
    p50_ms: Optional[float]  # 1-thread invoke median; None when not timed

    def to_dict(self) -> dict:
        from edgepipe.pipeline.layer_error import keras_layer_name

        return {"int16_layers": len(self.int16_layers),
                "layers": [keras_layer_name(t) for t in self.int16_layers],
                "agreement": round(self.agreement, 6), "snr_db": round(self.snr_db, 2),
                "p50_ms": None if self.p50_ms is None else round(self.p50_ms, 4)}


@dataclass(frozen=True)
class MixedResult:
    """Every step tried (step 0: all int8), the fp32 p50 they compare with, and the step chosen (if any)."""

    steps: Tuple[Step, ...]
    fp32_p50_ms: Optional[float]
    target: Optional[float]
    chosen: Optional[int]  # index into ``steps``: reaches ``target`` and is not slower than fp32
    unmapped: Tuple[str, ...] = ()  # ranked names that are no op output of the float model
    seconds: float = 0.0
    models: Tuple[bytes, ...] = field(default=(), repr=False)
    reference: Optional[np.ndarray] = field(default=None, repr=False, compare=False)  # float outputs on val

    @property
    def model(self) -> Optional[bytes]:
        """The chosen step's model (None when no step qualified)."""
        return None if self.chosen is None else self.models[self.chosen]

    def to_dict(self) -> dict:
        """The manifest's ``extra["selective"]["a16w8"]`` block."""
        from edgepipe.pipeline.convert_tflite import TOOL, quantizer_version

        return {"tool": f"{TOOL} {quantizer_version()}", "activations": "int16 (weights int8) for the listed layers",
                "target_agreement": self.target, "fp32_p50_ms": self.fp32_p50_ms,
                "chosen_step": self.chosen, "steps": [s.to_dict() for s in self.steps],
                "unmapped_layers": list(self.unmapped), "seconds": round(self.seconds, 2)}


def step_counts(limit: int) -> List[int]:
    """0, 1, 2, 4, ... up to ``limit`` (``limit`` itself always last)."""
    out, k = [0], 1
    while k < limit:
        out.append(k)
        k *= 2
    if limit > 0:
        out.append(limit)
    return out


def op_scopes(model: bytes) -> Dict[str, str]:
    """Output tensor name -> the quantizer's scope of the op producing it (subgraph 0)."""
    from ai_edge_quantizer.utils import tfl_flatbuffer_utils as tfu

    from edgepipe.pipeline.convert_tflite import _read

    m = _read(model)
    sg = m.subgraphs[0]
    out = {}
    for op in sg.operators:
        scope = tfu.get_op_scope(op, sg.tensors)
        for i in op.outputs:
            if i >= 0:
                out[tfu.get_tensor_name(sg.tensors[i])] = scope
    return out


def a16w8_rules(scopes: Sequence[str]) -> list:
    """ai-edge-quantizer recipe: every op a8w8, the ops of ``scopes`` a16w8, model inputs/outputs float."""
    from ai_edge_quantizer import recipe as presets

    rules = list(presets.static_wi8_ai8()) + _FLOAT_EDGES
    a16 = presets.static_wi8_ai16()[0]
    # Later rules win; the scope is matched from its start, and its trailing ';' ends the last name.
    # The model's inputs/outputs are virtual ops with their tensor's scope: the last rules keep them
    # float even when the op next to them is chosen (a distinct regex, or the rules merge with '.*').
    edges = [{**r, "regex": "^"} for r in _FLOAT_EDGES]
    return rules + [{**a16, "regex": "^" + re.escape(s)} for s in scopes] + (edges if scopes else [])


class A16W8Quantizer:
    """Calibrates a float ``.tflite`` once, then makes a8w8 models with any set of ops at a16w8."""

    def __init__(self, float_tflite: bytes, calib: np.ndarray,
                 ranges: Optional[Mapping[str, Tuple[float, float]]] = None):
        """``ranges``: tensor name -> (lo, hi) replacing the calibrated min/max (e.g. clipped ranges)."""
        from edgepipe.pipeline.convert_tflite import _calibrate, with_signature

        self.model, sig, input_name = with_signature(float_tflite)
        self.scopes = op_scopes(self.model)
        data = {sig: [{input_name: np.asarray(x, np.float32)[None]} for x in calib]}
        from edgepipe.pipeline.tfenv import captured_output

        try:  # captured: the quantizer draws its own progress bars on the terminal
            with warnings.catch_warnings(), captured_output():
                warnings.simplefilter("ignore")
                self.qsvs = _calibrate(self.model, a16w8_rules([]), data)
        except Exception as e:  # noqa: BLE001 - the quantizer raises many types
            raise MixedPrecisionError(f"calibrating for 16-bit activations failed: {one_line(e)}") from None
        # Clipped ranges help 8-bit tensors; a 16-bit tensor keeps its full min/max (see quantize).
        self.minmax = {k: dict(v) for k, v in self.qsvs.items()}
        for name, (lo, hi) in (ranges or {}).items():
            q = self.qsvs.get(name)
            if q is not None and "min" in q and "max" in q:
                q["min"], q["max"] = np.full_like(q["min"], lo), np.full_like(q["max"], hi)

    def mapped(self, names: Sequence[str]) -> Tuple[List[str], List[str]]:
        """(names the float model has as op outputs, the others)."""
        return [n for n in names if n in self.scopes], [n for n in names if n not in self.scopes]

    def quantize(self, int16: Sequence[str] = ()) -> bytes:
        """The a8w8 model with the ops producing ``int16`` tensors at a16w8 (float model inputs/outputs)."""
        from ai_edge_quantizer import quantizer

        missing = [n for n in int16 if n not in self.scopes]
        if missing:
            raise MixedPrecisionError(f"no op of the float model outputs {missing[0]!r}")
        rules = a16w8_rules(sorted({self.scopes[n] for n in int16}))
        from edgepipe.pipeline.tfenv import captured_output

        try:
            with warnings.catch_warnings(), captured_output():
                warnings.simplefilter("ignore")
                q = quantizer.Quantizer(bytearray(self.model), rules)
                qsvs = {**self.qsvs, **{n: self.minmax[n] for n in int16 if n in self.minmax}}
                res = q.quantize(qsvs, enable_progress_bar=False, enable_progress_report=False)
        except Exception as e:  # noqa: BLE001
            raise MixedPrecisionError(f"quantizing {len(int16)} layer(s) at 16 bits failed: {one_line(e)}") from None
        return bytes(res.quantized_model)


def search(float_tflite: bytes, calib: np.ndarray, val: np.ndarray, ref: np.ndarray, ranked: Sequence[str], *,
           max_layers: int = 8, target: Optional[float] = None,
           ranges: Optional[Mapping[str, Tuple[float, float]]] = None, threads: Optional[int] = 1,
           measure_latency: bool = True, on_step: Optional[Callable[[str], None]] = None) -> MixedResult:
    """a8w8, then a16w8 for the worst 1, 2, 4 ... ``max_layers`` layers of ``ranked`` (worst first).

    ``ref``: the float model's outputs on ``val`` (one row per input).
    With ``target``, stops at the first step reaching it; that step is
    ``chosen`` when it is not slower than the fp32 model (measured here too).
    """
    t0 = time.perf_counter()
    say = on_step or (lambda msg: None)
    if not 0 <= max_layers <= MAX_INT16_LAYERS:
        raise MixedPrecisionError(f"{max_layers} layers at 16 bits: between 0 and {MAX_INT16_LAYERS}")
    val = np.asarray(val, np.float32)
    say(f"calibrating {len(calib)} images for mixed int8/int16 models")
    aq = A16W8Quantizer(float_tflite, calib, ranges)
    names, unmapped = aq.mapped(list(ranked))
    fp32 = p50_ms(float_tflite, val, threads=threads) if measure_latency else None
    steps, models = [], []
    for k in step_counts(min(max_layers, len(names))):
        model = aq.quantize(names[:k])
        out = run_tflite(model, val, threads=threads)
        step = Step(tuple(names[:k]), metrics.top1_agreement(out, ref), metrics.snr_db(out, ref),
                    p50_ms(model, val, threads=threads) if measure_latency else None)
        steps.append(step)
        models.append(model)
        say(f"{k} layer(s) at 16 bits: agreement {step.agreement:.4f}, SNR {step.snr_db:.1f} dB"
            + (f", p50 {step.p50_ms:.2f} ms (fp32 {fp32:.2f})" if step.p50_ms is not None else ""))
        if target is not None and step.agreement >= target:
            break
    chosen = _choose(steps, target, fp32)
    return MixedResult(steps=tuple(steps), fp32_p50_ms=fp32, target=target, chosen=chosen,
                       unmapped=tuple(unmapped), seconds=time.perf_counter() - t0, models=tuple(models),
                       reference=np.asarray(ref))


def _choose(steps: Sequence[Step], target: Optional[float], fp32: Optional[float]) -> Optional[int]:
    """The first step reaching ``target`` that is not slower than fp32 (an unmeasured one does not qualify)."""
    if target is None:
        return None
    for i, s in enumerate(steps):
        if s.agreement >= target:
            return i if (fp32 is not None and s.p50_ms is not None and s.p50_ms <= fp32) else None
    return None


def float_tflite(keras_model) -> bytes:
    """The float ``.tflite`` of a Keras model (what ai-edge-quantizer starts from)."""
    from edgepipe.pipeline.tfenv import captured_output, import_tf, last_error_line

    tf = import_tf()
    with captured_output() as log:
        try:
            return tf.lite.TFLiteConverter.from_keras_model(keras_model).convert()
        except Exception as e:  # noqa: BLE001
            raise MixedPrecisionError(f"float conversion failed: {last_error_line(log) or one_line(e)}") from None


def try_before_float(keras_model, cal, method, layers: Sequence, calib: np.ndarray, x: np.ndarray,
                     target: float, max_layers: int, *, measure_latency: bool = True,
                     on_step: Optional[Callable[[str], None]] = None, ref: Optional[np.ndarray] = None) -> MixedResult:
    """The ``--target-agreement`` search's first stage: 16-bit activations for the worst layers.

    ``cal``/``method``: an ``edgepipe.pipeline.ptq`` calibration and range
    method (the 8-bit tensors get its ranges); ``layers``: ``LayerError``s
    measured on ``x``, the validation inputs. The debugger's local error
    shortlists the 4x``max_layers`` (at least 16) worst layers; they are
    ranked by how much keeping each one float raises the output SNR on up
    to 32 of ``x`` (``ptq.rank_by_output``), then :func:`search` runs. ``ref``: the float model's outputs
    on ``x`` when the caller has them already.
    """
    from edgepipe.pipeline import ptq
    from edgepipe.pipeline.model_run import float_outputs

    say = on_step or (lambda msg: None)
    x = np.asarray(x, np.float32)
    ref = float_outputs(keras_model, x) if ref is None else np.asarray(ref)
    shortlist = sorted(layers, key=lambda e: -e.rmse_steps)[:max(16, 4 * max_layers)]
    pick = np.linspace(0, len(x) - 1, min(32, len(x))).astype(int)
    say(f"ranking {len(shortlist)} layers by their effect on the output ({len(pick)} validation images)")
    try:
        ranked = ptq.rank_by_output(cal, method, shortlist, x[pick], ref[pick], say=say)
    except ptq.PTQError as e:
        raise MixedPrecisionError(str(e)) from None
    ranges = None if method.ranges == "minmax" else named_ranges(cal.model, cal.ranges(method))
    return search(float_tflite(keras_model), calib, x, ref, [e.tensor for e in ranked], max_layers=max_layers,
                  target=target, ranges=ranges, measure_latency=measure_latency, on_step=say)


def named_ranges(calibrated_model: bytes, ranges: Mapping[int, Tuple[float, float]]) -> Dict[str, Tuple[float, float]]:
    """Tensor index -> range (e.g. ``ptq.Calibrated.ranges(method)``) re-keyed by tensor name."""
    from edgepipe.pipeline.convert_tflite import _name, _read

    tensors = _read(calibrated_model).subgraphs[0].tensors
    return {_name(tensors[i]): r for i, r in ranges.items() if 0 <= i < len(tensors)}


__all__ = ["A16W8Quantizer", "MAX_INT16_LAYERS", "MixedPrecisionError", "MixedResult", "Step", "a16w8_rules",
           "float_tflite", "named_ranges", "op_scopes", "search", "step_counts", "try_before_float"]
