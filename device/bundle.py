"""Bundles on disk: a directory with the model, its manifest and labels, or a bare ``.tflite``.

A bundle is a directory holding ``model.tflite``, ``manifest.json`` and, when
known, ``labels.txt`` (plus ``model_edgetpu.tflite`` when compiled for the Edge
TPU). Bundles arrive from the network, so every path a manifest names must stay
inside the bundle and every read is bounded. The manifest's types live in
:mod:`edgepipe.device.manifest` and are re-exported here.

Everything here is plain Python + JSON so it imports on a Pi without any
runtime installed.
"""
from __future__ import annotations

import hashlib
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Optional

from edgepipe.device.manifest import (EDGETPU_MODEL, LABELS, MANIFEST, MODEL, SCHEMA, BundleError, Calibration,
                                      ColorOrder, Manifest, Preprocess, Quantization, ResizeMode, Task, TensorInfo)

# The manifest types are re-exported: callers import the bundle API from here.
__all__ = ["EDGETPU_MODEL", "LABELS", "MANIFEST", "MODEL", "SCHEMA", "BundleError", "Calibration", "ColorOrder",
           "Manifest", "Preprocess", "Quantization", "ResizeMode", "Task", "TensorInfo", "MAX_MANIFEST_BYTES",
           "MAX_LABELS_BYTES", "MAX_LABELS_LINES", "Bundle", "inside", "load_bundle", "read_bounded", "read_labels",
           "sha256_file", "write_manifest"]

# Bounds on what a bundle may make the device read (bundles arrive from the network).
MAX_MANIFEST_BYTES = 1 << 20
MAX_LABELS_BYTES = 4 << 20
MAX_LABELS_LINES = 100_000


def sha256_file(path: os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def read_bounded(path: os.PathLike, limit: int, what: str) -> bytes:
    """The bytes of the regular file at ``path``, refusing devices, fifos and anything over ``limit`` bytes.

    Checked before opening (no side effects of opening a device) and again on
    the open descriptor (the path may change in between); never reads more
    than ``limit + 1`` bytes.
    """
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise BundleError(f"{path}: {what} is not a regular file")
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise BundleError(f"{path}: cannot read {what} ({e.strerror or e})") from None
    with open(fd, "rb", closefd=True) as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise BundleError(f"{path}: {what} is not a regular file")
        if st.st_size > limit:
            raise BundleError(f"{path}: {what} is {st.st_size} bytes, over the {limit}-byte limit")
        data = f.read(limit + 1)
    if len(data) > limit:
        raise BundleError(f"{path}: {what} is over the {limit}-byte limit")
    return data


def read_labels(path: os.PathLike) -> list:
    """Non-empty lines of a UTF-8 labels file (bounded: MAX_LABELS_BYTES, MAX_LABELS_LINES)."""
    data = read_bounded(path, MAX_LABELS_BYTES, "labels file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BundleError(f"{path}: labels file is not UTF-8 text ({e.reason} at byte {e.start})") from None
    lines = [line.rstrip("\r") for line in text.split("\n") if line.strip()]
    if len(lines) > MAX_LABELS_LINES:
        raise BundleError(f"{path}: labels file has {len(lines)} labels, over the {MAX_LABELS_LINES} limit")
    return lines


def inside(root: Path, rel: str, what: str) -> Path:
    """``root/rel`` when ``rel`` is a relative path that stays inside ``root``, symlinks resolved.

    Absolute paths, ``..`` and symlinks leading out of the bundle are refused
    without touching the target, so a manifest cannot point at ``/dev/zero``.
    """
    pure = PurePosixPath(rel)
    if not rel or "\\" in rel or "\0" in rel or pure.is_absolute() or ".." in pure.parts:
        raise BundleError(f"{root}: {what} {rel[:80]!r} is not a plain path inside the bundle")
    full = root / pure
    real_root = os.path.realpath(root)
    real = os.path.realpath(full)
    if real != real_root and not real.startswith(real_root.rstrip(os.sep) + os.sep):
        raise BundleError(f"{root}: {what} {rel[:80]!r} points outside the bundle")
    return full


def _regular(path: Path, what: str) -> Path:
    if not stat.S_ISREG(path.stat().st_mode):
        raise BundleError(f"{path}: {what} is not a regular file")
    return path


@dataclass(frozen=True)
class Bundle:
    """A bundle on disk (or a bare .tflite file, with ``manifest`` None)."""

    path: Path
    model_path: Path
    manifest: Optional[Manifest]
    labels: tuple = ()

    @property
    def name(self) -> str:
        return self.manifest.name if self.manifest else self.model_path.stem

    def edgetpu_model_path(self) -> Optional[Path]:
        """The Edge TPU-compiled model when the bundle has one (confined to the bundle, a regular file)."""
        if not self.path.is_dir() or not os.path.lexists(self.path / EDGETPU_MODEL):
            return None
        p = inside(self.path, EDGETPU_MODEL, "Edge TPU model")
        return _regular(p, "Edge TPU model") if p.exists() else None


def load_bundle(path: os.PathLike, verify: bool = True) -> Bundle:
    """Open a bundle directory or a plain ``.tflite`` file.

    Raises BundleError with a one-line reason for anything unusable: missing
    files, bad JSON, a manifest that breaks its schema, paths leading out of
    the bundle, oversized manifest or labels, or a model whose digest does not
    match.
    """
    p = Path(path)
    if not p.exists():
        raise BundleError(f"{p}: no such file or directory")
    if p.is_file():
        if p.suffix != ".tflite":
            raise BundleError(f"{p}: expected a bundle directory or a .tflite file")
        return Bundle(path=p, model_path=p, manifest=None)
    if not p.is_dir():
        raise BundleError(f"{p}: expected a bundle directory or a .tflite file")
    if not os.path.lexists(p / MANIFEST):
        model = inside(p, MODEL, "model")
        if model.exists():
            return Bundle(path=p, model_path=_regular(model, "model"), manifest=None)
        raise BundleError(f"{p}: not a bundle (no {MANIFEST} or {MODEL})")
    manifest = _read_manifest(p)
    model_path = inside(p, manifest.model_file, "model file")
    if not model_path.exists():
        raise BundleError(f"{p}: manifest present but {manifest.model_file} is missing")
    _regular(model_path, "model")
    if verify:
        size = model_path.stat().st_size
        if size != manifest.model_size or sha256_file(model_path) != manifest.model_sha256:
            raise BundleError(f"{model_path}: does not match the manifest's sha256/size "
                              "(corrupt or replaced model)")
    labels: tuple = ()
    if manifest.labels_file:
        lpath = inside(p, manifest.labels_file, "labels file")
        if os.path.lexists(lpath):
            labels = tuple(read_labels(lpath))
    bundle = Bundle(path=p, model_path=model_path, manifest=manifest, labels=labels)
    bundle.edgetpu_model_path()  # refuse an escaping or irregular Edge TPU model now, not mid-run
    return bundle


def _read_manifest(p: Path) -> Manifest:
    mpath = inside(p, MANIFEST, "manifest")
    raw = read_bounded(mpath, MAX_MANIFEST_BYTES, "manifest")
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        reason = " ".join(str(e).split())[:120] or type(e).__name__
        raise BundleError(f"{mpath}: unreadable manifest ({reason})") from None
    return Manifest.from_dict(data)


def write_manifest(directory: os.PathLike, manifest: Manifest) -> Path:
    out = Path(directory) / MANIFEST
    out.write_text(json.dumps(manifest.to_dict(), indent=2, sort_keys=False) + "\n", encoding="utf-8")
    return out
