"""A model input or output as a plain value: shape, dtype and quantization.

Built once from the runtime's detail dict (:meth:`TensorSpec.from_detail`);
everything downstream (preprocessing, decoding, reports) works on these and
numpy arrays, never on the runtime's own objects.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Tuple

import numpy as np


@dataclass(frozen=True)
class TensorSpec:
    """One model input or output, converted once from the runtime's detail dict.

    ``real = scale * (q - zero_point)``; ``scale == 0`` means not quantized.
    """

    index: int
    name: str
    shape: tuple
    dtype: str  # numpy dtype name: "float32", "int8", "uint8", ...
    scale: float = 0.0
    zero_point: int = 0
    shape_signature: tuple = ()

    @property
    def quantized(self) -> bool:
        return self.scale != 0.0 and np.issubdtype(np.dtype(self.dtype), np.integer)

    @property
    def np_dtype(self) -> np.dtype:
        return np.dtype(self.dtype)

    @classmethod
    def from_detail(cls, d: dict) -> "TensorSpec":
        scale, zp = d.get("quantization", (0.0, 0)) or (0.0, 0)
        qp = d.get("quantization_parameters") or {}
        scales = qp.get("scales")
        # Per-tensor parameters live in "quantization"; fall back to a
        # single-element per-axis list (some converters only fill that).
        if not scale and scales is not None and len(scales) == 1:
            scale, zp = float(scales[0]), int(qp["zero_points"][0])
        sig = d.get("shape_signature")
        return cls(
            index=int(d["index"]),
            name=str(d.get("name", "")),
            shape=tuple(int(x) for x in d["shape"]),
            dtype=np.dtype(d["dtype"]).name,
            scale=float(scale),
            zero_point=int(zp),
            shape_signature=tuple(int(x) for x in sig) if sig is not None else (),
        )

    def to_dict(self) -> dict:
        """The manifest/report form (same keys as ``edgepipe.device.bundle.TensorInfo``)."""
        q = {"scale": self.scale, "zero_point": self.zero_point} if self.quantized else None
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype, "quantization": q}

    def quantize(self, x: Any) -> np.ndarray:
        """Float values to this tensor's dtype: round, clip to the dtype's range, then cast.

        Non-quantized tensors are just cast (float32 stays float32).
        """
        dt = self.np_dtype
        if not self.quantized:
            return np.asarray(x, dtype=dt)
        info = np.iinfo(dt)
        q = np.rint(np.asarray(x, dtype=np.float32) / np.float32(self.scale)) + self.zero_point
        return np.clip(q, info.min, info.max).astype(dt)

    def dequantize(self, q: Any) -> np.ndarray:
        """Raw output values to float32 with this tensor's own scale/zero-point."""
        a = np.asarray(q)
        if not self.quantized:
            return a.astype(np.float32, copy=False)
        return (a.astype(np.float32) - np.float32(self.zero_point)) * np.float32(self.scale)

    def float_range(self) -> Tuple[float, float]:
        """The real-valued range this tensor can represent (quantized), else (-1, 1)."""
        if not self.quantized:
            return (-1.0, 1.0)
        info = np.iinfo(self.np_dtype)
        return (self.scale * (info.min - self.zero_point), self.scale * (info.max - self.zero_point))


__all__ = ["TensorSpec"]
