"""Bundle manifest (``edgepipe.bundle/1``): the typed contract between `edgepipe convert` and the device.

The manifest is versioned by its ``schema`` field; the device refuses a schema
it does not understand instead of guessing, and checks every manifest against
``device/schemas/bundle.schema.json`` before reading it. Reading the bundle's
files (bounded, confined to the bundle) is :mod:`edgepipe.device.bundle`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Optional

from edgepipe.device.contracts import ContractError, validate_manifest
from edgepipe.device.errors import EdgepipeError

SCHEMA = "edgepipe.bundle/1"
MANIFEST = "manifest.json"
MODEL = "model.tflite"
EDGETPU_MODEL = "model_edgetpu.tflite"
LABELS = "labels.txt"


class BundleError(EdgepipeError):
    """A bundle or model that cannot be used; the message is one line for the user."""


class Task(str, Enum):
    CLASSIFICATION = "classification"
    DETECTION = "detection"
    SEGMENTATION = "segmentation"
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
    # Scale the whole frame to fit, keep the aspect ratio, centre it and pad
    # the rest with LETTERBOX_FILL (the YOLO convention).
    LETTERBOX = "letterbox"


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
    # Detection/segmentation decoder parameters (edgepipe.device.decode.DecoderSpec.from_dict
    # checks them when a run starts); None: inferred from the outputs, with the assumption said.
    decoder: Optional[dict] = None
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
            **({"decoder": dict(self.decoder)} if self.decoder is not None else {}),
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
                decoder=dict(d["decoder"]) if d.get("decoder") is not None else None,
            )
        except (KeyError, TypeError, ValueError) as e:
            raise BundleError(f"invalid manifest: {type(e).__name__}: {e}") from None
