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

import os
import tempfile
import time
from dataclasses import dataclass, field
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


def run_tflite(model: bytes, x: np.ndarray, *, threads: Optional[int] = 1) -> np.ndarray:
    """Float outputs (first output, one row per input) of a TFLite model via the device runtime."""
    from edgepipe.device.runtime import load_model

    fd, path = tempfile.mkstemp(suffix=".tflite", prefix="edgepipe-sel-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(model)
        lm = load_model(path, threads=threads)
        rows = [lm.predict([x[i:i + 1]])[0].reshape(-1) for i in range(x.shape[0])]
    finally:
        os.unlink(path)
    return np.stack(rows)


def p50_ms(model: bytes, x: np.ndarray, *, runs: int = 30, warmup: int = 3,
           threads: Optional[int] = 1) -> float:
    """Median invoke latency of ``model`` on one input (ms), via the device runtime."""
    from edgepipe.device.runtime import load_model

    fd, path = tempfile.mkstemp(suffix=".tflite", prefix="edgepipe-sel-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(model)
        lm = load_model(path, threads=threads)
        spec = lm.inputs[0]
        lm.set_input(0, spec.quantize(x[:1]).reshape(spec.shape))
        for _ in range(warmup):
            lm.invoke()
        samples = []
        for _ in range(runs):
            t0 = time.perf_counter_ns()
            lm.invoke()
            samples.append((time.perf_counter_ns() - t0) / 1e6)
    finally:
        os.unlink(path)
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
    name = getattr(recipe, "name", recipe)
    if name not in SUPPORTED_RECIPES:
        raise SelectiveError(f"--target-agreement: only works with recipe "
                             f"{', '.join(SUPPORTED_RECIPES)}, not {name!r}")
    if not (0.0 < float(target) <= 1.0):
        raise SelectiveError(f"--target-agreement: {target} is not in (0, 1]")
    say = on_step or (lambda msg: None)
    from edgepipe.pipeline.tfenv import captured_output, import_tf

    tf = import_tf()
    if not hasattr(keras_model, "predict"):
        try:
            with captured_output():
                keras_model = tf.keras.models.load_model(str(keras_model), compile=False)
        except Exception as e:  # noqa: BLE001 - loaders raise anything
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
            raise SelectiveError(f"--target-agreement: needs a Keras model ({first})") from None
    calib = np.asarray(calib, dtype=np.float32)
    ex = np.asarray(eval_x if eval_x is not None else calib, dtype=np.float32)
    if ex.shape[0] == 0:
        raise SelectiveError("--target-agreement: no evaluation images")

    ref = float_outputs(keras_model, ex)
    shipped_agreement = None
    if shipped is not None:
        shipped_agreement = metrics.top1_agreement(run_tflite(shipped, ex, threads=threads), ref)
        say(f"plain int8: agreement {shipped_agreement:.4f}")
        if shipped_agreement >= target:
            return SelectiveResult(
                tflite=shipped, target=float(target), agreement=shipped_agreement,
                baseline_agreement=shipped_agreement, reached=True, kept=[], layers_total=0,
                steps=[{"float_layers": 0, "agreement": shipped_agreement, "model": "plain int8"}],
                eval_images=int(ex.shape[0]), seconds=time.perf_counter() - t_start)

    say(f"measuring per-layer error on {min(len(calib), 32)} calibration images")
    try:
        dbg = debugged or debug_int8(keras_model, calib)
    except LayerErrorError as e:
        raise SelectiveError(str(e)) from None
    ranked = dbg.ranked()
    limit = len(ranked) if max_float is None else min(max_float, len(ranked))

    cache: dict = {}

    def agreement_of(kept: Sequence[LayerError]) -> float:
        key = frozenset(e.tensor for e in kept)
        if key not in cache:
            model = dbg.quantize([e.tensor for e in kept])
            out = run_tflite(model, ex, threads=threads)
            cache[key] = (metrics.top1_agreement(out, ref), model)
            say(f"{len(kept)} float layer(s): agreement {cache[key][0]:.4f}")
        return cache[key][0]

    steps = []

    def check(k: int) -> bool:
        a = agreement_of(ranked[:k])
        steps.append({"float_layers": k, "agreement": a})
        return a >= target

    baseline = agreement_of([])
    steps.append({"float_layers": 0, "agreement": baseline})
    if baseline >= target:
        best_k = 0
    else:
        # Exponential probe, then binary search on the prefix length.
        lo, hi = 0, None
        k = 1
        while k <= limit:
            if check(k):
                hi = k
                break
            lo = k
            k = limit if k * 2 > limit and k < limit else k * 2
        if hi is None:
            best_k = lo
        else:
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if check(mid):
                    hi = mid
                else:
                    lo = mid
            best_k = hi
    kept = list(ranked[:best_k])
    reached = agreement_of(kept) >= target
    if reached and prune and 1 < len(kept) <= 12:
        # A later layer may have fixed what an earlier one was kept for.
        for e in list(kept):
            trial = [x for x in kept if x.tensor != e.tensor]
            a = agreement_of(trial)
            steps.append({"float_layers": len(trial), "agreement": a, "dropped": e.layer})
            if a >= target:
                kept = trial
    agreement = agreement_of(kept)
    model = cache[frozenset(e.tensor for e in kept)][1]
    if shipped_agreement is not None and (agreement <= shipped_agreement or (not kept and agreement < target)):
        say("no float layer beats the plain int8 model: keeping it")
        kept, agreement, model = [], shipped_agreement, shipped

    latency = []
    if measure_latency and kept:
        say("timing the cost of each float layer")
        prev = p50_ms(dbg.quantize([]), ex, threads=threads)
        latency.append({"layer": None, "float_layers": 0, "p50_ms": prev, "cost_ms": 0.0})
        # One re-quantization + benchmark per kept layer; past a handful the
        # per-layer split is noise, so only the total is measured.
        steps_to_time = range(1, len(kept) + 1) if len(kept) <= MAX_TIMED_LAYERS else [len(kept)]
        for i in steps_to_time:
            cur = p50_ms(dbg.quantize([e.tensor for e in kept[:i]]), ex, threads=threads)
            latency.append({"layer": kept[i - 1].layer if len(steps_to_time) > 1 else "(all kept)",
                            "tensor": kept[i - 1].tensor if len(steps_to_time) > 1 else None,
                            "float_layers": i, "p50_ms": cur, "cost_ms": cur - prev})
            prev = cur
    return SelectiveResult(
        tflite=model, target=float(target), agreement=agreement,
        baseline_agreement=shipped_agreement if shipped_agreement is not None else baseline,
        reached=agreement >= target, kept=kept, layers_total=len(ranked), steps=steps,
        latency=latency, eval_images=int(ex.shape[0]), seconds=time.perf_counter() - t_start,
        ranks={e.tensor: i + 1 for i, e in enumerate(ranked)})


def apply_to_bundle(bundle_path, keras_model_path, target: float, *, eval_dir=None,
                    eval_limit: int = 300, measure_latency: bool = True,
                    on_step: Optional[Callable[[str], None]] = None) -> SelectiveResult:
    """Re-make an ``int8`` bundle so it reaches ``target`` agreement; rewrites it atomically.

    Calibration uses the images recorded in the bundle's manifest (same
    folder, count and seed, so the same files); agreement is measured on
    ``eval_dir`` (folder, class sub-folders allowed) or on those calibration
    images. The manifest gets ``extra["selective"]`` (which layers, why, and
    the latency each one costs) and the new model's digest and size.
    """
    import dataclasses
    import hashlib
    from pathlib import Path

    from edgepipe.device.bundle import BundleError, TensorInfo, load_bundle
    from edgepipe.pipeline import calibration
    from edgepipe.pipeline.bundle_writer import write_bundle

    try:
        b = load_bundle(bundle_path)
    except BundleError as e:
        raise SelectiveError(str(e)) from None
    m = b.manifest
    if m is None or m.recipe not in SUPPORTED_RECIPES:
        raise SelectiveError(f"--target-agreement: {bundle_path} is not an int8 bundle")
    if (m.extra or {}).get("input_size"):
        raise SelectiveError("--target-agreement: not supported together with --input-size")
    if m.calibration is None or not m.calibration.source or m.preprocess is None:
        raise SelectiveError(f"--target-agreement: {bundle_path} records no calibration images")
    cset = calibration.select(Path(m.calibration.source), m.calibration.count, m.calibration.seed)
    calib = calibration.load_arrays(cset, m.preprocess)
    ex = None
    if eval_dir is not None:
        from edgepipe.pipeline.evaluate import EvalError, load_dataset, load_inputs

        try:
            ds = load_dataset(Path(eval_dir), class_names=b.labels or None, limit=eval_limit)
            ex = load_inputs(ds.paths, m.preprocess)
        except EvalError as e:
            raise SelectiveError(str(e)) from None
    res = selective_int8(keras_model_path, m.recipe, calib, ex, target,
                         measure_latency=measure_latency, on_step=on_step,
                         shipped=b.model_path.read_bytes())
    if not res.kept:
        # The plain int8 model stays; only the manifest learns what was tried.
        import dataclasses as _dc

        from edgepipe.device.bundle import write_manifest

        write_manifest(b.path, _dc.replace(m, extra={**m.extra, "selective": res.to_dict()}))
        return res

    def manifest_for(model_file, _tpu):
        from edgepipe.device.runtime import load_model

        lm = load_model(model_file)
        return dataclasses.replace(
            m, model_sha256=hashlib.sha256(res.tflite).hexdigest(), model_size=len(res.tflite),
            inputs=tuple(TensorInfo.from_dict(t.to_dict()) for t in lm.inputs),
            outputs=tuple(TensorInfo.from_dict(t.to_dict()) for t in lm.outputs),
            extra={**m.extra, "selective": res.to_dict()})

    labels = b.path / m.labels_file if m.labels_file else None
    if labels is not None:
        # write_bundle copies labels into a fresh folder; read them from a copy
        # outside the folder being replaced.
        import shutil
        import tempfile

        tmp = Path(tempfile.mkdtemp(prefix="edgepipe-labels-"))
        shutil.copyfile(labels, tmp / "labels.txt")
        labels = tmp / "labels.txt"
    write_bundle(b.path.parent, b.path.name, res.tflite, manifest_for=manifest_for, labels=labels)
    if labels is not None:
        shutil.rmtree(labels.parent, ignore_errors=True)
    return res


def apply_selective_to_results(results: list, model_path, target: float,
                               progress: Callable[[str], None]) -> list:
    """``edgepipe convert --target-agreement``: rework the int8 bundle of a convert run.

    Returns the results with the int8 entry's size updated; raises
    ``click.ClickException`` (one line) when the search cannot run.
    """
    import dataclasses

    import click

    out = []
    for r in results:
        if r.recipe == "int8" and r.bundle and not r.error:
            progress(f"int8: searching the fewest float layers for agreement >= {target}")
            try:
                sel = apply_to_bundle(r.bundle, model_path, target, on_step=progress)
            except (SelectiveError, ValueError, OSError) as e:
                raise click.ClickException(str(e)) from None
            if sel.latency and len(sel.latency) == len(sel.kept) + 1:
                kept = [f"{e.layer} ({c['cost_ms']:+.3f} ms)" for e, c in zip(sel.kept, sel.latency[1:])]
            else:
                kept = [e.layer for e in sel.kept]
            shown = ", ".join(kept[:6]) + (f" and {len(kept) - 6} more" if len(kept) > 6 else "")
            lat = sel.latency
            total = (f"; p50 {lat[0]['p50_ms']:.3f} -> {lat[-1]['p50_ms']:.3f} ms" if len(lat) > 1 else "")
            progress(f"int8: agreement {sel.agreement:.4f} (plain int8 {sel.baseline_agreement:.4f}); "
                     f"{len(kept)} of {sel.layers_total} layers in float: {shown or 'none'}{total}"
                     + ("" if sel.reached else f"; target {target} NOT reached"))
            if len(sel.kept) > sel.layers_total // 2:
                progress("warning: more than half of the layers stay float, so this is close to the "
                         "fp32 model in size and speed; compare with fp16, or calibrate with more "
                         "representative images (--calib, --calib-count)")
            fp32 = next((x.size for x in results if x.recipe == "fp32" and x.size), None)
            r = dataclasses.replace(r, size=len(sel.tflite),
                                    ratio_to_fp32=round(len(sel.tflite) / fp32, 4) if fp32 else None)
        out.append(r)
    return out
