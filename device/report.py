"""Reports (``edgepipe.report/1``): build, validate, read as typed objects, write, summarize.

The JSON Schema in ``device/schemas/report.schema.json`` is the contract and
:mod:`edgepipe.device.contracts` is the one validator for it. Producers build a
report as a plain dict with :func:`new_report` (blocks are filled in stage by
stage); readers turn a document into a frozen :class:`Report` with
:meth:`Report.from_dict`, which validates it first. The schema evolves by
optional fields only: blocks this version does not know are kept in ``extra``.
"""
from __future__ import annotations

import dataclasses
import json
import os
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path
from typing import Any, Callable, ClassVar, Dict, Mapping, Optional

from edgepipe.device.contracts import ContractError, validate_report
# The human-readable summary is report_text; its names stay importable from here.
from edgepipe.device.report_text import format_comparison, format_summary  # noqa: F401

SCHEMA = "edgepipe.report/1"


class Kind(str, Enum):
    BENCH = "bench"
    RUN = "run"
    EVAL = "eval"


KINDS = tuple(k.value for k in Kind)


def utc_now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def new_report(kind: str, *, device: Optional[dict] = None, runtime: Optional[dict] = None,
               model: Optional[dict] = None, **blocks: Any) -> dict:
    """A report skeleton: schema, fresh uuid4 id, UTC creation time, kind, device/runtime/model.

    ``device`` defaults to :func:`edgepipe.device.sysinfo.device_info`; extra keyword
    blocks (``latency_ms=...``, ``load_ms=...``) are added as given.
    ``warnings`` and ``errors`` always exist (empty lists).
    """
    if kind not in KINDS:
        raise ContractError("report", "kind", f"must be one of {list(KINDS)}, got {str(kind)[:40]!r}")
    if device is None:
        from edgepipe.device.sysinfo import device_info

        device = device_info()
    report: Dict[str, Any] = {
        "schema": SCHEMA,
        "id": str(uuid.uuid4()),
        "created": utc_now_iso(),
        "kind": kind,
        "device": device,
        "runtime": runtime if runtime is not None else {"backend": "unknown", "delegate": "cpu", "threads": None},
        "model": model if model is not None else {"name": "unknown", "sha256": "", "size": 0},
        "warnings": [],
        "errors": [],
    }
    report.update(blocks)
    return report


def check_reports(payload: Any) -> Any:
    """Return ``payload`` (one report or a list of them) if every report is valid, else raise ContractError."""
    for doc in payload if isinstance(payload, list) else (payload,):
        validate_report(doc)
    return payload


# --------------------------------------------------------------------------- typed view


def _dump(v: Any) -> Any:
    if isinstance(v, _Block):
        return v.to_dict()
    if isinstance(v, Enum):
        return v.value
    if isinstance(v, (list, tuple)):
        return [_dump(x) for x in v]
    if isinstance(v, Mapping):
        return {k: _dump(x) for k, x in v.items()}
    return v


class _Block:
    """Shared ``from_dict``/``to_dict`` for the report's frozen blocks.

    ``to_dict`` is canonical: optional fields that are None are left out
    (``_always`` names those the schema requires), unknown keys come back
    from ``extra``. ``from_dict(x.to_dict()) == x`` for every block.
    """

    _load: ClassVar[Dict[str, Callable[[Any], Any]]] = {}
    _always: ClassVar[tuple] = ()

    @classmethod
    def _names(cls) -> tuple:
        # Field names (without "extra"), computed once per class: reading a
        # report set of thousands of rows goes through here for every block.
        names = cls.__dict__.get("_field_names")
        if names is None:
            names = tuple(f.name for f in dataclasses.fields(cls) if f.name != "extra")  # type: ignore[arg-type]
            cls._field_names = names  # type: ignore[attr-defined]
        return names

    @classmethod
    def from_dict(cls, d: Mapping) -> Any:
        names = cls._names()
        load = cls._load
        kw: Dict[str, Any] = {}
        for k, v in d.items():
            if k in names:
                f = load.get(k)
                kw[k] = f(v) if f is not None and v is not None else v
        if len(kw) < len(d):
            kw["extra"] = {k: v for k, v in d.items() if k not in names}
        return cls(**kw)

    def to_dict(self) -> dict:
        out: Dict[str, Any] = {}
        for k in self._names():
            v = getattr(self, k)
            if v is not None or k in self._always:
                out[k] = _dump(v)
        out.update(_dump(getattr(self, "extra", None) or {}))
        return out


def _tuple(v: Any) -> tuple:
    return tuple(v)


@dataclass(frozen=True)
class StartEnd(_Block):
    """A reading at the start and at the end of a run (temperature, throttling flags)."""

    start: Any = None
    end: Any = None
    extra: Mapping = field(default_factory=dict)
    _always: ClassVar[tuple] = ("start", "end")


@dataclass(frozen=True)
class Device(_Block):
    hostname: str
    id: Optional[str] = None
    name: Optional[str] = None
    tags: Optional[tuple] = None
    board: Optional[str] = None
    cpu: Optional[str] = None
    machine: Optional[str] = None
    cores: Optional[int] = None
    os: Optional[str] = None
    python: Optional[str] = None
    governor: Optional[str] = None
    temperature_c: Optional[StartEnd] = None
    throttled: Optional[StartEnd] = None
    memory_mb: Optional[float] = None
    extra: Mapping = field(default_factory=dict)
    _load: ClassVar[dict] = {"tags": _tuple, "temperature_c": StartEnd.from_dict, "throttled": StartEnd.from_dict}


@dataclass(frozen=True)
class Runtime(_Block):
    backend: str
    delegate: str
    threads: Optional[int] = None
    version: Optional[str] = None
    cpu_fallback_ops: Optional[int] = None
    load: Optional[str] = None  # "cold" | "warm"
    extra: Mapping = field(default_factory=dict)
    _always: ClassVar[tuple] = ("threads",)


@dataclass(frozen=True)
class ModelRef(_Block):
    name: str
    sha256: str
    size: int
    recipe: Optional[str] = None
    extra: Mapping = field(default_factory=dict)


@dataclass(frozen=True)
class LatencyStats(_Block):
    """Milliseconds over ``n`` samples (all None when ``n`` is 0)."""

    n: int
    mean: Optional[float] = None
    std: Optional[float] = None
    min: Optional[float] = None
    p50: Optional[float] = None
    p90: Optional[float] = None
    p99: Optional[float] = None
    max: Optional[float] = None
    extra: Mapping = field(default_factory=dict)
    _always: ClassVar[tuple] = ("n", "mean", "std", "min", "p50", "p90", "p99", "max")


@dataclass(frozen=True)
class LoadBreakdown(_Block):
    """Cold-start milliseconds by stage."""

    file_read: Optional[float] = None
    interpreter_build: Optional[float] = None
    delegate: Optional[float] = None
    allocate: Optional[float] = None
    first_invoke: Optional[float] = None
    extra: Mapping = field(default_factory=dict)

    @property
    def total(self) -> Optional[float]:
        parts = [v for v in (self.file_read, self.interpreter_build, self.delegate, self.allocate,
                             self.first_invoke) if v is not None]
        return sum(parts) if parts else None


@dataclass(frozen=True)
class Throughput(_Block):
    fps: Optional[float] = None
    mode: Optional[str] = None  # "sequential" | "pipelined"
    workers: Optional[int] = None
    queue_depth: Optional[int] = None
    frames: Optional[int] = None
    frames_dropped: Optional[int] = None
    frames_skipped: Optional[int] = None
    extra: Mapping = field(default_factory=dict)


@dataclass(frozen=True)
class Failure(_Block):
    """Why a job produced no measurement, e.g. the runtime crashed with a signal while allocating tensors."""

    reason: str
    stage: Optional[str] = None
    signal: Optional[str] = None
    extra: Mapping = field(default_factory=dict)


def _stats_map(v: Mapping) -> dict:
    return {k: None if s is None else LatencyStats.from_dict(s) for k, s in v.items()}


@dataclass(frozen=True)
class Report(_Block):
    """One ``edgepipe.report/1`` document, typed. Build with :meth:`from_dict` (validates)."""

    id: str
    created: str
    kind: Kind
    device: Device
    runtime: Runtime
    model: ModelRef
    schema: str = SCHEMA
    load_ms: Optional[LoadBreakdown] = None
    latency_ms: Optional[LatencyStats] = None
    stages_ms: Optional[Mapping[str, Optional[LatencyStats]]] = None
    throughput: Optional[Throughput] = None
    peak_rss_mb: Optional[float] = None
    accuracy: Optional[dict] = None
    input: Optional[dict] = None
    settings: Optional[dict] = None
    failure: Optional[Failure] = None
    warnings: tuple = ()
    errors: tuple = ()
    extra: Mapping = field(default_factory=dict)
    _load: ClassVar[dict] = {
        "kind": Kind, "device": Device.from_dict, "runtime": Runtime.from_dict, "model": ModelRef.from_dict,
        "load_ms": LoadBreakdown.from_dict, "latency_ms": LatencyStats.from_dict, "stages_ms": _stats_map,
        "throughput": Throughput.from_dict, "failure": Failure.from_dict, "warnings": _tuple, "errors": _tuple}
    _always: ClassVar[tuple] = ("warnings", "errors")

    @classmethod
    def from_dict(cls, d: Any, *, validate: bool = True) -> "Report":
        """The typed report in ``d``; raises ContractError when ``d`` breaks the schema.

        ``validate=False`` is for documents already checked (e.g. read back from the results store).
        """
        if validate:
            validate_report(d)
        return super().from_dict(d)

    def to_dict(self) -> dict:
        """The JSON document (schema first, as the device writes it)."""
        return {"schema": self.schema, **super().to_dict()}


def dumps(report: Any, indent: Optional[int] = 2) -> str:
    """JSON text (one report or a list); NaN/inf become null so any JSON parser reads it."""
    return json.dumps(_finite(report), indent=indent, ensure_ascii=False)


def _finite(x: Any) -> Any:
    if isinstance(x, float) and (x != x or x in (float("inf"), float("-inf"))):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def write_json(obj: Any, path: os.PathLike) -> Path:
    """Write a report (or a list of them) atomically: temp file, then rename."""
    p = Path(path)
    if p.parent and not p.parent.exists():
        p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    tmp.write_text(dumps(obj) + "\n", encoding="utf-8")
    os.replace(tmp, p)
    return p

