"""Evaluation data: images in a folder and their class labels, read as the board reads them.

Labels come from a folder per class (names matched to the bundle's labels, or
a labels file, or sorted folder order) or from a labels file listing
``<image file> <class>`` per line. Inputs are made by the device's own
preprocessing (``edgepipe.device.preprocess.load_image``).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from edgepipe.device.bundle import Preprocess, read_labels
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
        raise EvalError(f"{root} is not a folder", param="data")
    top, skipped = list_images(root)
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    per_image, names_from_file = _label_source(root, labels_file, top, subdirs)
    names = list(class_names) if class_names else names_from_file
    if subdirs and not top:
        ds = _from_class_folders(root, subdirs, names, skipped)
    elif per_image is not None:
        ds = _from_label_list(root, top, per_image, names, skipped)
    else:
        ds = Dataset(root, tuple(top), None, tuple(names) if names else None, skipped,
                     "no labels: agreement with the float model only")
    if not ds.paths:
        raise EvalError(f"no images found in {root}", param="data")
    return _spread_subset(ds, limit)


def _label_source(root: Path, labels_file: Optional[Path], top: list, subdirs: list) -> tuple:
    """``(per-image labels or None, class names from a file or None)``."""
    if labels_file is None:
        for cand in (root / "labels.txt", root.parent / "labels.txt"):
            if subdirs and cand.is_file():
                return None, read_labels(cand)
        return None, None
    if not Path(labels_file).is_file():
        raise EvalError(f"{labels_file} is not a file", param="labels")
    lines = read_labels(labels_file)
    if lines and top and all(len(ln.replace(",", " ").split()) == 2 for ln in lines):
        return dict(ln.replace(",", " ").split() for ln in lines), None
    return None, lines


def _from_class_folders(root: Path, subdirs: list, names: Optional[list], skipped: int) -> Dataset:
    """One folder per class; folder names map to output indices through ``names``."""
    from edgepipe.device.preprocess import list_images

    note = ""
    if names:
        index = _class_index(names)
        for d in subdirs:
            if _norm(d.name) not in index:
                raise EvalError(f"class folder {d.name!r} is not one of the model's "
                                f"{len(names)} labels (e.g. {', '.join(names[:3])})", param="data")
    else:
        names = [d.name for d in subdirs]
        index = _class_index(names)
        note = "class index = sorted folder order (no labels file)"
    paths, labels = [], []
    for d in subdirs:
        imgs, sk = list_images(d)
        skipped += sk
        paths += imgs
        labels += [index[_norm(d.name)]] * len(imgs)
    return Dataset(root, tuple(paths), tuple(labels), tuple(names), skipped, note)


def _from_label_list(root: Path, top: list, per_image: dict, names: Optional[list], skipped: int) -> Dataset:
    """A flat folder whose labels file says ``<file name> <class index or name>`` per image."""
    idx = _class_index(names) if names else {}
    labels = []
    for p in top:
        lab = per_image.get(p.name)
        if lab is None:
            raise EvalError(f"no label for image {p.name}", param="labels")
        if lab.lstrip("-").isdigit():
            labels.append(int(lab))
        elif _norm(lab) in idx:
            labels.append(idx[_norm(lab)])
        else:
            raise EvalError(f"label {lab!r} of {p.name} is neither a class index "
                            "nor one of the model's labels", param="labels")
    return Dataset(root, tuple(top), tuple(labels), tuple(names) if names else None, skipped)


def _spread_subset(ds: Dataset, limit: Optional[int]) -> Dataset:
    """At most ``limit`` images, evenly spread (so every class stays represented)."""
    if limit is None or limit >= len(ds.paths):
        return ds
    if limit < 1:
        raise EvalError("the image limit must be at least 1", param="limit")
    idx = np.linspace(0, len(ds.paths) - 1, limit).round().astype(int)
    idx = sorted(set(idx.tolist()))
    return Dataset(ds.root, tuple(ds.paths[i] for i in idx),
                   tuple(ds.labels[i] for i in idx) if ds.labels else None,
                   ds.class_names, ds.skipped, ds.note)


def load_inputs(paths: Sequence[Path], spec: Preprocess,
                progress: Optional[Callable[[int], None]] = None) -> np.ndarray:
    """The float model inputs (N, ...) for ``paths`` via the device's preprocessing."""
    from edgepipe.device.preprocess import ImageError, load_image

    out = []
    for p in paths:
        try:
            x = load_image(p, spec)
        except (ImageError, OSError) as e:
            raise EvalError(f"{Path(p).name}: {e}", param="data") from None
        if spec.layout == "nchw":
            x = np.transpose(x, (2, 0, 1))
        out.append(x)
        if progress:
            progress(1)
    return np.stack(out).astype(np.float32, copy=False)
