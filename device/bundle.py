"""Bundle manifest: the contract between `edgepipe convert` and the device.

A bundle is a directory holding ``model.tflite``, ``manifest.json`` and, when
known, ``labels.txt`` (plus ``model_edgetpu.tflite`` when compiled for the Edge
TPU). The manifest is versioned by its ``schema`` field; the device refuses a
schema it does not understand instead of guessing.

Everything here is plain Python + JSON so it imports on a Pi without any
runtime installed.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import stat
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path, PurePosixPath
from typing import Any, Optional

from edgepipe.device.contracts import ContractError, validate_manifest
from edgepipe.device.errors import EdgepipeError

SCHEMA = "edgepipe.bundle/1"
MANIFEST = "manifest.json"
MODEL = "model.tflite"
EDGETPU_MODEL = "model_edgetpu.tflite"
LABELS = "labels.txt"
# Bounds on what a bundle may make the device read (bundles arrive from the network).
MAX_MANIFEST_BYTES = 1 << 20
MAX_LABELS_BYTES = 4 << 20
MAX_LABELS_LINES = 100_000


class BundleError(EdgepipeError):
    """A bundle or model that cannot be used; the message is one line for the user."""


class Task(str, Enum):
    CLASSIFICATION = "classification"
    DETECTION = "detection"
    OTHER = "other"


class ColorOrder(str, Enum):
    RGB = "rgb"
    BGR = "bgr"
    GRAY = "gray"


class ResizeMode(str, Enum):
    # Stretch the whole frame to the model size (aspect ratio not kept).
    STRETCH = "stretch"
    # Crop the centre `crop_fraction` of the shorter side's square, then resize
    # (the classic ImageNet eval transform: 224/256 = 0.875).
    CENTER_CROP = "center-crop"


@dataclass(frozen=True)
class Quantization:
    """Affine quantization of a tensor: real = scale * (q - zero_point)."""

    scale: float
    zero_point: int

    def to_dict(self) -> dict:
        return {"scale": self.scale, "zero_point": self.zero_point}

    @classmethod
    def from_dict(cls, d: Optional[dict]) -> Optional["Quantization"]:
        if not d:
            return None
        return cls(scale=float(d["scale"]), zero_point=int(d["zero_point"]))


@dataclass(frozen=True)
class TensorInfo:
    """A model input or output as recorded in the manifest."""

    name: str
    shape: tuple
    dtype: str
    quantization: Optional[Quantization] = None

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "shape": list(self.shape),
            "dtype": self.dtype,
            "quantization": self.quantization.to_dict() if self.quantization else None,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "TensorInfo":
        return cls(
            name=str(d["name"]),
            shape=tuple(int(x) for x in d["shape"]),
            dtype=str(d["dtype"]),
            quantization=Quantization.from_dict(d.get("quantization")),
        )


@dataclass(frozen=True)
class Preprocess:
    """How a decoded image becomes the float input the model expects.

    ``float_input = (pixel - mean) / std`` per channel, with pixels in
    [0, 255] in ``color`` order, resized to ``height`` x ``width``. The
    device then quantizes that float input with the input tensor's own
    scale/zero-point when the model takes integers.
    """

    height: int
    width: int
    color: ColorOrder = ColorOrder.RGB
    resize: ResizeMode = ResizeMode.STRETCH
    crop_fraction: float = 1.0
    interpolation: str = "bilinear"
    layout: str = "nhwc"
    mean: tuple = (0.0, 0.0, 0.0)
    std: tuple = (1.0, 1.0, 1.0)
    preset: Optional[str] = None
    # Human-readable notes on what was inferred rather than told.
    assumed: tuple = ()

    @property
    def channels(self) -> int:
        return 1 if self.color == ColorOrder.GRAY else 3

    def to_dict(self) -> dict:
        return {
            "height": self.height,
            "width": self.width,
            "color": self.color.value,
            "resize": self.resize.value,
            "crop_fraction": self.crop_fraction,
            "interpolation": self.interpolation,
            "layout": self.layout,
            "mean": list(self.mean),
            "std": list(self.std),
            "preset": self.preset,
            "assumed": list(self.assumed),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocess":
        return cls(
            height=int(d["height"]),
            width=int(d["width"]),
            color=ColorOrder(d.get("color", "rgb")),
            resize=ResizeMode(d.get("resize", "stretch")),
            crop_fraction=float(d.get("crop_fraction", 1.0)),
            interpolation=str(d.get("interpolation", "bilinear")),
            layout=str(d.get("layout", "nhwc")),
            mean=tuple(float(x) for x in d.get("mean", (0.0,))),
            std=tuple(float(x) for x in d.get("std", (1.0,))),
            preset=d.get("preset"),
            assumed=tuple(d.get("assumed", ())),
        )


@dataclass(frozen=True)
class Calibration:
    count: int
    seed: int
    digest: str
    source: str = ""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Optional[dict]) -> Optional["Calibration"]:
        if not d:
            return None
        return cls(count=int(d["count"]), seed=int(d["seed"]), digest=str(d["digest"]),
                   source=str(d.get("source", "")))


@dataclass(frozen=True)
class Manifest:
    name: str
    recipe: str
    model_sha256: str
    model_size: int
    inputs: tuple
    outputs: tuple
    preprocess: Optional[Preprocess] = None
    task: Task = Task.OTHER
    labels_file: Optional[str] = None
    source_model: dict = field(default_factory=dict)  # {"name", "sha256"}
    converter: dict = field(default_factory=dict)  # {"tensorflow", "edgepipe"}
    created: str = ""
    calibration: Optional[Calibration] = None
    edgetpu: Optional[dict] = None  # parsed edgetpu_compiler log, see edgepipe.pipeline.edgetpu
    extra: dict = field(default_factory=dict)  # recipe details, selective quantization, ...
    schema: str = SCHEMA
    model_file: str = MODEL  # relative to the bundle directory

    def to_dict(self) -> dict:
        return {
            "schema": self.schema,
            "name": self.name,
            "recipe": self.recipe,
            "created": self.created,
            "source_model": dict(self.source_model),
            "model": {"file": self.model_file, "sha256": self.model_sha256, "size": self.model_size},
            "converter": dict(self.converter),
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
            "preprocess": self.preprocess.to_dict() if self.preprocess else None,
            "task": self.task.value,
            "labels": self.labels_file,
            "calibration": self.calibration.to_dict() if self.calibration else None,
            "edgetpu": self.edgetpu,
            "extra": dict(self.extra),
        }

    @classmethod
    def from_dict(cls, d: Any) -> "Manifest":
        """The manifest in ``d``, checked against ``edgepipe.bundle/1`` (BundleError when it does not match)."""
        if not isinstance(d, dict):
            raise BundleError("manifest is not a JSON object")
        schema = d.get("schema")
        if schema != SCHEMA:
            raise BundleError(
                f"unsupported bundle schema {str(schema)[:40]!r} (this edgerun reads {SCHEMA!r}); "
                "re-create the bundle with a matching edgepipe or upgrade edgerun")
        try:
            validate_manifest(d)
        except ContractError as e:
            raise BundleError(f"invalid manifest: {e.detail}") from None
        try:
            model = d["model"]
            return cls(
                schema=schema,
                model_file=str(model.get("file") or MODEL),
                name=str(d["name"]),
                recipe=str(d["recipe"]),
                created=str(d.get("created", "")),
                source_model=dict(d.get("source_model") or {}),
                model_sha256=str(model["sha256"]),
                model_size=int(model["size"]),
                converter=dict(d.get("converter") or {}),
                inputs=tuple(TensorInfo.from_dict(t) for t in d["inputs"]),
                outputs=tuple(TensorInfo.from_dict(t) for t in d["outputs"]),
                preprocess=Preprocess.from_dict(d["preprocess"]) if d.get("preprocess") else None,
                task=Task(d.get("task", "other")),
                labels_file=d.get("labels"),
                calibration=Calibration.from_dict(d.get("calibration")),
                edgetpu=d.get("edgetpu"),
                extra=dict(d.get("extra") or {}),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise BundleError(f"invalid manifest: {type(e).__name__}: {e}") from None


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
