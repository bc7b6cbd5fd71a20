"""Accuracy of bundles and their agreement with the float reference model.

Every bundle runs through the device runtime (``edgepipe.device.runtime``) on images
read with the bundle's own preprocessing (``edgepipe.device.preprocess.load_image``), so
the host measures exactly what the board computes. The float reference (the
Keras model the bundle came from) runs on the *same* float inputs.

Labels come from a folder per class (names matched to the bundle's labels, or
a labels file, or sorted folder order) or from a labels file listing
``<image file> <class>`` per line.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from edgepipe.device.bundle import Bundle, BundleError, Preprocess, load_bundle, read_labels
from edgepipe.pipeline import metrics
from edgepipe.device.errors import EdgepipeError


class EvalError(EdgepipeError, ValueError):
    """Unusable evaluation input; the message is one line naming what is wrong."""


# ------------------------------------------------------------------ data


@dataclass(frozen=True)
class Dataset:
    """Images to evaluate on, with class indices when known."""

    root: Path
    paths: tuple
    labels: Optional[tuple] = None  # class index per image (model output index)
    class_names: Optional[tuple] = None
    skipped: int = 0
    note: str = ""

    @property
    def labelled(self) -> bool:
        return self.labels is not None


def _norm(name: str) -> str:
    return "".join(ch for ch in name.lower() if ch.isalnum())


def _class_index(names: Sequence[str]) -> dict:
    return {_norm(n): i for i, n in enumerate(names)}


def load_dataset(root: Path, *, labels_file: Optional[Path] = None,
                 class_names: Optional[Sequence[str]] = None, limit: Optional[int] = None) -> Dataset:
    """Find images under ``root`` and their labels.

    - ``root/<class>/*.png`` (one folder per class): labelled. Folder names are
      mapped to output indices through ``class_names`` (the bundle's labels),
      else ``labels_file`` / ``root/labels.txt`` / ``root/../labels.txt`` (one
      class name per line), else sorted folder order.
    - images directly in ``root``: unlabelled, unless ``labels_file`` lists
      ``<file name> <class index or name>`` per line.
    ``limit`` keeps an evenly spread subset (every class stays represented).
    """
    from edgepipe.device.preprocess import list_images

    root = Path(root)
    if not root.is_dir():
        raise EvalError(f"--data: {root} is not a folder")
    top, skipped = list_images(root)
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    per_image = None
    names_from_file = None
    if labels_file is not None:
        if not Path(labels_file).is_file():
            raise EvalError(f"--labels: {labels_file} is not a file")
        lines = read_labels(labels_file)
        if lines and all(len(ln.replace(",", " ").split()) == 2 for ln in lines) and top:
            per_image = {}
            for ln in lines:
                fname, lab = ln.replace(",", " ").split()
                per_image[fname] = lab
        else:
            names_from_file = lines
    else:
        for cand in (root / "labels.txt", root.parent / "labels.txt"):
            if subdirs and cand.is_file():
                names_from_file = read_labels(cand)
                break
    names = list(class_names) if class_names else names_from_file
    note = ""

    if subdirs and not top:
        paths, labels = [], []
        if names:
            index = _class_index(names)
            for d in subdirs:
                if _norm(d.name) not in index:
                    raise EvalError(f"--data: class folder {d.name!r} is not one of the model's "
                                    f"{len(names)} labels (e.g. {', '.join(names[:3])})")
        else:
            names = [d.name for d in subdirs]
            index = _class_index(names)
            note = "class index = sorted folder order (no labels file)"
        for d in subdirs:
            imgs, sk = list_images(d)
            skipped += sk
            paths += imgs
            labels += [index[_norm(d.name)]] * len(imgs)
        ds = Dataset(root, tuple(paths), tuple(labels), tuple(names), skipped, note)
    elif per_image is not None:
        idx = _class_index(names) if names else {}
        labels = []
        for p in top:
            lab = per_image.get(p.name)
            if lab is None:
                raise EvalError(f"--labels: no label for image {p.name}")
            if lab.lstrip("-").isdigit():
                labels.append(int(lab))
            elif _norm(lab) in idx:
                labels.append(idx[_norm(lab)])
            else:
                raise EvalError(f"--labels: label {lab!r} of {p.name} is neither a class index "
                                "nor one of the model's labels")
        ds = Dataset(root, tuple(top), tuple(labels), tuple(names) if names else None, skipped)
    else:
        ds = Dataset(root, tuple(top), None, tuple(names) if names else None, skipped,
                     "no labels: agreement with the float model only")
    if not ds.paths:
        raise EvalError(f"--data: no images found in {root}")
    if limit is not None and limit < len(ds.paths):
        if limit < 1:
            raise EvalError("--limit: must be at least 1")
        idx = np.linspace(0, len(ds.paths) - 1, limit).round().astype(int)
        idx = sorted(set(idx.tolist()))
        ds = Dataset(root, tuple(ds.paths[i] for i in idx),
                     tuple(ds.labels[i] for i in idx) if ds.labels else None,
                     ds.class_names, ds.skipped, ds.note)
    return ds


def load_inputs(paths: Sequence[Path], spec: Preprocess,
                progress: Optional[Callable[[int], None]] = None) -> np.ndarray:
    """The float model inputs (N, ...) for ``paths`` via the device's preprocessing."""
    from edgepipe.device.preprocess import ImageError, load_image

    out = []
    for p in paths:
        try:
            x = load_image(p, spec)
        except (ImageError, OSError) as e:
            raise EvalError(f"--data: {Path(p).name}: {e}") from None
        if spec.layout == "nchw":
            x = np.transpose(x, (2, 0, 1))
        out.append(x)
        if progress:
            progress(1)
    return np.stack(out).astype(np.float32, copy=False)


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
            raise EvalError(f"--reference: cannot load {path} ({first[:160]})") from None
        self.input_shape = tuple(None if d is None else int(d) for d in list(shape)[1:])

    def check_input(self, per_example: tuple, bundle_name: str) -> None:
        ok = len(per_example) == len(self.input_shape) and all(
            r is None or r == b for r, b in zip(self.input_shape, per_example))
        if not ok:
            raise EvalError(f"--reference: {self.path.name} takes input {self.input_shape} but "
                            f"bundle {bundle_name} takes {per_example}")

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
    """The Keras model named by the manifest, looked up next to the bundle and in ``search``."""
    m = bundle.manifest
    name = (m.source_model or {}).get("name") if m else None
    if not name:
        return None
    from edgepipe.pipeline.samples import SAMPLE_DATA, cache_dir

    dirs = [bundle.path.parent, bundle.path.parent.parent, *search, SAMPLE_DATA / "models", cache_dir(),
            cache_dir() / "models"]
    for d in dirs:
        cand = Path(d) / name
        if cand.exists():
            return cand
    return None


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
                     progress: Optional[Callable[[str, int], None]] = None) -> list:
    """Evaluate each bundle; returns a list of BundleEval (same order).

    ``progress(stage, n)`` is called with a stage message (n=0) and per image (n=1).
    Raises EvalError for unusable input before running anything slow.
    """
    say = progress or (lambda msg, n: None)
    bundles = [open_bundle(Path(p)) for p in bundle_paths]
    names = next((b.labels for b in bundles if b.labels), None)
    ds = load_dataset(data, labels_file=labels_file, class_names=names, limit=limit)
    if ds.labelled:
        n_out = [int(np.prod(b.manifest.outputs[0].shape[1:])) for b in bundles]
        for b, n in zip(bundles, n_out):
            if ds.class_names and len(ds.class_names) > n:
                raise EvalError(f"labels: {len(ds.class_names)} classes but bundle {b.name} has "
                                f"{n} outputs")
            if max(ds.labels) >= n:
                raise EvalError(f"labels: class index {max(ds.labels)} but bundle {b.name} has "
                                f"{n} outputs")

    refs: dict = {}
    ref_for = {}
    for b in bundles:
        rp = Path(reference) if reference else find_reference(b)
        if rp is None:
            fp32 = next((o for o in bundles if o.manifest.recipe == "fp32"), None)
            if fp32 is None:
                src = (b.manifest.source_model or {}).get("name", "?")
                raise EvalError(f"--reference: float model {src!r} of {b.name} not found next to the "
                                "bundle; pass --reference MODEL")
            ref_for[b.path] = ("bundle", fp32)
            continue
        if not rp.exists():
            raise EvalError(f"--reference: {rp} does not exist")
        if rp not in refs:
            say(f"loading reference {rp.name}", 0)
            refs[rp] = KerasReference(rp)
        ref = refs[rp]
        ref.check_input(tuple(b.manifest.inputs[0].shape[1:]), b.name)
        ref_for[b.path] = ("keras", ref)

    inputs_cache: dict = {}
    ref_cache: dict = {}
    results = []
    for b in bundles:
        t0 = time.perf_counter()
        spec = b.manifest.preprocess
        key = repr(sorted(spec.to_dict().items()))
        if key not in inputs_cache:
            say(f"reading {len(ds.paths)} images for {b.name}", 0)
            inputs_cache[key] = load_inputs(ds.paths, spec, progress=lambda n: say("", n))
        x = inputs_cache[key]
        say(f"running {b.name}", 0)
        out = run_bundle(b, x, threads=threads, progress=lambda n: say("", n))
        kind, ref = ref_for[b.path]
        rkey = (kind, str(ref.path), key)
        if rkey not in ref_cache:
            if kind == "keras":
                say(f"running float reference {ref.path.name}", 0)
                ref_cache[rkey] = ref.predict(x)
            else:
                ref_cache[rkey] = out if ref is b else run_bundle(ref, x, threads=threads)
        y = ref_cache[rkey]
        try:
            acc = metrics.accuracy_block(out, ds.labels) if ds.labelled else {}
            agr = metrics.compare_outputs(out, y).to_dict()
        except metrics.MetricsError as e:
            raise EvalError(f"{b.name}: {e}") from None
        notes = [ds.note] if ds.note else []
        if kind == "bundle":
            notes.append(f"reference is the fp32 bundle {ref.name} (Keras model not found)")
        m = b.manifest
        results.append(BundleEval(
            bundle=b.name, path=str(b.path), recipe=m.recipe, size=m.model_size,
            sha256=m.model_sha256, images=len(ds.paths), accuracy=acc, agreement=agr,
            reference=str(ref.path), seconds=time.perf_counter() - t0, notes=notes))
    return results


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

