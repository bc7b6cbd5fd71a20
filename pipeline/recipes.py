"""Quantization recipes as data.

One table says what each recipe does and needs; conversion, validation, the
CLI's help and the docs all read it, so a recipe is never half-described in
scattered branches.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from enum import Enum
from typing import Optional
from edgepipe.device.errors import EdgepipeError


class OpSet(str, Enum):
    """Names of ``tf.lite.OpsSet`` members (resolved only when converting)."""

    BUILTINS = "TFLITE_BUILTINS"
    BUILTINS_INT8 = "TFLITE_BUILTINS_INT8"
    INT16X8 = "EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8"


@dataclass(frozen=True)
class Recipe:
    name: str
    summary: str
    optimize: bool = False  # tf.lite.Optimize.DEFAULT
    needs_calibration: bool = False  # representative dataset required
    supported_types: tuple = ()  # e.g. ("float16",)
    ops: tuple = ()  # OpSet members; empty = converter default
    io_type: Optional[str] = None  # integer model inputs/outputs ("uint8"/"int8")
    edgetpu: bool = False  # candidate for edgetpu_compiler
    weights: str = "float32"  # storage type of the weights, for docs
    activations: str = "float32"

    def describe(self) -> dict:
        return {
            "name": self.name,
            "summary": self.summary,
            "weights": self.weights,
            "activations": self.activations,
            "io": self.io_type or "float32",
            "needs_calibration": self.needs_calibration,
            "edgetpu": self.edgetpu,
        }


RECIPES: dict = {
    r.name: r
    for r in (
        Recipe("fp32", "float32 baseline, no quantization"),
        Recipe("fp16", "float16 weights, float compute (GPU delegates run it natively)",
               optimize=True, supported_types=("float16",), weights="float16"),
        Recipe("dynamic", "dynamic-range: int8 weights, activations quantized on the fly",
               optimize=True, weights="int8", activations="float32 (int8 on the fly)"),
        Recipe("int8", "full integer kernels with float input/output",
               optimize=True, needs_calibration=True, ops=(OpSet.BUILTINS_INT8,),
               weights="int8", activations="int8"),
        Recipe("int8-io", "full integer with integer input/output (Edge TPU ready)",
               optimize=True, needs_calibration=True, ops=(OpSet.BUILTINS_INT8,),
               io_type="uint8", edgetpu=True, weights="int8", activations="int8"),
        Recipe("int16x8", "int16 activations with int8 weights (accuracy over speed)",
               optimize=True, needs_calibration=True, ops=(OpSet.INT16X8,),
               weights="int8", activations="int16"),
    )
}

DEFAULT_RECIPES = tuple(RECIPES)


class RecipeError(EdgepipeError, ValueError):
    """Unknown recipe names or options; message is user-facing."""


def parse_recipes(text: str) -> tuple:
    """``"fp32,int8"`` or ``"all"`` -> tuple of Recipe, in the order given, no duplicates."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise RecipeError("no recipe given; choose from " + ", ".join(RECIPES))
    if names == ["all"]:
        return tuple(RECIPES.values())
    unknown = [n for n in names if n not in RECIPES]
    if unknown:
        raise RecipeError(f"unknown recipe {unknown[0]!r}; choose from {', '.join(RECIPES)} or 'all'")
    seen: dict = {}
    for n in names:
        seen.setdefault(n, RECIPES[n])
    return tuple(seen.values())


def with_io_type(recipe: Recipe, io_type: str) -> Recipe:
    """The int8-io recipe with ``uint8`` (Edge TPU's classic choice) or ``int8`` I/O."""
    if io_type not in ("uint8", "int8"):
        raise RecipeError(f"the integer I/O type must be uint8 or int8, not {io_type!r}", param="io_type")
    if recipe.io_type is None:
        return recipe
    return replace(recipe, io_type=io_type)
