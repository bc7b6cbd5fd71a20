"""Accuracy of bundles and their agreement with the float reference model.

Every bundle runs through the device runtime (``edgepipe.device.runtime``) on images
read with the bundle's own preprocessing (``edgepipe.device.preprocess.load_image``), so
the host measures exactly what the board computes. The float reference (the
Keras model the bundle came from) runs on the *same* float inputs.

The images and their labels come from ``edgepipe.pipeline.dataset``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from edgepipe.device.bundle import Bundle, BundleError, load_bundle
from edgepipe.pipeline import metrics
from edgepipe.device.errors import EdgepipeError
from edgepipe.pipeline.dataset import Dataset, EvalError, load_dataset, load_inputs

__all__ = ["BundleEval", "Dataset", "EvalError", "KerasReference", "evaluate_bundles", "eval_report",
           "find_reference", "load_dataset", "load_inputs", "open_bundle", "run_bundle"]


# ------------------------------------------------------------------ models


class KerasReference:
    """The float model, run on the same float inputs as the bundle."""

    def __init__(self, path: Path):
        from edgepipe.pipeline.tfenv import captured_output, import_tf

        self.path = Path(path)
        tf = import_tf()
        self._signature = None
        try:
            with captured_output():
                if self.path.is_dir():  # a SavedModel: call its serving signature
                    loaded = tf.saved_model.load(str(path))
                    sig = loaded.signatures["serving_default"]
                    (self._arg, spec), = sig.structured_input_signature[1].items()
                    self._signature, self._keep = sig, loaded
                    shape = spec.shape
                else:
                    self.model = tf.keras.models.load_model(str(path), compile=False)
                    shape = self.model.inputs[0].shape
        except Exception as e:  # noqa: BLE001 - loaders raise anything
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise EvalError(f"cannot load {path} ({first[:160]})", param="reference") from None
        self.input_shape = tuple(None if d is None else int(d) for d in list(shape)[1:])

    def check_input(self, per_example: tuple, bundle_name: str) -> None:
        ok = len(per_example) == len(self.input_shape) and all(
            r is None or r == b for r, b in zip(self.input_shape, per_example))
        if not ok:
            raise EvalError(f"{self.path.name} takes input {self.input_shape} but "
                            f"bundle {bundle_name} takes {per_example}", param="reference")

    def predict(self, x: np.ndarray, batch: int = 32) -> np.ndarray:
        from edgepipe.pipeline.tfenv import captured_output

        rows = []
        with captured_output():
            for i in range(0, x.shape[0], batch):
                if self._signature is not None:
                    outs = self._signature(**{self._arg: x[i:i + batch]})
                    y = outs[sorted(outs)[0]]
                else:
                    y = self.model(x[i:i + batch], training=False)
                if isinstance(y, (list, tuple)):
                    y = y[0]
                y = np.asarray(y)
                rows.append(y.reshape(y.shape[0], -1))
        return np.concatenate(rows).astype(np.float64)


def run_bundle(bundle: Bundle, x: np.ndarray, *, threads: Optional[int] = None,
               progress: Optional[Callable[[int], None]] = None) -> np.ndarray:
    """First-output rows of ``bundle`` on float inputs ``x`` via the device runtime."""
    from edgepipe.device.runtime import RuntimeLoadError, load_model

    try:
        lm = load_model(bundle.model_path, threads=threads)
    except RuntimeLoadError as e:
        raise EvalError(f"{bundle.name}: {e}") from None
    spec = lm.inputs[0]
    per_example = tuple(spec.shape[1:])
    if tuple(x.shape[1:]) != per_example:
        raise EvalError(f"{bundle.name}: model input {per_example} does not match the "
                        f"preprocessed images {tuple(x.shape[1:])} (manifest preprocess is wrong)")
    rows = []
    for i in range(x.shape[0]):
        rows.append(lm.predict([x[i:i + 1]])[0].reshape(-1))
        if progress:
            progress(1)
    return np.stack(rows).astype(np.float64)


def find_reference(bundle: Bundle, search: Sequence[Path] = ()) -> Optional[Path]:
    """The Keras model named by the manifest, looked up next to the bundle and in ``search``.

    Then in the sample models shipped with edgepipe and the samples cache.
    """
    m = bundle.manifest
    name = (m.source_model or {}).get("name") if m else None
    if not name:
        return None
    from edgepipe.pipeline.samples import reference_search_dirs

    dirs = [bundle.path.parent, bundle.path.parent.parent, *search, *reference_search_dirs()]
    for d in dirs:
        cand = Path(d) / name
        if cand.exists():
            return cand
    return None


def _missing_reference(bundle: Bundle) -> EdgepipeError:
    """Why no float reference was found: a sample not built yet, or a model not next to the bundle."""
    from edgepipe.pipeline.samples import CATALOGUE, SampleKind, SampleNotBuiltError

    src = (bundle.manifest.source_model or {}).get("name", "?")
    for s in CATALOGUE:
        if s.kind is SampleKind.BUILT and s.path.name == src and not s.present:
            return SampleNotBuiltError(s.name, s.path)
    return EvalError(f"float model {src!r} of {bundle.name} not found next to the "
                     "bundle; give the float reference model", param="reference")


# ------------------------------------------------------------------ evaluation


@dataclass
class BundleEval:
    bundle: str
    path: str
    recipe: Optional[str]
    size: int
    sha256: str
    images: int
    accuracy: dict = field(default_factory=dict)
    agreement: Optional[dict] = None
    reference: Optional[str] = None
    seconds: float = 0.0
    notes: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def open_bundle(path: Path) -> Bundle:
    try:
        b = load_bundle(path)
    except BundleError as e:
        raise EvalError(str(e)) from None
    if b.manifest is None or b.manifest.preprocess is None:
        raise EvalError(f"{path}: evaluation needs a bundle whose manifest records its "
                        "preprocessing (made by 'edgepipe convert')")
    return b


def evaluate_bundles(bundle_paths: Sequence[Path], data: Path, *, reference: Optional[Path] = None,
                     labels_file: Optional[Path] = None, limit: Optional[int] = None,
                     threads: Optional[int] = None,
                     progress: Optional[Callable[[str, int], None]] = None,
                     runner: Optional[Callable] = None) -> list:
    """Evaluate each bundle; returns a list of BundleEval (same order).

    ``progress(stage, n)`` is called with a stage message (n=0) and per image (n=1).
    ``runner(bundle, x, progress)`` runs a bundle somewhere else (a board:
    :mod:`edgepipe.pipeline.remote_eval`); it may return fewer rows than ``x``
    (the device stopped answering): the metrics then cover those images.
    Raises EvalError for unusable input before running anything slow (and
    ``SampleNotBuiltError`` when the reference is a sample model not built yet).
    """
    say = progress or (lambda msg, n: None)
    bundles = [open_bundle(Path(p)) for p in bundle_paths]
    names = next((b.labels for b in bundles if b.labels), None)
    ds = load_dataset(data, labels_file=labels_file, class_names=names, limit=limit)
    _check_label_range(bundles, ds)
    ref_for = _references(bundles, reference, say)
    run = _Run(ds, threads, say, runner)
    return [run.evaluate(b, *ref_for[b.path]) for b in bundles]


def _check_label_range(bundles: Sequence[Bundle], ds: Dataset) -> None:
    """Every class index of the data must be an output of every bundle."""
    if not ds.labelled:
        return
    for b in bundles:
        n = int(np.prod(b.manifest.outputs[0].shape[1:]))
        if ds.class_names and len(ds.class_names) > n:
            raise EvalError(f"labels: {len(ds.class_names)} classes but bundle {b.name} has "
                            f"{n} outputs")
        if max(ds.labels) >= n:
            raise EvalError(f"labels: class index {max(ds.labels)} but bundle {b.name} has "
                            f"{n} outputs")


def _references(bundles: Sequence[Bundle], reference: Optional[Path], say) -> dict:
    """Bundle path -> ("keras", KerasReference) or ("bundle", the fp32 bundle) to compare with."""
    refs: dict = {}
    ref_for = {}
    for b in bundles:
        rp = Path(reference) if reference else find_reference(b)
        if rp is None:
            fp32 = next((o for o in bundles if o.manifest.recipe == "fp32"), None)
            if fp32 is None:
                raise _missing_reference(b)
            ref_for[b.path] = ("bundle", fp32)
            continue
        if not rp.exists():
            raise EvalError(f"{rp} does not exist", param="reference")
        if rp not in refs:
            say(f"loading reference {rp.name}", 0)
            refs[rp] = KerasReference(rp)
        refs[rp].check_input(tuple(b.manifest.inputs[0].shape[1:]), b.name)
        ref_for[b.path] = ("keras", refs[rp])
    return ref_for


class _Run:
    """One evaluation run: inputs and reference outputs computed once and shared by the bundles."""

    def __init__(self, ds: Dataset, threads: Optional[int], say, runner: Optional[Callable] = None):
        self.ds, self.threads, self.say, self.runner = ds, threads, say, runner
        self.inputs: dict = {}
        self.ref_outputs: dict = {}

    def _inputs(self, b: Bundle) -> tuple:
        spec = b.manifest.preprocess
        key = repr(sorted(spec.to_dict().items()))
        if key not in self.inputs:
            self.say(f"reading {len(self.ds.paths)} images for {b.name}", 0)
            self.inputs[key] = load_inputs(self.ds.paths, spec, progress=lambda n: self.say("", n))
        return key, self.inputs[key]

    def _reference(self, kind: str, ref, key: str, x: np.ndarray, b: Bundle, out: np.ndarray) -> np.ndarray:
        rkey = (kind, str(ref.path), key)
        if rkey not in self.ref_outputs:
            if kind == "keras":
                self.say(f"running float reference {ref.path.name}", 0)
                self.ref_outputs[rkey] = ref.predict(x)
            else:
                # A bundle run elsewhere is compared with the host's own run of the fp32 bundle.
                same = ref is b and self.runner is None
                self.ref_outputs[rkey] = out if same else run_bundle(ref, x, threads=self.threads)
        return self.ref_outputs[rkey]

    def evaluate(self, b: Bundle, kind: str, ref) -> "BundleEval":
        t0 = time.perf_counter()
        key, x = self._inputs(b)
        self.say(f"running {b.name}", 0)
        if self.runner is not None:
            out = self.runner(b, x, progress=lambda n: self.say("", n))
        else:
            out = run_bundle(b, x, threads=self.threads, progress=lambda n: self.say("", n))
        done = out.shape[0]  # fewer than the images when a device dropped out
        y = self._reference(kind, ref, key, x, b, out)[:done]
        ds = self.ds
        try:
            acc = metrics.accuracy_block(out, ds.labels[:done]) if ds.labelled else {}
            agr = metrics.compare_outputs(out, y).to_dict()
        except metrics.MetricsError as e:
            raise EvalError(f"{b.name}: {e}") from None
        notes = [ds.note] if ds.note else []
        if kind == "bundle":
            notes.append(f"reference is the fp32 bundle {ref.name} (Keras model not found)")
        m = b.manifest
        return BundleEval(
            bundle=b.name, path=str(b.path), recipe=m.recipe, size=m.model_size,
            sha256=m.model_sha256, images=done, accuracy=acc, agreement=agr,
            reference=str(ref.path), seconds=time.perf_counter() - t0, notes=notes)


def eval_report(e: BundleEval, data: Path) -> dict:
    """An ``eval`` report (edgepipe.report/1) for the results DB."""
    from edgepipe.device.report import new_report

    r = new_report("eval", runtime=_runtime_block(),
                   model={"name": e.bundle, "recipe": e.recipe, "sha256": e.sha256, "size": e.size})
    r["accuracy"] = {**e.accuracy, "agreement": e.agreement, "reference": e.reference,
                     "images": e.images}
    r["input"] = {"source": str(data), "frames": e.images}
    r["warnings"] = list(e.notes)
    return r


def _runtime_block() -> dict:
    try:
        from edgepipe.device.runtime import get_backend

        be = get_backend(None)
        return {"backend": be.info.name, "version": be.version, "delegate": "cpu", "threads": None}
    except Exception:  # noqa: BLE001 - the block is informative only
        return {"backend": "unknown", "delegate": "cpu", "threads": None}

