"""Selective int8 quantization: keep the fewest sensitive layers in float to hit a target.

The search ranks layers by their local quantization error (see
``edgepipe.pipeline.layer_error``), then finds the shortest prefix of that ranking
whose float-kept model reaches ``target`` top-1 agreement with the float Keras
model on the evaluation inputs (exponential then binary search: agreement
grows, roughly monotonically, with every layer kept in float), and finally
tries to drop each kept layer again in case a later one made it redundant.

Everything is recorded: which layers stayed float, their error score (why),
the agreement after each step, and the latency each kept layer costs. With
``try_int16`` (:func:`apply_to_bundle`), 16-bit activations for the worst
layers are tried first (:mod:`edgepipe.pipeline.mixed_precision`); the search
itself lives in :mod:`edgepipe.pipeline.float_search`, running and timing
models in :mod:`edgepipe.pipeline.model_run`.

Entry point for ``edgepipe convert --target-agreement``::

    from edgepipe.pipeline.selective import selective_int8
    result = selective_int8(keras_path, recipe, calib_x, eval_x, target)
    model_bytes = result.tflite
    manifest_extra = {"selective": result.to_dict()}
"""
from __future__ import annotations

import dataclasses
import hashlib
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Tuple

import numpy as np

from edgepipe.pipeline import metrics
# Re-exported: ptq, scripts and tests measure with these through this module.
from edgepipe.pipeline.model_run import float_outputs, run_tflite
from edgepipe.pipeline.float_search import Search as _Search, float_layer_costs as _float_layer_costs
from edgepipe.pipeline.layer_error import Debugged, LayerErrorError, debug_int8
from edgepipe.pipeline.modelio import load_keras
from edgepipe.device.errors import EdgepipeError

SUPPORTED_RECIPES = ("int8",)


class SelectiveError(EdgepipeError, ValueError):
    """Selective quantization cannot run as asked; one-line reason."""


@dataclass
class SelectiveResult:
    tflite: bytes
    target: float
    agreement: float  # top-1 agreement of the returned model
    baseline_agreement: float  # plain int8 (nothing kept in float)
    reached: bool
    kept: list  # LayerError, in the order they were added
    layers_total: int
    steps: list = field(default_factory=list)  # [{"float_layers": k, "agreement": a}]
    latency: list = field(default_factory=list)  # [{"layer", "p50_ms", "cost_ms"}]
    eval_images: int = 0
    seconds: float = 0.0
    ranks: dict = field(default_factory=dict)  # tensor -> 1-based sensitivity rank
    a16w8: Optional[dict] = None  # MixedResult.to_dict(): the 16-bit activation steps tried first
    measured_on: str = ""  # validation | held-back | calibration (see eval_inputs)

    @property
    def int16_chosen(self) -> bool:
        """The returned model is the 16-bit-activation step, not a float-kept one."""
        return bool(self.a16w8) and self.a16w8.get("chosen_step") is not None

    def to_dict(self) -> dict:
        """The manifest's ``extra["selective"]`` block (``a16w8`` only when 16-bit steps were tried)."""
        return {
            "method": ("16-bit activations for the worst layers (ai-edge-quantizer a16w8)" if self.int16_chosen
                       else "denylist most sensitive layers (QuantizationDebugger rmse/scale ranking)"),
            "target_agreement": self.target,
            "reached": self.reached,
            "agreement": self.agreement,
            "baseline_agreement": self.baseline_agreement,
            "eval_images": self.eval_images,
            **({"measured_on": self.measured_on} if self.measured_on else {}),
            "layers_total": self.layers_total,
            "float_layers": [
                {**e.to_dict(), "reason": (
                    f"sensitivity rank {self.ranks.get(e.tensor, '?')}/{self.layers_total}: int8 adds "
                    f"{e.rmse_steps:.2f} quantization steps of error here (pure rounding is 0.29); "
                    f"without it agreement stays below {self.target}")}
                for e in self.kept],
            "steps": list(self.steps),
            "latency": list(self.latency),
            "seconds": round(self.seconds, 2),
            **({"a16w8": self.a16w8} if self.a16w8 else {}),
        }


def selective_int8(keras_model, recipe, calib: np.ndarray, eval_x: Optional[np.ndarray],
                   target: float, *, max_float: Optional[int] = None, prune: bool = True,
                   measure_latency: bool = True, threads: Optional[int] = 1,
                   on_step: Optional[Callable[[str], None]] = None,
                   debugged: Optional[Debugged] = None, shipped: Optional[bytes] = None,
                   ref: Optional[np.ndarray] = None) -> SelectiveResult:
    """Int8 model keeping the fewest most-sensitive layers in float to reach ``target``.

    ``keras_model``: a Keras model or a .keras path. ``recipe``: a
    ``edgepipe.pipeline.recipes.Recipe`` or its name (only ``int8``: float I/O, the
    float layers need float tensors around them). ``calib``/``eval_x``: float
    model inputs stacked on axis 0 (``eval_x`` defaults to ``calib``).
    ``target``: top-1 agreement with the float model in (0, 1]. ``shipped``:
    the int8 model the converter already made; it is returned untouched when
    it meets the target, or when no float layer does better (the debugger's
    re-quantization is not bit-identical to the converter's own int8 model).
    ``ref``: the float model's outputs on the evaluation inputs, when the caller has them already.
    """
    t_start = time.perf_counter()
    _check_request(recipe, target)
    say = on_step or (lambda msg: None)
    keras_model = load_keras(keras_model)
    calib = np.asarray(calib, dtype=np.float32)
    ex = _eval_inputs(eval_x, calib)

    ref = float_outputs(keras_model, ex) if ref is None else np.asarray(ref)
    shipped_agreement = None
    if shipped is not None:
        shipped_agreement = metrics.top1_agreement(run_tflite(shipped, ex, threads=threads), ref)
        say(f"plain int8: agreement {shipped_agreement:.4f}")
        if shipped_agreement >= target:
            return _plain_int8(shipped, shipped_agreement, target, int(ex.shape[0]), t_start)

    # Layers are ranked on the evaluation images too, so nothing is tuned to the calibration images.
    say(f"measuring per-layer error on {min(len(ex), 32)} of the images agreement is measured on")
    try:
        dbg = debugged or debug_int8(keras_model, calib, debug=ex)
    except LayerErrorError as e:
        raise SelectiveError(str(e)) from None
    ranked = dbg.ranked()
    search = _Search(dbg, ex, ref, float(target), threads, say)
    kept = search.shortest_prefix(ranked, len(ranked) if max_float is None else min(max_float, len(ranked)))
    if prune and search.reaches(kept) and 1 < len(kept) <= 12:
        kept = search.prune(kept)
    agreement, model = search.agreement_of(kept), search.model_of(kept)
    if _shipped_wins(shipped_agreement, agreement, kept, target):
        say("no float layer beats the plain int8 model: keeping it")
        kept, agreement, model = [], shipped_agreement, shipped

    latency = _float_layer_costs(dbg, kept, ex, threads, say) if measure_latency and kept else []
    return SelectiveResult(
        tflite=model, target=float(target), agreement=agreement,
        baseline_agreement=shipped_agreement if shipped_agreement is not None else search.baseline,
        reached=agreement >= target, kept=kept, layers_total=len(ranked), steps=search.steps,
        latency=latency, eval_images=int(ex.shape[0]), seconds=time.perf_counter() - t_start,
        ranks={e.tensor: i + 1 for i, e in enumerate(ranked)})


def _plain_int8(shipped: bytes, agreement: float, target: float, images: int, t_start: float) -> SelectiveResult:
    """The converter's own int8 model already meets the target: nothing goes float."""
    return SelectiveResult(
        tflite=shipped, target=float(target), agreement=agreement,
        baseline_agreement=agreement, reached=True, kept=[], layers_total=0,
        steps=[{"float_layers": 0, "agreement": agreement, "model": "plain int8"}],
        eval_images=images, seconds=time.perf_counter() - t_start)


def _shipped_wins(shipped_agreement: Optional[float], agreement: float, kept: list, target: float) -> bool:
    """Keep the converter's own int8 model when the float-kept one is no better (or nothing went float)."""
    if shipped_agreement is None:
        return False
    return agreement <= shipped_agreement or (not kept and agreement < target)


def _check_request(recipe, target: float) -> None:
    name = getattr(recipe, "name", recipe)
    if name not in SUPPORTED_RECIPES:
        raise SelectiveError(f"only works with recipe "
                             f"{', '.join(SUPPORTED_RECIPES)}, not {name!r}", param="target_agreement")
    if not (0.0 < float(target) <= 1.0):
        raise SelectiveError(f"{target} is not in (0, 1]", param="target_agreement")


def _eval_inputs(eval_x: Optional[np.ndarray], calib: np.ndarray) -> np.ndarray:
    ex = np.asarray(eval_x if eval_x is not None else calib, dtype=np.float32)
    if ex.shape[0] == 0:
        raise SelectiveError("no evaluation images", param="target_agreement")
    return ex


def apply_to_bundle(bundle_path, keras_model_path, target: float, *, eval_dir=None,
                    eval_limit: int = 300, measure_latency: bool = True,
                    on_step: Optional[Callable[[str], None]] = None, method=None,
                    try_int16: int = 0) -> SelectiveResult:
    """Re-make an ``int8`` bundle so it reaches ``target`` agreement; rewrites it atomically.

    Calibration uses the images recorded in the bundle's manifest (same
    folder, count and seed, so the same files); agreement is measured on
    ``eval_dir`` (folder, class sub-folders allowed) or on those calibration
    images. The manifest gets ``extra["selective"]`` (which layers, why, and
    the latency each one costs) and the new model's digest and size.
    ``method`` (an ``edgepipe.pipeline.ptq.Method``): search on top of those
    activation ranges instead of the converter's min-max. ``try_int16``: first
    try 16-bit activations for up to that many of the worst layers
    (:mod:`edgepipe.pipeline.mixed_precision`); that model ships when it
    reaches ``target`` and is not slower than fp32, else the float search runs.
    """
    bi = bundle_inputs(bundle_path, eval_dir, eval_limit)
    b, m, calib, ex, where = bi.bundle, bi.bundle.manifest, bi.calib, bi.ex, bi.where
    if on_step is not None:
        on_step(f"agreement measured on {len(ex)} {_WHERE[where]} images")
    shipped = b.model_path.read_bytes()
    keras = load_keras(keras_model_path)
    ref = float_outputs(keras, ex)  # once, for the 16-bit steps and the float search alike
    debugged, mixed = _prepare(keras, calib, ex, ref, method, target, try_int16, measure_latency, on_step, shipped)
    if mixed is not None and mixed.model is not None:
        res = _a16w8_result(mixed, shipped, ex, target, len(debugged.layers))
    else:
        res = selective_int8(keras, m.recipe, calib, ex, target, measure_latency=measure_latency, on_step=on_step,
                             shipped=shipped, debugged=debugged, ref=ref)
        res.a16w8 = None if mixed is None else mixed.to_dict()
    res.measured_on = where
    if not res.kept and not res.int16_chosen:
        # The plain int8 model stays; only the manifest learns what was tried.
        from edgepipe.device.bundle import write_manifest

        write_manifest(b.path, dataclasses.replace(m, extra={**m.extra, "selective": res.to_dict()}))
    else:
        _rewrite_bundle(b, res)
    return res


def _prepare(keras, calib, x, ref, method, target, try_int16, measure_latency, on_step, shipped):
    """(debugged for the float search or None, the 16-bit steps or None): one calibration serves both.

    ``x``: the inputs agreement is measured on, ``ref`` the float model's outputs on them."""
    if (method is None or method.name == "minmax") and not try_int16:
        return None, None
    from edgepipe.pipeline import mixed_precision, ptq

    if try_int16 and metrics.top1_agreement(run_tflite(shipped, x), ref) >= target:
        try_int16 = 0  # plain int8 already reaches it: nothing to try
        if method is None or method.name == "minmax":
            return None, None
    try:
        dbg = debug_int8(keras, calib, debug=x)
        cal = ptq.calibrate(keras, calib)
        ranged = method is not None and method.name != "minmax"
        debugged = ptq.for_selective(cal, method, dbg.layers) if ranged else dbg
        mixed = None if not try_int16 else mixed_precision.try_before_float(
            keras, cal, method or ptq.Method(), dbg.layers, calib, x, target, try_int16,
            measure_latency=measure_latency, on_step=on_step, ref=ref)
    except (ptq.PTQError, LayerErrorError, mixed_precision.MixedPrecisionError) as e:
        raise SelectiveError(str(e)) from None
    return debugged, mixed


def _a16w8_result(mixed, shipped: bytes, x: np.ndarray, target: float, layers_total: int) -> SelectiveResult:
    """The chosen 16-bit-activation step as the search's result (no layer float)."""
    step = mixed.steps[mixed.chosen]
    return SelectiveResult(
        tflite=mixed.model, target=float(target), agreement=step.agreement,
        baseline_agreement=metrics.top1_agreement(run_tflite(shipped, x), mixed.reference), reached=True, kept=[],
        layers_total=layers_total, steps=[], eval_images=int(len(x)), seconds=mixed.seconds,
        a16w8=mixed.to_dict())


def _int8_bundle(bundle_path):
    """The bundle, checked to be an int8 one that records its calibration images."""
    from edgepipe.device.bundle import BundleError, load_bundle

    try:
        b = load_bundle(bundle_path)
    except BundleError as e:
        raise SelectiveError(str(e)) from None
    m = b.manifest
    if m is None or m.recipe not in SUPPORTED_RECIPES:
        raise SelectiveError(f"{bundle_path} is not an int8 bundle", param="target_agreement")
    if (m.extra or {}).get("input_size"):
        raise SelectiveError("not supported together with an input size change", param="target_agreement")
    if m.calibration is None or not m.calibration.source or m.preprocess is None:
        raise SelectiveError(f"{bundle_path} records no calibration images", param="target_agreement")
    return b


@dataclass(frozen=True)
class BundleInputs:
    """An int8 bundle, its calibration inputs and the inputs every agreement is measured on."""

    bundle: Any
    calib: np.ndarray
    ex: np.ndarray  # the calibration inputs themselves when nothing else is available (see ``where``)
    where: str  # validation | held-back | calibration


def bundle_inputs(bundle_path, eval_dir, eval_limit: int = 300) -> BundleInputs:
    """The bundle, its calibration images (the manifest's folder, count and seed) and :func:`eval_inputs`."""
    from edgepipe.pipeline import calibration

    b = _int8_bundle(bundle_path)
    m = b.manifest
    calib = calibration.load_arrays(
        calibration.select(Path(m.calibration.source), m.calibration.count, m.calibration.seed), m.preprocess)
    ex, where = eval_inputs(eval_dir, b, eval_limit)
    return BundleInputs(b, calib, calib if ex is None else ex, where)


_WHERE = {"validation": "validation", "held-back": "held-back (in the calibration folder, not calibrated on)",
          "calibration": "calibration (no validation folder, none held back)"}
HELD_BACK_MIN = 8  # fewer images left over than this: agreement steps too coarse to steer by


def eval_inputs(eval_dir, b, eval_limit: int) -> Tuple[Optional[np.ndarray], str]:
    """(inputs, where from) for every agreement measured on an int8 bundle: ``validation``, the images in
    ``eval_dir``; else ``held-back``, the calibration folder's images that calibration did not pick (at least
    :data:`HELD_BACK_MIN`); else ``(None, "calibration")``: the caller measures on the calibration images and
    must say so.
    """
    if eval_dir is not None:
        return _eval_arrays(eval_dir, b, eval_limit), "validation"
    held = _held_back(b, eval_limit)
    return (held, "held-back") if held is not None else (None, "calibration")


def _held_back(b, limit: int) -> Optional[np.ndarray]:
    from edgepipe.device.preprocess import list_images
    from edgepipe.pipeline import calibration
    from edgepipe.pipeline.evaluate import load_inputs

    m = b.manifest
    folder = Path(m.calibration.source)
    picked = {Path(p).name for p in calibration.select(folder, m.calibration.count, m.calibration.seed).paths}
    try:
        paths, _ = list_images(folder)
    except OSError:
        return None
    rest = sorted(Path(p) for p in paths if Path(p).name not in picked)
    if len(rest) < HELD_BACK_MIN:
        return None
    if len(rest) > limit:  # seeded like calibration's own pick, so a rerun measures the same images
        idx = np.random.default_rng(m.calibration.seed).choice(len(rest), size=limit, replace=False)
        rest = [rest[i] for i in sorted(idx)]
    return load_inputs(rest, m.preprocess)


def _eval_arrays(eval_dir, b, eval_limit: int) -> Optional[np.ndarray]:
    """The bundle's float inputs for the images in ``eval_dir``."""
    from edgepipe.pipeline.evaluate import EvalError, load_dataset, load_inputs

    try:
        ds = load_dataset(Path(eval_dir), class_names=b.labels or None, limit=eval_limit)
        return load_inputs(ds.paths, b.manifest.preprocess)
    except EvalError as e:
        raise SelectiveError(str(e)) from None


def _rewrite_bundle(b, res, key: str = "selective") -> None:
    """Replace the bundle's model with ``res.tflite``; the manifest's ``extra[key]`` records why."""
    from edgepipe.device.bundle import TensorInfo
    from edgepipe.pipeline.bundle_writer import write_bundle

    m = b.manifest

    def manifest_for(model_file, _tpu):
        from edgepipe.device.runtime import load_model

        lm = load_model(model_file)
        return dataclasses.replace(
            m, model_sha256=hashlib.sha256(res.tflite).hexdigest(), model_size=len(res.tflite),
            inputs=tuple(TensorInfo.from_dict(t.to_dict()) for t in lm.inputs),
            outputs=tuple(TensorInfo.from_dict(t.to_dict()) for t in lm.outputs),
            extra={**m.extra, key: res.to_dict()})

    if not m.labels_file:
        write_bundle(b.path.parent, b.path.name, res.tflite, manifest_for=manifest_for, labels=None)
        return
    # write_bundle copies labels into a fresh folder; read them from a copy
    # outside the folder being replaced.
    tmp = Path(tempfile.mkdtemp(prefix="edgepipe-labels-"))
    try:
        shutil.copyfile(b.path / m.labels_file, tmp / "labels.txt")
        write_bundle(b.path.parent, b.path.name, res.tflite, manifest_for=manifest_for, labels=tmp / "labels.txt")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)