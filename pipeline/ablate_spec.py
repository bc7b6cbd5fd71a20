"""The ablation spec (TOML): what to vary and what to measure.

```toml
name = "mobilenet_v2"

[model]
source = "sample:mobilenet_v2"      # or a .keras path, or "factory:edgepipe.pipeline.factories:fashion_mnist_cnn"
preprocess = "mobilenet"            # optional preset for convert

[data]
dir = "../../sample_data/images"    # images to evaluate on (folder per class gives accuracy)
calib = "../../sample_data/images"  # calibration images (default: dir)
limit = 64                          # at most this many eval images

[axes]
recipe = ["fp32", "fp16", "dynamic", "int8"]
input_size = [224, 160]
threads = [1, 2]
delegate = ["cpu"]
# factories only:
width = [1.0, 0.5]
depth = [2, 1]
remove = [[], ["block2"]]

[bench]
runs = 30
warmup = 5

[factory]                            # keyword arguments for the factory (e.g. epochs)
epochs = 2
```

Relative paths are resolved against the spec file's folder. Every problem is
reported as ``SpecError("<field>: <reason>")``.
"""
from __future__ import annotations

import itertools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional
from edgepipe.device.errors import EdgepipeError

try:  # Python 3.11+
    import tomllib as _toml
except ImportError:  # pragma: no cover - older Pythons
    try:
        import tomli as _toml  # type: ignore
    except ImportError:
        _toml = None

RECIPES = ("fp32", "fp16", "dynamic", "int8", "int8-io", "int16x8")
ARCH_AXES = ("width", "depth", "remove")
AXES = ("recipe", "input_size", "threads", "delegate") + ARCH_AXES
TOP_KEYS = {"name", "model", "data", "axes", "bench", "factory", "reference"}
MODEL_KEYS = {"source", "preprocess"}
DATA_KEYS = {"dir", "calib", "limit", "calib_limit", "labels"}
BENCH_KEYS = {"runs", "warmup", "min_secs"}
DELEGATES = ("cpu", "xnnpack", "edgetpu", "gpu")


class SpecError(EdgepipeError, ValueError):
    """An invalid spec; the message names the field."""


@dataclass(frozen=True)
class Point:
    """One combination of axis values."""

    recipe: str
    input_size: Optional[int]
    threads: int
    delegate: str
    width: Optional[float] = None
    depth: Optional[int] = None
    remove: tuple = ()

    @property
    def arch(self) -> dict:
        """The architecture knobs (what the model factory sees)."""
        d = {}
        if self.width is not None:
            d["width"] = self.width
        if self.depth is not None:
            d["depth"] = self.depth
        if self.remove:
            d["remove"] = list(self.remove)
        return d

    def model_key(self) -> str:
        """Identifies the Keras model (architecture + input size)."""
        parts = [f"{k}={v}" for k, v in sorted(self.arch.items())]
        if self.input_size:
            parts.append(f"size={self.input_size}")
        return ",".join(parts) or "base"

    def bundle_key(self) -> str:
        return f"{self.model_key()}|{self.recipe}"

    def key(self) -> str:
        return f"{self.bundle_key()}|t={self.threads}|{self.delegate}"

    def label(self) -> str:
        bits = [self.recipe]
        if self.input_size:
            bits.append(str(self.input_size))
        for k, v in sorted(self.arch.items()):
            bits.append(f"{k}={'+'.join(v) if isinstance(v, list) else v}")
        bits.append(f"t{self.threads}")
        if self.delegate != "cpu":
            bits.append(self.delegate)
        return " ".join(bits)

    def to_dict(self) -> dict:
        return {"recipe": self.recipe, "input_size": self.input_size, "threads": self.threads,
                "delegate": self.delegate, **self.arch}


@dataclass(frozen=True)
class Spec:
    path: Path
    name: str
    source: str
    preprocess: Optional[str]
    data_dir: Path
    calib_dir: Path
    limit: Optional[int]
    calib_limit: Optional[int]
    labels: Optional[Path]
    axes: dict
    bench: dict
    factory_kwargs: dict = field(default_factory=dict)

    @property
    def is_factory(self) -> bool:
        return self.source.startswith("factory:")

    def points(self) -> list:
        """The full grid, in a stable order (recipe varies fastest last)."""
        ax = self.axes
        grid = itertools.product(
            ax.get("width", [None]), ax.get("depth", [None]), ax.get("remove", [()]),
            ax.get("input_size", [None]), ax.get("recipe", ["fp32"]),
            ax.get("threads", [1]), ax.get("delegate", ["cpu"]))
        return [Point(recipe=r, input_size=s, threads=t, delegate=d, width=w, depth=dp,
                      remove=tuple(rm))
                for w, dp, rm, s, r, t, d in grid]

    def digest_fields(self) -> dict:
        """What, besides the point, decides a measurement (for the resume cache)."""
        return {"source": self.source, "preprocess": self.preprocess,
                "data": str(self.data_dir), "calib": str(self.calib_dir), "limit": self.limit,
                "calib_limit": self.calib_limit, "bench": self.bench,
                "factory": self.factory_kwargs}


# element type -> (test, what the error calls it)
_KINDS = {
    int: (lambda x: isinstance(x, int) and not isinstance(x, bool), "an integer"),
    float: (lambda x: isinstance(x, (int, float)) and not isinstance(x, bool), "a number"),
    str: (lambda x: isinstance(x, str), "a string"),
}


def _list(axes: dict, name: str, kind, check) -> list:
    v = axes[name]
    if not isinstance(v, list) or not v:
        raise SpecError(f"axes.{name}: expected a non-empty list, got {json.dumps(v)}")
    is_kind, what = _KINDS[kind]
    out = []
    for x in v:
        if not is_kind(x):
            raise SpecError(f"axes.{name}: {json.dumps(x)} is not {what}")
        reason = check(x)
        if reason:
            raise SpecError(f"axes.{name}: {json.dumps(x)} {reason}")
        out.append(float(x) if kind is float else x)
    if len(set(map(repr, out))) != len(out):
        raise SpecError(f"axes.{name}: duplicate values")
    return out


def _check_delegate(d: str) -> Optional[str]:
    if d in DELEGATES or d.endswith(".so"):
        return None
    return f"is not a delegate (one of {', '.join(DELEGATES)} or a path to a .so)"


def _table(d: dict, key: str) -> dict:
    v = d.get(key, {})
    if not isinstance(v, dict):
        raise SpecError(f"{key}: expected a table [{key}]")
    return v


def _unknown(table: dict, allowed: set, prefix: str) -> None:
    extra = sorted(set(table) - allowed)
    if extra:
        raise SpecError(f"{prefix}{extra[0]}: unknown field (expected one of "
                        f"{', '.join(sorted(allowed))})")


def parse_spec(data: dict, base: Path, path: Optional[Path] = None) -> Spec:
    """Validate a parsed TOML document into a Spec."""
    _unknown(data, TOP_KEYS, "")
    model, dat, axes = _table(data, "model"), _table(data, "data"), _table(data, "axes")
    bench, factory = _table(data, "bench"), _table(data, "factory")
    _unknown(model, MODEL_KEYS, "model.")
    _unknown(dat, DATA_KEYS, "data.")
    _unknown(bench, BENCH_KEYS, "bench.")
    unknown_axes = sorted(set(axes) - set(AXES))
    if unknown_axes:
        raise SpecError(f"axes.{unknown_axes[0]}: unknown axis (expected one of {', '.join(AXES)})")
    source = _source(model.get("source"), base)
    preprocess = model.get("preprocess")
    if preprocess is not None and not isinstance(preprocess, str):
        raise SpecError("model.preprocess: expected a preset name string")
    _check_factory_only(source, axes, factory)
    parsed_axes = _axes(axes)
    data_dir, calib_dir, limits, labels = _data(dat, base)
    parsed_bench = _bench(bench)
    name = data.get("name") or (path.stem if path else "ablation")
    if not isinstance(name, str):
        raise SpecError("name: expected a string")
    return Spec(path=path or base, name=name, source=source, preprocess=preprocess,
                data_dir=data_dir, calib_dir=calib_dir, limit=limits["limit"],
                calib_limit=limits["calib_limit"], labels=labels, axes=parsed_axes, bench=parsed_bench,
                factory_kwargs=dict(factory))


def _source(source, base: Path) -> str:
    """``model.source``: a factory, a known sample, or an existing path (made absolute)."""
    if not isinstance(source, str) or not source:
        raise SpecError("model.source: required (a .keras path, 'sample:mobilenet_v2', "
                        "'sample:fashion_mnist' or 'factory:module:function')")
    if source.startswith("factory:"):
        if source.count(":") != 2 or not all(source.split(":")[1:]):
            raise SpecError(f"model.source: {source!r} should be 'factory:module:function'")
        return source
    if source.startswith("sample:"):
        if source not in ("sample:mobilenet_v2", "sample:fashion_mnist"):
            raise SpecError(f"model.source: unknown sample {source!r} "
                            "(sample:mobilenet_v2 or sample:fashion_mnist)")
        return source
    p = (base / source).resolve()
    if not p.exists():
        raise SpecError(f"model.source: {p} does not exist")
    return str(p)


def _check_factory_only(source: str, axes: dict, factory: dict) -> None:
    """Architecture axes and a [factory] table only make sense for a factory model."""
    if source.startswith("factory:"):
        return
    arch_given = [a for a in ARCH_AXES if a in axes]
    if arch_given:
        raise SpecError(f"axes.{arch_given[0]}: architecture axes need a factory model "
                        "(model.source = 'factory:module:function')")
    if factory:
        raise SpecError("factory: only allowed with a factory model source")


# axis -> (element type, check returning a reason or None)
_AXIS_RULES = {
    "recipe": (str, lambda r: None if r in RECIPES else f"is not a recipe (one of {', '.join(RECIPES)})"),
    "input_size": (int, lambda s: None if 8 <= s <= 4096 else "is out of range 8..4096"),
    "threads": (int, lambda t: None if 1 <= t <= 64 else "is out of range 1..64"),
    "delegate": (str, _check_delegate),
    "width": (float, lambda w: None if 0 < w <= 4 else "is out of range (0, 4]"),
    "depth": (int, lambda d: None if 1 <= d <= 16 else "is out of range 1..16"),
}


def _axes(axes: dict) -> dict:
    """The validated axis value lists, in ``AXES`` order."""
    parsed = {}
    for name in AXES:
        if name not in axes:
            continue
        if name == "remove":
            parsed[name] = _remove_axis(axes[name])
        else:
            kind, check = _AXIS_RULES[name]
            parsed[name] = _list(axes, name, kind, check)
    return parsed


def _remove_axis(v) -> list:
    if not isinstance(v, list) or not v or not all(
            isinstance(x, list) and all(isinstance(s, str) for s in x) for x in v):
        raise SpecError("axes.remove: expected a list of lists of block names, "
                        'e.g. [[], ["block2"]]')
    return [tuple(x) for x in v]


def _data(dat: dict, base: Path) -> tuple:
    """``(data dir, calibration dir, {"limit", "calib_limit"}, labels file or None)``."""
    def folder(key: str, default: Optional[str]) -> Path:
        v = dat.get(key, default)
        if not isinstance(v, str):
            raise SpecError(f"data.{key}: required (a folder of images)")
        p = (base / v).resolve()
        if not p.is_dir():
            raise SpecError(f"data.{key}: {p} is not a folder")
        return p

    data_dir = folder("dir", None)
    calib_dir = folder("calib", dat.get("dir"))
    limits = {}
    for key in ("limit", "calib_limit"):
        v = dat.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise SpecError(f"data.{key}: expected a positive integer, got {json.dumps(v)}")
        limits[key] = v
    labels = None
    if "labels" in dat:
        labels = (base / str(dat["labels"])).resolve()
        if not labels.is_file():
            raise SpecError(f"data.labels: {labels} is not a file")
    return data_dir, calib_dir, limits, labels


def _bench(bench: dict) -> dict:
    """``[bench]`` with defaults: runs >= 1, warmup >= 0 (integers), min_secs >= 0."""
    b = {"runs": 30, "warmup": 5, "min_secs": 0.0}
    for key, v in bench.items():
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0
        if key in ("runs", "warmup"):
            ok = ok and isinstance(v, int) and (v >= 1 or key == "warmup")
        if not ok:
            raise SpecError(f"bench.{key}: bad value {json.dumps(v)}")
        b[key] = v
    return b


def load_spec(path: os.PathLike) -> Spec:
    """Read and validate a spec file; raises SpecError with a one-line reason."""
    p = Path(path)
    if _toml is None:  # pragma: no cover
        raise SpecError("spec: reading TOML needs Python 3.11+ or the 'tomli' package")
    try:
        data = _toml.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SpecError(f"spec: {p} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise SpecError(f"spec: cannot read {p} ({e})") from None
    except _toml.TOMLDecodeError as e:
        raise SpecError(f"spec: {p} is not valid TOML ({e})") from None
    return parse_spec(data, p.resolve().parent, p.resolve())
