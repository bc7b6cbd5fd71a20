"""Post-training int8 with a choice of activation ranges, measured on images it was not calibrated on.

TensorFlow's converter calibrates with plain min-max: every activation's
range is the extreme value seen over the calibration images, so one outlier
pixel of one image stretches the quantization step for all the others. Here
the model is calibrated once (``_experimental_calibrate_only``: a float model
with each tensor's min/max recorded), one more pass over the calibration
images histograms every activation inside that recorded range, and each
method rewrites the recorded ranges before the same MLIR quantizer
(``mlir_quantize``, what the converter itself calls) makes the int8 model:

* ``minmax``: the recorded ranges unchanged (the converter's own result);
* ``percentile:P``: each range clipped to the P-th percentile of its values
  (both tails when it spans zero), e.g. ``percentile:99.99``;
* ``mse``: the clipping that minimizes the expected squared error (rounding
  noise inside the range plus clipping error outside) under the histogram;

each with per-channel (default) or per-tensor weights, and optionally
``+bias``: empirical bias correction afterwards (:mod:`edgepipe.pipeline.bias_correction`). Model inputs and
outputs keep their min-max ranges: clipping the logits would flatten the top
scores, which is exactly what top-1 agreement measures.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from edgepipe.device.errors import EdgepipeError
from edgepipe.pipeline.layer_error import Debugged
from edgepipe.pipeline.tfenv import captured_output, import_tf, last_error_line

BINS = 2048
LEVELS = 256  # int8 activations
METHODS = ("minmax", "percentile:99.9", "percentile:99.99", "mse")


class PTQError(EdgepipeError, RuntimeError):
    """Calibration or quantization could not run; one-line reason."""


@dataclass(frozen=True)
class Method:
    """An activation-range method and the weight granularity."""

    ranges: str = "minmax"  # minmax | percentile:P | mse
    per_channel: bool = True
    bias_correction: bool = False  # see edgepipe.pipeline.bias_correction

    @property
    def name(self) -> str:
        return self.ranges + ("+bias" if self.bias_correction else "") + ("" if self.per_channel else " per-tensor")

    @classmethod
    def parse(cls, text: str) -> "Method":
        """``minmax``, ``percentile:99.99`` or ``mse``, optionally ``+bias``, then optionally `` per-tensor``."""
        parts = text.split()
        per_channel = not (len(parts) == 2 and parts[1] == "per-tensor")
        base = parts[0] if parts else ""
        bias = base.endswith("+bias")
        base = base[: -len("+bias")] if bias else base
        if len(parts) > 2 or (len(parts) == 2 and per_channel) or not _valid_ranges(base):
            raise PTQError(f"{text!r} is not a calibration method (minmax, percentile:P with 50 < P <= 100, "
                           "mse; optionally +bias, then optionally 'per-tensor')", param="calib_method")
        return cls(base, per_channel, bias)


def _valid_ranges(base: str) -> bool:
    if base in ("minmax", "mse"):
        return True
    if base.startswith("percentile:"):
        try:
            return 50.0 < float(base.split(":", 1)[1]) <= 100.0
        except ValueError:
            return False
    return False


@dataclass
class Histogram:
    """Values of one activation over the calibration images, in BINS bins over its recorded [lo, hi]."""

    lo: float
    hi: float
    counts: np.ndarray = field(default_factory=lambda: np.zeros(BINS, np.int64))

    def add(self, x: np.ndarray) -> None:
        if self.hi <= self.lo:
            return
        idx = ((x.reshape(-1) - self.lo) * (BINS / (self.hi - self.lo))).astype(np.int64)
        np.clip(idx, 0, BINS - 1, out=idx)
        self.counts += np.bincount(idx, minlength=BINS)

    def centers(self) -> np.ndarray:
        w = (self.hi - self.lo) / BINS
        return self.lo + (np.arange(BINS) + 0.5) * w


@dataclass
class Calibrated:
    """A float model with recorded activation ranges, and their histograms over the calibration images."""

    model: bytes
    hists: Dict[int, Histogram]  # tensor index -> histogram (activations only)
    images: int
    samples: Optional[np.ndarray] = None  # the calibration inputs histogrammed (bias correction reuses them)

    def ranges(self, method: Method) -> Dict[int, Tuple[float, float]]:
        """Tensor index -> (lo, hi) under ``method`` (activations only; zero always inside)."""
        out = {}
        for i, h in self.hists.items():
            lo, hi = _clip_range(h, method.ranges)
            out[i] = (min(lo, 0.0), max(hi, 0.0))
        return out

    def quantize(self, method: Method = Method(), denylist: Sequence[str] = ()) -> bytes:
        """The int8 model (float input/output) under ``method``, ``denylist`` tensors' ops left float."""
        from tensorflow.lite.python import convert as _convert

        model = self.model if method.ranges == "minmax" else _with_ranges(self.model, self.ranges(method))
        with captured_output() as log:
            try:
                q = _convert.mlir_quantize(model, disable_per_channel=not method.per_channel,
                                           denylisted_nodes=list(denylist) or None)
            except Exception as e:  # noqa: BLE001 - the quantizer raises many types
                raise PTQError(f"quantizing with {method.name} failed: {last_error_line(log) or e}") from None
        if not method.bias_correction:
            return q
        from edgepipe.pipeline.bias_correction import BiasCorrectionError, correct_bias

        if self.samples is None:
            raise PTQError("bias correction needs the calibration images")
        try:
            return correct_bias(q, self.model, self.samples)
        except BiasCorrectionError as e:
            raise PTQError(str(e)) from None


@dataclass
class RangedDebugged(Debugged):
    """A :class:`~edgepipe.pipeline.layer_error.Debugged` whose re-quantizations use ``method``'s ranges.

    Hand it to ``selective_int8(debugged=...)``: the search then keeps layers
    float on top of the better ranges instead of the converter's min-max.
    """

    ranged: Optional[Calibrated] = None
    method: Method = Method()
    keep_order: bool = False  # ``layers`` is already ranked (e.g. by rank_by_output)

    def quantize(self, denylist: Sequence[str] = ()) -> bytes:
        return self.ranged.quantize(self.method, denylist)

    def ranked(self) -> list:
        return list(self.layers) if self.keep_order else super().ranked()


def for_selective(cal: Calibrated, method: Method, layers: list, *, keep_order: bool = False) -> RangedDebugged:
    """``layers`` (LayerError, e.g. from ``debug_int8(..., debug=validation)``) searched over with ``method``."""
    return RangedDebugged(calibrated=cal.model, layers=list(layers), disable_per_channel=not method.per_channel,
                          ranged=cal, method=method, keep_order=keep_order)


def rank_by_output(cal: Calibrated, method: Method, layers: list, x: np.ndarray, ref: np.ndarray,
                   say=lambda msg: None) -> list:
    """``layers`` ordered by how much keeping each one float alone raises the output SNR on ``x``.

    One re-quantization and one pass over ``x`` per layer: slower than the
    debugger's local error, but it measures what the search optimises (the
    final output), so a layer whose local error the network absorbs ranks low.
    """
    from edgepipe.pipeline import metrics
    from edgepipe.pipeline.selective import run_tflite

    gains = []
    for i, e in enumerate(layers):
        snr = metrics.snr_db(run_tflite(cal.quantize(method, [e.tensor]), x), ref)
        gains.append((snr, -i))
        if (i + 1) % 10 == 0:
            say(f"ranked {i + 1} of {len(layers)} layers by output SNR")
    return [layers[-i] for _, i in sorted(gains, reverse=True)]


@dataclass
class Requantized:
    """An int8 bundle re-made with a range method, chosen on the evaluation images."""

    tflite: bytes
    method: Method
    chosen: str  # the method kept (``minmax`` when the asked one did not agree better)
    agreement: Dict[str, float]  # method name -> top-1 agreement with the float model
    snr_db: Dict[str, float]  # method name -> output SNR against the float model (breaks agreement ties)
    eval_images: int
    on_validation: bool  # False: measured on the calibration images (no validation set given)

    def to_dict(self) -> dict:
        """The manifest's ``extra["calibration_method"]`` block."""
        return {"asked": self.method.name, "chosen": self.chosen, "agreement": self.agreement,
                "snr_db": {k: round(v, 2) for k, v in self.snr_db.items()}, "eval_images": self.eval_images,
                "measured_on": "validation images" if self.on_validation else "calibration images"}


def apply_to_bundle(bundle_path, keras_model_path, method: Method, *, eval_dir=None,
                    on_step=lambda msg: None) -> Requantized:
    """Re-quantize an ``int8`` bundle with ``method``'s ranges when that agrees better with float.

    Better: higher top-1 agreement, or the same agreement and a higher output SNR.

    Calibration uses the images the manifest records; agreement is measured
    on ``eval_dir`` (or, without it, on the calibration images, and said so).
    The bundle is rewritten only when the method wins.
    """
    from edgepipe.pipeline import calibration, metrics, selective

    b = selective._int8_bundle(bundle_path)
    m = b.manifest
    calib = calibration.load_arrays(
        calibration.select(Path(m.calibration.source), m.calibration.count, m.calibration.seed), m.preprocess)
    ex = selective._eval_arrays(eval_dir, b, 300)
    ex = calib if ex is None else ex
    keras = selective._keras_model(keras_model_path)
    ref = selective.float_outputs(keras, ex)
    on_step(f"calibrating {len(calib)} images for {method.name} ranges")
    cal = calibrate(keras, calib)
    model = cal.quantize(method)
    outs = {"minmax": selective.run_tflite(b.model_path.read_bytes(), ex),
            method.name: selective.run_tflite(model, ex)}
    agree = {k: metrics.top1_agreement(o, ref) for k, o in outs.items()}
    snr = {k: metrics.snr_db(o, ref) for k, o in outs.items()}
    won = (agree[method.name], snr[method.name]) > (agree["minmax"], snr["minmax"])
    res = Requantized(tflite=model if won else b.model_path.read_bytes(), method=method,
                      chosen=method.name if won else "minmax", agreement=agree, snr_db=snr,
                      eval_images=int(len(ex)), on_validation=eval_dir is not None)
    if won:
        selective._rewrite_bundle(b, res, key="calibration_method")
    else:  # the model stays; the manifest learns what was tried
        import dataclasses

        from edgepipe.device.bundle import write_manifest

        write_manifest(b.path, dataclasses.replace(m, extra={**m.extra, "calibration_method": res.to_dict()}))
    return res


def _clip_range(h: Histogram, ranges: str) -> Tuple[float, float]:
    if ranges == "minmax" or h.counts.sum() == 0:
        return h.lo, h.hi
    if ranges.startswith("percentile:"):
        p = float(ranges.split(":", 1)[1]) / 100.0
        cdf = np.cumsum(h.counts) / h.counts.sum()
        edges = h.lo + np.arange(1, BINS + 1) * ((h.hi - h.lo) / BINS)
        hi = float(edges[min(BINS - 1, np.searchsorted(cdf, p))])
        lo = h.lo if h.lo >= 0 else float(edges[max(0, np.searchsorted(cdf, 1.0 - p) - 1)])
        return lo, hi
    return _mse_range(h)


def _mse_range(h: Histogram) -> Tuple[float, float]:
    """The shrink of [lo, hi] (towards 0, both ends alike) with the least expected squared error."""
    c, n = h.centers(), h.counts.astype(np.float64)
    best, best_err = (h.lo, h.hi), np.inf
    for s in np.linspace(0.2, 1.0, 81):
        lo, hi = h.lo * s, h.hi * s
        step = (hi - lo) / (LEVELS - 1)
        clipped = np.clip(c, lo, hi)
        err = float(np.sum(n * ((c - clipped) ** 2 + np.where(c == clipped, step * step / 12.0, 0.0))))
        if err < best_err:
            best, best_err = (lo, hi), err
    return best


def calibrate(keras_model, calib: np.ndarray, *, max_hist_images: int = 64) -> Calibrated:
    """Calibrate ``keras_model`` on ``calib`` (float inputs, axis 0) and histogram every activation."""
    tf = import_tf()
    calib = np.asarray(calib, dtype=np.float32)
    if calib.ndim < 2 or calib.shape[0] == 0:
        raise PTQError("calibration: no images")

    def rep():
        for i in range(calib.shape[0]):
            yield [calib[i:i + 1]]

    with captured_output() as log:
        try:
            conv = tf.lite.TFLiteConverter.from_keras_model(keras_model)
            conv.optimizations = [tf.lite.Optimize.DEFAULT]
            conv.representative_dataset = rep
            conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
            conv._experimental_calibrate_only = True
            model = conv.convert()
        except Exception as e:  # noqa: BLE001
            raise PTQError(f"calibration failed: {last_error_line(log) or e}") from None
    hists = _histograms(tf, model, calib[:max_hist_images])
    return Calibrated(model=model, hists=hists, images=int(calib.shape[0]), samples=calib[:max_hist_images])


def _recorded_ranges(model: bytes) -> Dict[int, Tuple[float, float]]:
    """Tensor index -> recorded (min, max) of subgraph 0's non-constant tensors."""
    from tensorflow.lite.tools import flatbuffer_utils as fu

    m = fu.read_model_from_bytearray(bytearray(model))
    g = m.subgraphs[0]
    ends = set(g.inputs) | set(g.outputs)
    out = {}
    for i, t in enumerate(g.tensors):
        q = t.quantization
        if i in ends or q is None or q.min is None or q.max is None or len(q.min) != 1:
            continue
        if m.buffers[t.buffer].data is not None:  # constants (weights) are quantized from their values
            continue
        out[i] = (float(q.min[0]), float(q.max[0]))
    return out


def _histograms(tf, model: bytes, xs: np.ndarray) -> Dict[int, Histogram]:
    hists = {i: Histogram(lo, hi) for i, (lo, hi) in _recorded_ranges(model).items()}
    with captured_output():
        interp = tf.lite.Interpreter(model_content=model, experimental_preserve_all_tensors=True)
        interp.allocate_tensors()
    inp = interp.get_input_details()[0]["index"]
    for x in xs:
        interp.set_tensor(inp, x[None])
        interp.invoke()
        for i, h in hists.items():
            h.add(interp.get_tensor(i))
    return hists


def _with_ranges(model: bytes, ranges: Dict[int, Tuple[float, float]]) -> bytes:
    from tensorflow.lite.tools import flatbuffer_utils as fu

    m = fu.read_model_from_bytearray(bytearray(model))
    tensors = m.subgraphs[0].tensors
    for i, (lo, hi) in ranges.items():
        tensors[i].quantization.min = [float(lo)]
        tensors[i].quantization.max = [float(hi)]
    return bytes(fu.convert_object_to_bytearray(m))


__all__ = ["BINS", "METHODS", "Calibrated", "Histogram", "Method", "PTQError", "RangedDebugged", "Requantized",
           "apply_to_bundle", "calibrate", "for_selective", "rank_by_output"]
