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
``+cle``: cross-layer equalization of the Keras model before calibrating
(:mod:`edgepipe.pipeline.cle`; data-free, but its ReLU6 become ReLU, so the
model quantized is not exactly the float one: agreement is always measured
against the original), and ``+bias``: empirical bias correction afterwards
(:mod:`edgepipe.pipeline.bias_correction`). Model inputs and outputs keep their
min-max ranges: clipping the logits would flatten the top scores, which is
exactly what top-1 agreement measures.

Method grammar: ``RANGES[+cle][+bias][ per-tensor]``, RANGES one of
``minmax``, ``percentile:P`` (50 < P <= 100), ``mse``; the ``+`` modifiers in
any order, each at most once; names are written ``RANGES+cle+bias``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from edgepipe.device.errors import EdgepipeError
from edgepipe.pipeline.act_ranges import BINS, Histogram, clip_range, histograms, with_ranges
from edgepipe.pipeline.layer_error import Debugged
from edgepipe.pipeline.modelio import load_keras, one_line
from edgepipe.pipeline.tfenv import captured_output, import_tf, last_error_line

METHODS = ("minmax", "percentile:99.9", "percentile:99.99", "mse")


class PTQError(EdgepipeError, RuntimeError):
    """Calibration or quantization could not run; one-line reason."""


MODIFIERS = ("cle", "bias")


@dataclass(frozen=True)
class Method:
    """An activation-range method, the weight granularity, and the data-free fixes around it."""

    ranges: str = "minmax"  # minmax | percentile:P | mse
    per_channel: bool = True
    bias_correction: bool = False  # see edgepipe.pipeline.bias_correction
    cle: bool = False  # cross-layer equalization first, see edgepipe.pipeline.cle

    @property
    def name(self) -> str:
        return (self.ranges + ("+cle" if self.cle else "") + ("+bias" if self.bias_correction else "")
                + ("" if self.per_channel else " per-tensor"))

    @classmethod
    def parse(cls, text: str) -> "Method":
        """``RANGES[+cle][+bias][ per-tensor]``: e.g. ``mse``, ``mse+cle+bias``, ``minmax+cle per-tensor``."""
        parts = text.split()
        per_channel = not (len(parts) == 2 and parts[1] == "per-tensor")
        base, *mods = (parts[0] if parts else "").split("+")
        if (len(parts) > 2 or (len(parts) == 2 and per_channel) or not _valid_ranges(base)
                or len(set(mods)) != len(mods) or not set(mods) <= set(MODIFIERS)):
            raise PTQError(f"{text!r} is not a calibration method (minmax, percentile:P with 50 < P <= 100 or mse; "
                           "then optionally +cle and/or +bias; then optionally 'per-tensor')", param="calib_method")
        return cls(base, per_channel, "bias" in mods, "cle" in mods)


def _equalization_block(cal: Calibrated, x: np.ndarray, ref: np.ndarray) -> dict:
    from edgepipe.pipeline.cle import float_cost

    eq = cal.equalized()
    return float_cost(eq.source, eq.equalization, x, ref)


def _mapped(src: "Calibrated", dst: "Calibrated", names: Sequence[str]) -> list:
    """``names`` of ``src``'s tensors as ``dst`` calls them (the same graph: equalization only changes
    weights and turns ReLU6 into ReLU, which renames fused tensors)."""
    a, b = src.tensor_names(), dst.tensor_names()
    if len(a) != len(b):
        raise PTQError(f"the equalized model has {len(b)} tensors, the original {len(a)}: float layers cannot be "
                       "mapped onto it")
    index = {n: i for i, n in enumerate(a)}
    return [b[index[n]] if n in index else n for n in names]


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
class Calibrated:
    """A float model with recorded activation ranges, and their histograms over the calibration images."""

    model: bytes
    hists: Dict[int, Histogram]  # tensor index -> histogram (activations only)
    images: int
    samples: Optional[np.ndarray] = None  # the calibration inputs histogrammed (bias correction reuses them)
    source: object = field(default=None, repr=False)  # the Keras model calibrated (+cle equalizes it)
    calib: Optional[np.ndarray] = field(default=None, repr=False)  # all calibration inputs (+cle recalibrates)
    max_hist_images: int = 64
    equalization: object = None  # cle.Equalization when ``source`` is the equalized model
    _equalized: Optional["Calibrated"] = field(default=None, repr=False)
    _names: Optional[list] = field(default=None, repr=False)

    def ranges(self, method: Method) -> Dict[int, Tuple[float, float]]:
        """Tensor index -> (lo, hi) under ``method`` (activations only; zero always inside)."""
        out = {}
        for i, h in self.hists.items():
            lo, hi = clip_range(h, method.ranges)
            out[i] = (min(lo, 0.0), max(hi, 0.0))
        return out

    def equalized(self) -> "Calibrated":
        """This calibration redone on the cross-layer-equalized Keras model (once; see :mod:`.cle`)."""
        if self.equalization is not None:
            return self
        if self._equalized is None:
            if self.source is None or self.calib is None:
                raise PTQError("cross-layer equalization needs the Keras model and the calibration images")
            from edgepipe.pipeline.cle import equalize

            try:
                model, summary = equalize(self.source)
            except Exception as e:  # noqa: BLE001 - cloning a Keras model raises many types
                raise PTQError(f"cross-layer equalization failed: {one_line(e)}") from None
            if summary.pairs:
                self._equalized = calibrate(model, self.calib, max_hist_images=self.max_hist_images)
                self._equalized.equalization = summary
            else:  # nothing to equalize: the same model, already calibrated
                self._equalized = dataclasses.replace(self, equalization=summary, _equalized=None)
        return self._equalized

    def tensor_names(self) -> list:
        """Subgraph 0's tensor names, by index (cached)."""
        if self._names is None:
            from tensorflow.lite.tools import flatbuffer_utils as fu

            g = fu.read_model_from_bytearray(bytearray(self.model)).subgraphs[0]
            self._names = [t.name.decode() if isinstance(t.name, bytes) else t.name for t in g.tensors]
        return self._names

    def quantize(self, method: Method = Method(), denylist: Sequence[str] = ()) -> bytes:
        """The int8 model (float input/output) under ``method``, ``denylist`` tensors' ops left float.

        With ``method.cle`` the equalized model is quantized; ``denylist``
        names this (unequalized) model's tensors and is mapped across.
        """
        if method.cle and self.equalization is None:
            eq = self.equalized()
            return eq.quantize(method, _mapped(self, eq, denylist) if denylist else ())
        if not method.cle and self.equalization is not None:
            raise PTQError(f"{method.name}: this calibration is of the equalized model, which only +cle uses")
        from tensorflow.lite.python import convert as _convert

        model = self.model if method.ranges == "minmax" else with_ranges(self.model, self.ranges(method))
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
    from edgepipe.pipeline.model_run import run_tflite

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
    on_validation: bool  # False: measured on the calibration images (no validation set, none held back)
    equalization: Optional[dict] = None  # +cle: cle.Equalization.to_dict() and the float model's own agreement
    measured_on: str = ""  # validation | held-back | calibration (selective.eval_inputs)

    def to_dict(self) -> dict:
        """The manifest's ``extra["calibration_method"]`` block."""
        return {"asked": self.method.name, "chosen": self.chosen, "agreement": self.agreement,
                "snr_db": {k: round(v, 2) for k, v in self.snr_db.items()}, "eval_images": self.eval_images,
                "measured_on": f"{self.measured_on or ('validation' if self.on_validation else 'calibration')} images",
                **({"equalization": self.equalization} if self.equalization else {})}


def apply_to_bundle(bundle_path, keras_model_path, method: Method, *, eval_dir=None,
                    on_step=lambda msg: None) -> Requantized:
    """Re-quantize an ``int8`` bundle with ``method``'s ranges when that agrees better with float.

    Better: higher top-1 agreement, or the same agreement and a higher output SNR.

    Calibration uses the images the manifest records; agreement is measured
    on ``eval_dir`` (or, without it, on the calibration images, and said so).
    The bundle is rewritten only when the method wins.
    """
    from edgepipe.pipeline import metrics, selective
    from edgepipe.pipeline.model_run import float_outputs, run_tflite

    bi = selective.bundle_inputs(bundle_path, eval_dir)
    b, m, calib, ex, where = bi.bundle, bi.bundle.manifest, bi.calib, bi.ex, bi.where
    keras = load_keras(keras_model_path)
    ref = float_outputs(keras, ex)
    on_step(f"calibrating {len(calib)} images for {method.name} ranges")
    cal = calibrate(keras, calib)
    model = cal.quantize(method)
    outs = {"minmax": run_tflite(b.model_path.read_bytes(), ex), method.name: run_tflite(model, ex)}
    agree = {k: metrics.top1_agreement(o, ref) for k, o in outs.items()}
    snr = {k: metrics.snr_db(o, ref) for k, o in outs.items()}
    won = (agree[method.name], snr[method.name]) > (agree["minmax"], snr["minmax"])
    res = Requantized(tflite=model if won else b.model_path.read_bytes(), method=method,
                      chosen=method.name if won else "minmax", agreement=agree, snr_db=snr,
                      eval_images=int(len(ex)), on_validation=where != "calibration", measured_on=where,
                      equalization=_equalization_block(cal, ex, ref) if method.cle else None)
    if won:
        selective._rewrite_bundle(b, res, key="calibration_method")
    else:  # the model stays; the manifest learns what was tried
        from edgepipe.device.bundle import write_manifest

        write_manifest(b.path, dataclasses.replace(m, extra={**m.extra, "calibration_method": res.to_dict()}))
    return res


def calibrate(keras_model, calib: np.ndarray, *, max_hist_images: int = 64) -> Calibrated:
    """Calibrate ``keras_model`` on ``calib`` (float inputs, axis 0) and histogram every activation."""
    from edgepipe.pipeline.calibration import calibrating_converter

    tf = import_tf()
    calib = np.asarray(calib, dtype=np.float32)
    if calib.ndim < 2 or calib.shape[0] == 0:
        raise PTQError("calibration: no images")
    with captured_output() as log:
        try:
            conv = calibrating_converter(keras_model, calib)
            conv._experimental_calibrate_only = True
            model = conv.convert()
        except Exception as e:  # noqa: BLE001
            raise PTQError(f"calibration failed: {last_error_line(log) or e}") from None
    hists = histograms(tf, model, calib[:max_hist_images])
    return Calibrated(model=model, hists=hists, images=int(calib.shape[0]), samples=calib[:max_hist_images],
                      source=keras_model, calib=calib, max_hist_images=max_hist_images)


__all__ = ["BINS", "METHODS", "MODIFIERS", "Calibrated", "Histogram", "Method", "PTQError", "RangedDebugged",
           "Requantized", "apply_to_bundle", "calibrate", "for_selective", "rank_by_output"]
