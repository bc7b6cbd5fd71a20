"""Reports (``edgepipe.report/1``): build, validate (without jsonschema), write, summarize.

The JSON Schema in ``device/schemas/report.schema.json`` is the contract. The
device must not need the ``jsonschema`` package, so :func:`report_problems`
interprets the small subset of JSON Schema that file uses (type, required,
properties, additionalProperties, items, enum, const, pattern, minimum,
minLength, $ref to $defs). Tests check it agrees with ``jsonschema``.
"""
from __future__ import annotations

import json
import os
import re
import uuid
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import Any, Dict, List, Optional
from edgepipe.device.errors import EdgepipeError

SCHEMA = "edgepipe.report/1"
SCHEMA_FILE = Path(__file__).with_name("schemas") / "report.schema.json"
KINDS = ("bench", "run", "eval")


class ReportError(EdgepipeError, ValueError):
    """A report that does not match the schema; the message lists the problems."""


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
        raise ValueError(f"report kind must be one of {KINDS}, got {kind!r}")
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


@lru_cache(maxsize=1)
def _schema() -> dict:
    return json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))


_TYPES = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
}


def _check(value: Any, schema: dict, root: dict, where: str, out: List[str]) -> None:
    if "$ref" in schema:
        ref = schema["$ref"]
        if not ref.startswith("#/$defs/"):
            raise ValueError(f"unsupported $ref {ref}")
        schema = root["$defs"][ref.split("/")[-1]]
    types = schema.get("type")
    if types is not None:
        types = [types] if isinstance(types, str) else types
        if not any(_TYPES[t](value) for t in types):
            out.append(f"{where or '<root>'}: expected {'/'.join(types)}, got {type(value).__name__}")
            return
    if "const" in schema and value != schema["const"]:
        out.append(f"{where}: must be {schema['const']!r}, got {value!r}")
    if "enum" in schema and value not in schema["enum"]:
        out.append(f"{where}: must be one of {schema['enum']}, got {value!r}")
    if isinstance(value, str):
        if "minLength" in schema and len(value) < schema["minLength"]:
            out.append(f"{where}: too short")
        if "pattern" in schema and not re.search(schema["pattern"], value):
            out.append(f"{where}: {value!r} does not match {schema['pattern']}")
    if _TYPES["number"](value) and "minimum" in schema and value < schema["minimum"]:
        out.append(f"{where}: {value} is below {schema['minimum']}")
    if isinstance(value, dict):
        for key in schema.get("required", ()):
            if key not in value:
                out.append(f"{where + '.' if where else ''}{key}: required")
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        for key, v in value.items():
            sub = f"{where}.{key}" if where else key
            if key in props:
                _check(v, props[key], root, sub, out)
            elif isinstance(extra, dict):
                _check(v, extra, root, sub, out)
            elif extra is False:
                out.append(f"{sub}: not allowed")
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, v in enumerate(value):
            _check(v, schema["items"], root, f"{where}[{i}]", out)


def report_problems(report: Any) -> List[str]:
    """Everything wrong with ``report`` against the schema (empty list: valid)."""
    schema = _schema()
    out: List[str] = []
    _check(report, schema, schema, "", out)
    return out


def validate_report(report: Any) -> dict:
    """Return ``report`` if it matches the schema, else raise :class:`ReportError`."""
    problems = report_problems(report)
    if problems:
        more = f" (+{len(problems) - 5} more)" if len(problems) > 5 else ""
        raise ReportError("invalid report: " + "; ".join(problems[:5]) + more)
    return report


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


# --------------------------------------------------------------------------- human summary


def _ms(v: Optional[float]) -> str:
    if v is None:
        return "-"
    return f"{v:.3f}" if v < 1 else f"{v:.2f}" if v < 100 else f"{v:.0f}"


def format_summary(r: dict) -> str:
    """A few aligned lines a person can read at a glance."""
    m, rt, dev = r.get("model", {}), r.get("runtime", {}), r.get("device", {})
    lines = []
    size = m.get("size") or 0
    recipe = f", recipe {m['recipe']}" if m.get("recipe") else ""
    human = f"{size / 1e6:.2f} MB" if size >= 100_000 else f"{size / 1e3:.1f} KB"
    lines.append(f"model      {m.get('name')}{recipe}, {human}")
    thr = rt.get("threads")
    lines.append(f"runtime    {rt.get('backend')} {rt.get('version') or ''}, delegate {rt.get('delegate')}, "
                 f"threads {thr if thr is not None else 'default'}, {rt.get('load') or 'cold'} load")
    ld = r.get("load_ms") or {}
    if ld:
        lines.append("load (ms)  " + " | ".join(
            f"{k.replace('_', ' ')} {_ms(ld.get(k))}"
            for k in ("file_read", "interpreter_build", "delegate", "allocate", "first_invoke")))
    fb = (r.get("settings") or {}).get("cpu_fallback")
    if fb and fb.get("total_ops"):
        names = ", ".join(f"{k} x{v}" for k, v in sorted((fb.get("cpu_op_names") or {}).items()))
        lines.append(f"ops        {fb['delegated_ops']} of {fb['total_ops']} on {fb['delegate']}, "
                     f"{fb['cpu_ops']} on the CPU" + (f" ({names})" if names else ""))
    lat = r.get("latency_ms")
    if lat and lat.get("n"):
        lines.append(f"latency    n={lat['n']}  mean {_ms(lat['mean'])}  std {_ms(lat['std'])}  min {_ms(lat['min'])}"
                     f"  p50 {_ms(lat['p50'])}  p90 {_ms(lat['p90'])}  p99 {_ms(lat['p99'])}  max {_ms(lat['max'])} ms")
    tp = r.get("throughput") or {}
    if tp.get("fps"):
        rss = r.get("peak_rss_mb")
        unit = "frames/s end to end" if r.get("kind") == "run" else "inferences/s"
        lines.append(f"throughput {tp['fps']:.1f} {unit}" + (f", peak RSS {rss:.0f} MB" if rss else ""))
    temps = dev.get("temperature_c") or {}
    bits = [dev.get("board") or dev.get("cpu") or "", f"{dev.get('cores')} cores"]
    if dev.get("governor"):
        bits.append(f"governor {dev['governor']}")
    if temps.get("start") is not None:
        bits.append(f"{temps['start']:.1f} -> {temps['end'] if temps.get('end') is None else round(temps['end'], 1)} C")
    lines.append("device     " + ", ".join(b for b in bits if b))
    inp = r.get("input") or {}
    if inp:
        count = f" ({inp['count']} images)" if inp.get("kind") == "images" and inp.get("count") else ""
        lines.append(f"input      {inp.get('kind')}{count}"
                     + (f", seed {inp['seed']}" if inp.get("seed") is not None and inp.get("kind") == "random" else ""))
    for a in inp.get("assumed") or ():
        lines.append(f"assumed    {a}")
    for w in r.get("warnings") or ():
        lines.append(f"warning    {w}")
    for e in r.get("errors") or ():
        lines.append(f"error      {e}")
    return "\n".join(lines)


def format_comparison(reports: List[dict]) -> str:
    """One row per report (threads x delegate), for ``--threads 1,2,4`` style runs."""
    head = f"{'delegate':<10} {'threads':>7} {'p50 ms':>9} {'mean ms':>9} {'p90 ms':>9} {'fps':>8} {'cold ms':>9}"
    rows = [head, "-" * len(head)]
    for r in reports:
        rt, lat = r.get("runtime", {}), r.get("latency_ms") or {}
        ld = r.get("load_ms") or {}
        cold = sum(v for v in ld.values() if isinstance(v, (int, float))) if ld else None
        fps = (r.get("throughput") or {}).get("fps")
        thr = rt.get("threads")
        rows.append(f"{str(rt.get('delegate')):<10} {str(thr if thr is not None else 'dflt'):>7} "
                    f"{_ms(lat.get('p50')):>9} {_ms(lat.get('mean')):>9} {_ms(lat.get('p90')):>9} "
                    f"{(f'{fps:.1f}' if fps else '-'):>8} {_ms(cold):>9}")
    return "\n".join(rows)
