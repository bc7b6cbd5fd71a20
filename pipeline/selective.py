"""Selective int8 quantization: keep the fewest sensitive layers in float to hit a target.

The search ranks layers by their local quantization error (see
``edgepipe.pipeline.layer_error``), then finds the shortest prefix of that ranking
whose float-kept model reaches ``target`` top-1 agreement with the float Keras
model on the evaluation inputs (exponential then binary search: agreement
grows, roughly monotonically, with every layer kept in float), and finally
tries to drop each kept layer again in case a later one made it redundant.

Everything is recorded: which layers stayed float, their error score (why),
the agreement after each step, and the latency each kept layer costs.

Entry point for ``edgepipe convert --target-agreement``::

    from edgepipe.pipeline.selective import selective_int8
    result = selective_int8(keras_path, recipe, calib_x, eval_x, target)
    model_bytes = result.tflite
    manifest_extra = {"selective": result.to_dict()}
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from edgepipe.pipeline import metrics
from edgepipe.pipeline.layer_error import Debugged, LayerError, LayerErrorError, debug_int8
from edgepipe.device.errors import EdgepipeError

SUPPORTED_RECIPES = ("int8",)
MAX_TIMED_LAYERS = 12


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

    def to_dict(self) -> dict:
        """The manifest's ``extra["selective"]`` block."""
        return {
            "method": "denylist most sensitive layers (QuantizationDebugger rmse/scale ranking)",
            "target_agreement": self.target,
            "reached": self.reached,
            "agreement": self.agreement,
            "baseline_agreement": self.baseline_agreement,
            "eval_images": self.eval_images,
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
        }


def _load_bytes(model: bytes, threads: Optional[int]):
    """A device-runtime model from bytes (the runtime loads files; the file goes once loaded)."""
    from edgepipe.device.runtime import load_model

    fd, path = tempfile.mkstemp(suffix=".tflite", prefix="edgepipe-sel-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(model)
        return load_model(path, threads=threads)
    finally:
        os.unlink(path)


def run_tflite(model: bytes, x: np.ndarray, *, threads: Optional[int] = 1) -> np.ndarray:
    """Float outputs (first output, one row per input) of a TFLite model via the device runtime."""
    lm = _load_bytes(model, threads)
    return np.stack([lm.predict([x[i:i + 1]])[0].reshape(-1) for i in range(x.shape[0])])


def p50_ms(model: bytes, x: np.ndarray, *, runs: int = 30, warmup: int = 3,
           threads: Optional[int] = 1) -> float:
    """Median invoke latency of ``model`` on one input (ms), via the device runtime."""
    lm = _load_bytes(model, threads)
    spec = lm.inputs[0]
    lm.set_input(0, spec.quantize(x[:1]).reshape(spec.shape))
    for _ in range(warmup):
        lm.invoke()
    samples = []
    for _ in range(runs):
        t0 = time.perf_counter_ns()
        lm.invoke()
        samples.append((time.perf_counter_ns() - t0) / 1e6)
    return float(np.median(samples))


def float_outputs(keras_model, x: np.ndarray) -> np.ndarray:
    """The float reference: the Keras model's first output, one row per input."""
    from edgepipe.pipeline.tfenv import captured_output

    with captured_output():
        y = keras_model(x, training=False)
    if isinstance(y, (list, tuple)):
        y = y[0]
    y = np.asarray(y)
    return y.reshape(y.shape[0], -1)


def selective_int8(keras_model, recipe, calib: np.ndarray, eval_x: Optional[np.ndarray],
                   target: float, *, max_float: Optional[int] = None, prune: bool = True,
                   measure_latency: bool = True, threads: Optional[int] = 1,
                   on_step: Optional[Callable[[str], None]] = None,
                   debugged: Optional[Debugged] = None, shipped: Optional[bytes] = None) -> SelectiveResult:
    """Int8 model keeping the fewest most-sensitive layers in float to reach ``target``.

    ``keras_model``: a Keras model or a .keras path. ``recipe``: a
    ``edgepipe.pipeline.recipes.Recipe`` or its name (only ``int8``: float I/O, the
    float layers need float tensors around them). ``calib``/``eval_x``: float
    model inputs stacked on axis 0 (``eval_x`` defaults to ``calib``).
    ``target``: top-1 agreement with the float model in (0, 1]. ``shipped``:
    the int8 model the converter already made; it is returned untouched when
    it meets the target, or when no float layer does better (the debugger's
    re-quantization is not bit-identical to the converter's own int8 model).
    """
    t_start = time.perf_counter()
    _check_request(recipe, target)
    say = on_step or (lambda msg: None)
    keras_model = _keras_model(keras_model)
    calib = np.asarray(calib, dtype=np.float32)
    ex = _eval_inputs(eval_x, calib)

    ref = float_outputs(keras_model, ex)
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


def _keras_model(keras_model):
    """The Keras model itself, loaded when given as a path."""
    from edgepipe.pipeline.tfenv import captured_output, import_tf

    tf = import_tf()
    if hasattr(keras_model, "predict"):
        return keras_model
    try:
        with captured_output():
            return tf.keras.models.load_model(str(keras_model), compile=False)
    except Exception as e:  # noqa: BLE001 - loaders raise anything
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise SelectiveError(f"needs a Keras model ({first})", param="target_agreement") from None


class _Search:
    """Agreement of float-kept layer sets (each quantized and run once), and the search over them."""

    def __init__(self, dbg: Debugged, ex: np.ndarray, ref: np.ndarray, target: float,
                 threads: Optional[int], say: Callable[[str], None]):
        self.dbg, self.ex, self.ref, self.target, self.threads, self.say = dbg, ex, ref, target, threads, say
        self.cache: dict = {}
        self.steps: list = []
        self.baseline = self.agreement_of([])
        self.steps.append({"float_layers": 0, "agreement": self.baseline})

    def _entry(self, kept: Sequence[LayerError]) -> tuple:
        key = frozenset(e.tensor for e in kept)
        if key not in self.cache:
            model = self.dbg.quantize([e.tensor for e in kept])
            out = run_tflite(model, self.ex, threads=self.threads)
            self.cache[key] = (metrics.top1_agreement(out, self.ref), model)
            self.say(f"{len(kept)} float layer(s): agreement {self.cache[key][0]:.4f}")
        return self.cache[key]

    def agreement_of(self, kept: Sequence[LayerError]) -> float:
        return self._entry(kept)[0]

    def model_of(self, kept: Sequence[LayerError]) -> bytes:
        return self._entry(kept)[1]

    def reaches(self, kept: Sequence[LayerError]) -> bool:
        return self.agreement_of(kept) >= self.target

    def _check(self, ranked: list, k: int) -> bool:
        a = self.agreement_of(ranked[:k])
        self.steps.append({"float_layers": k, "agreement": a})
        return a >= self.target

    def shortest_prefix(self, ranked: list, limit: int) -> list:
        """The shortest prefix of ``ranked`` reaching the target (the longest tried when none does)."""
        if self.baseline >= self.target:
            return []
        # Exponential probe, then binary search on the prefix length.
        lo, hi, k = 0, None, 1
        while k <= limit:
            if self._check(ranked, k):
                hi = k
                break
            lo = k
            k = limit if k * 2 > limit and k < limit else k * 2
        if hi is None:
            return list(ranked[:lo])
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self._check(ranked, mid):
                hi = mid
            else:
                lo = mid
        return list(ranked[:hi])

    def prune(self, kept: list) -> list:
        """Drop each kept layer again: a later layer may have fixed what an earlier one was kept for."""
        for e in list(kept):
            trial = [x for x in kept if x.tensor != e.tensor]
            a = self.agreement_of(trial)
            self.steps.append({"float_layers": len(trial), "agreement": a, "dropped": e.layer})
            if a >= self.target:
                kept = trial
        return kept


def _float_layer_costs(dbg: Debugged, kept: list, ex: np.ndarray, threads: Optional[int],
                       say: Callable[[str], None]) -> list:
    """p50 latency as the kept layers go float one by one (or all at once past a handful)."""
    say("timing the cost of each float layer")
    prev = p50_ms(dbg.quantize([]), ex, threads=threads)
    latency = [{"layer": None, "float_layers": 0, "p50_ms": prev, "cost_ms": 0.0}]
    # One re-quantization + benchmark per kept layer; past a handful the
    # per-layer split is noise, so only the total is measured.
    steps_to_time = range(1, len(kept) + 1) if len(kept) <= MAX_TIMED_LAYERS else [len(kept)]
    for i in steps_to_time:
        cur = p50_ms(dbg.quantize([e.tensor for e in kept[:i]]), ex, threads=threads)
        latency.append({"layer": kept[i - 1].layer if len(steps_to_time) > 1 else "(all kept)",
                        "tensor": kept[i - 1].tensor if len(steps_to_time) > 1 else None,
                        "float_layers": i, "p50_ms": cur, "cost_ms": cur - prev})
        prev = cur
    return latency


def apply_to_bundle(bundle_path, keras_model_path, target: float, *, eval_dir=None,
                    eval_limit: int = 300, measure_latency: bool = True,
                    on_step: Optional[Callable[[str], None]] = None, method=None) -> SelectiveResult:
    """Re-make an ``int8`` bundle so it reaches ``target`` agreement; rewrites it atomically.

    Calibration uses the images recorded in the bundle's manifest (same
    folder, count and seed, so the same files); agreement is measured on
    ``eval_dir`` (folder, class sub-folders allowed) or on those calibration
    images. The manifest gets ``extra["selective"]`` (which layers, why, and
    the latency each one costs) and the new model's digest and size.
    ``method`` (an ``edgepipe.pipeline.ptq.Method``): search on top of those
    activation ranges instead of the converter's min-max.
    """
    from edgepipe.pipeline import calibration

    b = _int8_bundle(bundle_path)
    m = b.manifest
    cset = calibration.select(Path(m.calibration.source), m.calibration.count, m.calibration.seed)
    calib = calibration.load_arrays(cset, m.preprocess)
    ex = _eval_arrays(eval_dir, b, eval_limit)
    debugged = None
    if method is not None and method.name != "minmax":
        from edgepipe.pipeline import ptq

        keras = _keras_model(keras_model_path)
        try:
            layers = debug_int8(keras, calib, debug=ex if ex is not None else calib).layers
            debugged = ptq.for_selective(ptq.calibrate(keras, calib), method, layers)
        except (ptq.PTQError, LayerErrorError) as e:
            raise SelectiveError(str(e)) from None
    res = selective_int8(keras_model_path, m.recipe, calib, ex, target,
                         measure_latency=measure_latency, on_step=on_step,
                         shipped=b.model_path.read_bytes(), debugged=debugged)
    if not res.kept:
        # The plain int8 model stays; only the manifest learns what was tried.
        from edgepipe.device.bundle import write_manifest

        write_manifest(b.path, dataclasses.replace(m, extra={**m.extra, "selective": res.to_dict()}))
    else:
        _rewrite_bundle(b, res)
    return res


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


def _eval_arrays(eval_dir, b, eval_limit: int) -> Optional[np.ndarray]:
    """The bundle's float inputs for the images in ``eval_dir`` (None: use the calibration images)."""
    if eval_dir is None:
        return None
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