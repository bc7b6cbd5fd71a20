"""`edgepipe ablate`: measure a grid of variants (size, latency, accuracy/agreement).

Stages per point, each shared by the points that agree on it: the Keras model
(architecture + input size; factories train it once), the bundle (+ recipe,
converted by ``edgepipe.pipeline.convert``), accuracy/agreement (per bundle, on the
device runtime), latency (per bundle x threads x delegate, ``edgepipe.device.bench``
locally or an ``edgerun agent`` with ``device_url``).

Every finished point is appended to ``<out>/points.jsonl`` at once; a re-run
reuses points whose key and spec digest match, so an interrupted study resumes.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from edgepipe.pipeline.ablate_spec import Point, Spec
from edgepipe.pipeline.modelio import one_line, with_input_size
from edgepipe.device.errors import EdgepipeError

CACHE_FILE = "points.jsonl"


class AblateError(EdgepipeError, RuntimeError):
    """A study that cannot continue; one line for the user."""


def factory_digest(spec: Spec) -> str:
    """Digest of the factory's source file and options: retrain when either changes."""
    if not spec.is_factory:
        return ""
    import importlib.util

    h = hashlib.sha256(json.dumps(spec.factory_kwargs, sort_keys=True).encode())
    module = spec.source.split(":")[1]
    try:
        found = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        found = None
    if found is not None and found.origin and Path(found.origin).is_file():
        h.update(Path(found.origin).read_bytes())
    return h.hexdigest()[:8]


def spec_digest(spec: Spec) -> str:
    fields = dict(spec.digest_fields(), factory_code=factory_digest(spec))
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "base"


def load_cache(out_dir: Path, digest: str) -> dict:
    """Measured points of this spec (by point key) from an earlier, maybe interrupted, run."""
    path = out_dir / CACHE_FILE
    done = {}
    if not path.exists():
        return done
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by an interruption
        res = rec.get("result")
        # Failed points are retried; only real measurements are reused.
        if rec.get("digest") == digest and isinstance(res, dict) and not res.get("error"):
            done[rec["key"]] = res
    return done


def _append(out_dir: Path, digest: str, key: str, result: dict) -> None:
    with open(out_dir / CACHE_FILE, "a", encoding="utf-8") as f:
        f.write(json.dumps({"digest": digest, "key": key, "result": result}) + "\n")


# ------------------------------------------------------------------ models


def _labels_for(spec: Spec) -> Optional[Path]:
    from edgepipe.pipeline import samples

    if spec.labels:
        return spec.labels
    if spec.source == "sample:mobilenet_v2":
        return samples.imagenet_labels_path()
    if spec.source == "sample:fashion_mnist" or spec.source.endswith(":fashion_mnist_cnn"):
        return samples.fashion_mnist_labels_path()
    return None


def model_path(spec: Spec, point: Point, out_dir: Path, say: Callable[[str], None]) -> Path:
    """The Keras model of ``point`` (built and trained once for factories)."""
    from edgepipe.pipeline import samples

    if spec.source == "sample:mobilenet_v2":
        return samples.mobilenet_v2_keras()  # SampleNotBuiltError until `edgepipe samples build`
    if spec.source == "sample:fashion_mnist":
        return samples.fashion_mnist_model_path()
    if not spec.is_factory:
        return Path(spec.source)
    import importlib

    _, module, func = spec.source.split(":")
    try:
        factory = getattr(importlib.import_module(module), func)
    except (ImportError, AttributeError) as e:
        raise AblateError(f"model.source: cannot import {module}:{func} ({e})") from None
    out = out_dir / "models" / f"{slug(point.model_key())}-{factory_digest(spec)}.keras"
    if not out.exists():
        say(f"training {point.model_key()}")
        try:
            factory(out, width=point.width, depth=point.depth, remove=point.remove,
                    input_size=point.input_size, **spec.factory_kwargs)
        except TypeError as e:
            raise AblateError(f"factory: {e}") from None
        except ValueError as e:  # FactoryError and friends name their field
            raise AblateError(str(e)) from None
    return out


def resized_model(src: Path, size: int, out_dir: Path) -> Path:
    """A copy of a fixed-size Keras model taking ``size`` x ``size`` inputs (same weights).

    Fully convolutional models with global pooling accept any size, but Keras
    enforces the declared input shape; rebuilding from the config with a new
    input shape and copying the weights lifts that.
    """
    from edgepipe.pipeline.tfenv import captured_output, import_tf

    digest = hashlib.sha256(f"{src.resolve()}:{src.stat().st_mtime_ns}".encode()).hexdigest()[:8]
    out = out_dir / "models" / f"{src.stem}-{size}-{digest}.keras"
    if out.exists():
        return out
    tf = import_tf()
    try:
        with captured_output():
            model = tf.keras.models.load_model(str(src), compile=False)
            new = with_input_size(model, (size, size))
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.with_suffix(".tmp.keras")
            new.save(tmp)
            tmp.replace(out)
    except Exception as e:  # noqa: BLE001 - Keras raises anything for odd models
        raise AblateError(f"axes.input_size: cannot resize {src.name} to {size} ({one_line(e)})") from None
    return out


def check_data(spec: Spec) -> None:
    """Fail before any slow work when the data folders cannot be used."""
    from edgepipe.device.preprocess import list_images
    from edgepipe.pipeline.evaluate import EvalError, load_dataset

    try:
        load_dataset(spec.data_dir, labels_file=None, limit=spec.limit)
    except EvalError as e:
        raise AblateError(f"data.dir: {e}" if e.param == "data" else str(e)) from None
    top, _ = list_images(spec.calib_dir)
    if not top and not any(list_images(d)[0] for d in spec.calib_dir.iterdir() if d.is_dir()):
        raise AblateError(f"data.calib: no images found in {spec.calib_dir}")


def flat_calibration(spec: Spec, out_dir: Path) -> Path:
    """A flat folder for calibration: class sub-folders are linked into one, evenly."""
    from edgepipe.device.preprocess import list_images

    top, _ = list_images(spec.calib_dir)
    if top:
        return spec.calib_dir
    subdirs = sorted(p for p in spec.calib_dir.iterdir() if p.is_dir())
    per = [list_images(d)[0] for d in subdirs]
    if not any(per):
        raise AblateError(f"data.calib: no images in {spec.calib_dir}")
    flat = out_dir / "calib"
    flat.mkdir(parents=True, exist_ok=True)
    want = spec.calib_limit or 100
    i = 0
    # Round-robin over classes so a small calibration set still covers them all.
    while i < want and any(per):
        for imgs in per:
            if imgs and i < want:
                src = imgs.pop(0)
                dst = flat / f"{src.parent.name}__{src.name}"
                if not dst.exists():
                    dst.symlink_to(src.resolve())
                i += 1
    return flat


def convert_point(spec: Spec, point: Point, keras_path: Path, out_dir: Path, recipes: tuple,
                  say: Callable[[str], None]) -> dict:
    """Bundles for ``recipes`` of one Keras model; returns {recipe: bundle path}."""
    from edgepipe.pipeline.cache import default_cache_dir
    from edgepipe.pipeline.convert import ConvertError, ConvertRequest, convert_model
    from edgepipe.pipeline.preprocessing import PreprocessRequest
    from edgepipe.pipeline.recipes import RECIPES

    calib = flat_calibration(spec, out_dir)
    size = None
    if point.input_size and not spec.is_factory:
        keras_path = resized_model(keras_path, point.input_size, out_dir)
    elif point.input_size:
        size = (point.input_size, point.input_size)
    req = ConvertRequest(
        model=keras_path, recipes=tuple(RECIPES[r] for r in recipes),
        out_dir=out_dir / "bundles", calib_dir=calib, calib_count=spec.calib_limit or 100,
        preprocess=PreprocessRequest(preset=spec.preprocess), input_size=size,
        labels=_labels_for(spec), name=slug(f"{spec.name}-{point.model_key()}"),
        cache_dir=default_cache_dir(), edgetpu=False)
    try:
        results = convert_model(req, progress=lambda m: say(m))
    except (ConvertError, ValueError, OSError) as e:
        raise AblateError(f"convert: {e}") from None
    return {r.recipe: (r.bundle, one_line(r.error) if r.error else None) for r in results}


# ------------------------------------------------------------------ measuring


class _Evaluator:
    """Accuracy/agreement per bundle, with the float reference computed once per model."""

    def __init__(self, spec: Spec):
        self.spec = spec
        self._ds = None
        self._refs: dict = {}

    def dataset(self, bundle):
        from edgepipe.pipeline.evaluate import load_dataset

        if self._ds is None:
            self._ds = load_dataset(self.spec.data_dir, class_names=bundle.labels or None,
                                    limit=self.spec.limit)
        return self._ds

    def reference(self, ref_key: str, keras_path: Path, spec_pre) -> np.ndarray:
        """Float outputs of the reference model at its own native input size."""
        from edgepipe.pipeline.evaluate import KerasReference, load_inputs

        if ref_key not in self._refs:
            ref = KerasReference(keras_path)
            h, w = ref.input_shape[0], ref.input_shape[1]
            pre = dataclasses.replace(spec_pre, height=h or spec_pre.height, width=w or spec_pre.width)
            x = load_inputs(self.dataset(None).paths, pre)
            self._refs[ref_key] = ref.predict(x)
        return self._refs[ref_key]

    def measure(self, bundle_path: Path, ref_key: str, ref_keras: Path) -> tuple:
        """(the point's accuracy fields, an ``eval`` report for the results store)."""
        from edgepipe.pipeline import metrics
        from edgepipe.pipeline.evaluate import BundleEval, eval_report, load_inputs, open_bundle, run_bundle

        t0 = time.perf_counter()
        b = open_bundle(bundle_path)
        ds = self.dataset(b)
        x = load_inputs(ds.paths, b.manifest.preprocess)
        out = run_bundle(b, x, threads=None)
        ref = self.reference(ref_key, ref_keras, b.manifest.preprocess)
        res = {"size": b.manifest.model_size, "images": len(ds.paths)}
        acc = metrics.accuracy_block(out, ds.labels) if ds.labelled else {}
        res.update(acc)
        agr = metrics.compare_outputs(out, ref)
        res.update({"agreement": agr.top1_agreement, "snr_db": metrics.json_number(agr.snr_db),
                    "cosine": agr.cosine})
        m = b.manifest
        ev = BundleEval(bundle=b.name, path=str(b.path), recipe=m.recipe, size=m.model_size, sha256=m.model_sha256,
                        images=len(ds.paths), accuracy=acc, agreement=agr.to_dict(), reference=str(ref_keras),
                        seconds=time.perf_counter() - t0, notes=[ds.note] if ds.note else [])
        return res, eval_report(ev, self.spec.data_dir)


def measure_latency(bundle: Path, point: Point, spec: Spec, device_url: Optional[str],
                    token: Optional[str]) -> tuple:
    """(p50/mean latency of one bundle at the point's threads/delegate, the bench report)."""
    b = spec.bench
    if device_url:
        from edgepipe.pipeline.remote import AgentClient, pack_bundle

        client = AgentClient(device_url, token=token)
        pb = pack_bundle(bundle)
        client.upload(pb)
        job = client.submit("bench", pb.sha256, threads=point.threads, delegate=point.delegate,
                            runs=b["runs"], warmup=b["warmup"], min_secs=b["min_secs"])
        state = client.wait(job["id"])
        if state.get("status") != "done":
            raise AblateError(f"{device_url}: bench failed ({state.get('error') or state.get('status')})")
        rep = state["report"]
    else:
        from edgepipe.device.bench import run_bench

        rep = run_bench(bundle, threads=point.threads, delegate=point.delegate, runs=int(b["runs"]),
                        warmup=int(b["warmup"]), min_secs=float(b["min_secs"]))
    lat = rep.get("latency_ms") or {}
    return {"p50_ms": lat.get("p50"), "mean_ms": lat.get("mean"), "p90_ms": lat.get("p90"),
            "device": (rep.get("device") or {}).get("hostname"),
            "backend": (rep.get("runtime") or {}).get("backend")}, rep


def run_ablation(spec: Spec, out_dir: Path, *, device_url: Optional[str] = None,
                 token: Optional[str] = None, say: Callable[[str], None] = lambda m: None,
                 tick: Callable[[dict], None] = lambda r: None,
                 keep: Callable[[str, Optional[list]], None] = lambda key, reports: None) -> list:
    """Measure every point of ``spec`` (reusing cached ones); returns result dicts in grid order.

    ``keep(point key, reports)`` gets each measured point's bench (and eval) reports, or None for a
    point reused from the cache (see :mod:`edgepipe.pipeline.ablate_store`).
    """
    out_dir = Path(out_dir)
    check_data(spec)
    out_dir.mkdir(parents=True, exist_ok=True)
    digest = spec_digest(spec)
    cached = load_cache(out_dir, digest)
    points = spec.points()
    results: dict = {}
    study = _Study(spec, device_url, token, say)
    groups: dict = {}
    for p in points:
        groups.setdefault(p.model_key(), []).append(p)
    for mkey, pts in groups.items():
        todo = [p for p in pts if p.key() not in cached]
        for p in pts:
            if p.key() in cached:
                results[p.key()] = {**cached[p.key()], "cached": True}
                keep(p.key(), None)
                tick(results[p.key()])
        if not todo:
            continue
        keras_path = model_path(spec, todo[0], out_dir, say)
        recipes = tuple(dict.fromkeys(p.recipe for p in todo))
        bundles = convert_point(spec, todo[0], keras_path, out_dir, recipes, say)
        ref_key = mkey if spec.is_factory else "base"
        for p in todo:
            res = study.measure(p, bundles, ref_key, keras_path)
            _append(out_dir, digest, p.key(), res)
            keep(p.key(), study.reports)
            results[p.key()] = res
            tick(res)
    return [results[p.key()] for p in points if p.key() in results]


class _Study:
    """Measures one point: accuracy/agreement once per bundle, latency per threads x delegate."""

    def __init__(self, spec: Spec, device_url: Optional[str], token: Optional[str], say: Callable[[str], None]):
        self.spec, self.device_url, self.token, self.say = spec, device_url, token, say
        self.evaluator = _Evaluator(spec)
        self.evals: dict = {}
        self.reports: list = []  # the last point's bench/eval reports

    def measure(self, p: Point, bundles: dict, ref_key: str, ref_keras: Path) -> dict:
        t0 = time.perf_counter()
        self.reports = []
        bundle, err = bundles.get(p.recipe, (None, "not converted"))
        res = {"point": p.to_dict(), "label": p.label(), "bundle": str(bundle) if bundle else None}
        if err or bundle is None:
            res["error"] = f"convert: {err}"
        else:
            try:
                if p.bundle_key() not in self.evals:
                    self.say(f"evaluating {p.bundle_key()}")
                    self.evals[p.bundle_key()] = self.evaluator.measure(bundle, ref_key, ref_keras)
                fields, ev = self.evals[p.bundle_key()]
                res.update(fields)
                self.reports.append(ev)  # shared by the bundle's points: stored once (same id)
                self.say(f"timing {p.label()}")
                lat, rep = measure_latency(bundle, p, self.spec, self.device_url, self.token)
                res.update(lat)
                self.reports.append(rep)
            except AblateError as e:
                res["error"] = str(e)
            except Exception as e:  # noqa: BLE001 - one bad point must not cost the study
                res["error"] = f"{type(e).__name__}: {one_line(e)}"
        res["seconds"] = round(time.perf_counter() - t0, 2)
        return res


def quality_key(results: list) -> str:
    """``top1`` when the data had labels, else ``agreement``."""
    return "top1" if any("top1" in r for r in results) else "agreement"
