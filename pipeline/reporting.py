"""Report sets as tables: rows, latest-per-configuration, comparisons, complaints.

A *row* is the flat view of one report that tables, the JSON output, the
baseline file and the HTML page all share. A saved report set (``edgepipe
report --save`` or ``--json``) is ``{"schema": "edgepipe.reportset/1", "rows":
[...]}`` and is what ``--compare`` reads back.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Iterable, Optional

from edgepipe.device.report import Report
from edgepipe.pipeline import detection_view
from edgepipe.pipeline.store_schema import source_label

REPORTSET = "edgepipe.reportset/1"
LOAD_PARTS = ("file_read", "interpreter_build", "delegate", "allocate", "first_invoke")
# A quantized recipe within this margin of fp32 is "as fast", not slower:
# fp16 weights, for one, run through the same float kernels.
SLOWER_MARGIN = 0.05
# The configuration a p50 belongs to; compare and "latest" use it. ``device_key`` is the
# stable device id (the hostname for reports made before ids existed); ``source`` is what
# a run read (None for a bench on random inputs), so a video run and a photo run differ.
# ``mode`` is "throughput" for a throughput-mode bench (None otherwise, so older rows and baselines still match).
KEY = ("device_key", "model", "recipe", "backend", "delegate", "threads", "kind", "source", "mode")
STAGES = ("capture", "preprocess", "invoke", "postprocess")


def _num(x) -> Optional[float]:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else None


def family(name: str, recipe: Optional[str]) -> str:
    """``mobilenet_v2-int8`` -> ``mobilenet_v2``: the model the recipes were made from."""
    if recipe and name.endswith("-" + recipe):
        return name[: -len(recipe) - 1]
    return name


def row(report) -> dict:
    """The flat view of one report (a dict already checked against the schema, or a typed Report)."""
    r = report if isinstance(report, Report) else Report.from_dict(report, validate=False)
    dev, rt, model, lat, load = r.device, r.runtime, r.model, r.latency_ms, r.load_ms
    acc = r.accuracy or {}
    parts = {k: _num(getattr(load, k, None)) for k in LOAD_PARTS}
    known = [v for v in parts.values() if v is not None]
    agreement = acc.get("agreement")
    stages = _stages(r.stages_ms)
    lat_p50 = _num(getattr(lat, "p50", None))
    return {
        "id": r.id,
        "created": r.created,
        "kind": r.kind.value,
        "device": dev.name or dev.hostname,
        "device_id": dev.id,
        "device_key": dev.id or dev.hostname,
        "hostname": dev.hostname,
        "source": source_label({"input": r.input}),
        "stages": stages,
        # invoke-only latency: a bench's own p50, a run's invoke stage (its p50 is end to end)
        "invoke_p50": (stages.get("invoke") or {}).get("p50") if r.kind.value == "run" else lat_p50,
        "board": dev.board,
        "model": model.name,
        "family": family(model.name, model.recipe),
        "recipe": model.recipe or "-",
        "backend": rt.backend,
        "delegate": rt.delegate,
        "threads": rt.threads,
        "load": rt.load,
        "n": lat.n if lat else None,
        **{k: _num(getattr(lat, k, None)) for k in ("mean", "p50", "p90", "p99", "min", "max")},
        "fps": _num(getattr(r.throughput, "fps", None)),
        **_throughput_mode(r),
        "load_ms": round(sum(known), 3) if known else None,
        "load_parts": parts,
        "size": model.size,
        "sha256": model.sha256,
        "top1": _num(acc.get("top1")),
        "agreement": _num(agreement.get("top1_agreement") if isinstance(agreement, dict) else None),
        "governor": dev.governor,
        "warnings": list(r.warnings),
        "errors": list(r.errors),
        **detection_view.row_fields(r),  # detection accuracy (eval) and decoded-output summary (run)
    }


def _throughput_mode(r) -> dict:
    """``mode``/``streams`` of a throughput-mode bench and the ``sweep`` summary of a --threads auto bench."""
    tp = r.throughput
    throughput = getattr(tp, "mode", None) == "throughput"
    sweep = (r.settings or {}).get("thread_sweep")
    return {"mode": "throughput" if throughput else None,
            "streams": (getattr(tp, "extra", None) or {}).get("streams") if throughput else None,
            "sweep": sweep if isinstance(sweep, dict) else None}


def _stages(block) -> dict:
    """Per-stage {p50, mean, p90} of a run (capture, preprocess, invoke, postprocess, ...)."""
    if not isinstance(block, dict):
        return {}
    out = {}
    for name, st in block.items():
        if st is not None:
            get = st.get if isinstance(st, dict) else lambda k, st=st: getattr(st, k, None)
            out[str(name)] = {k: _num(get(k)) for k in ("p50", "mean", "p90")}
    return out


def attach_accuracy(rows: list) -> list:
    """Give timing rows the accuracy of the same model file from its newest eval report.

    Latency and accuracy then sit side by side, so a fast recipe that lost
    accuracy is visible in one table.
    """
    evals: dict = {}
    for r in rows:
        if r.get("kind") == "eval" and r.get("sha256"):
            evals[r["sha256"]] = r
    for r in rows:
        e = evals.get(r.get("sha256"))
        if r.get("kind") != "eval" and e is not None:
            r.setdefault("top1", None)
            r["top1"] = r["top1"] if r["top1"] is not None else e.get("top1")
            r["agreement"] = r.get("agreement") if r.get("agreement") is not None else e.get("agreement")
    return rows


def key_of(r: dict, legacy: bool = False) -> tuple:
    """The configuration of a row; ``legacy`` keys devices by hostname (rows saved before device ids)."""
    dev = (r.get("hostname") or r.get("device")) if legacy else (r.get("device_key") or r.get("device"))
    return (dev,) + tuple(r.get(k) for k in KEY[1:])


def key_str(r: dict) -> str:
    thr = r.get("threads")
    src = f" {r['source']}" if r.get("source") else ""
    mode = f" throughput x{r.get('streams') or '?'}" if r.get("mode") else ""
    return (f"{r.get('device')} {r.get('model')} {r.get('backend')}/{r.get('delegate')}"
            f" t={thr if thr is not None else 'auto'} {r.get('kind')}{mode}{src}")


def latest(rows: Iterable[dict]) -> list:
    """Keep the newest row per configuration (rows come oldest first)."""
    best: dict = {}
    for r in rows:
        best[key_of(r)] = r
    return sort_rows(best.values())


def sort_rows(rows: Iterable[dict]) -> list:
    return sorted(rows, key=lambda r: (str(r.get("family")), str(r.get("device")), str(r.get("kind")),
                                       str(r.get("backend")), str(r.get("delegate")),
                                       r.get("threads") or 0, str(r.get("recipe")), str(r.get("created"))))


def quantized_slower(rows: Iterable[dict], margin: float = SLOWER_MARGIN) -> list:
    """DESIGN.md complaint #1: warn when a quantized variant is slower than fp32 on a device."""
    groups: dict = {}
    for r in rows:
        if r.get("p50") is None:
            continue
        g = (r["device"], r["family"], r["backend"], r["delegate"], r["threads"], r["kind"], r.get("mode"))
        groups.setdefault(g, {})[r["recipe"]] = r
    out = []
    for (dev, fam, _b, dlg, thr, _k, _m), recipes in sorted(groups.items(), key=lambda kv: str(kv[0])):
        base = recipes.get("fp32")
        if base is None:
            continue
        for recipe, r in sorted(recipes.items()):
            if recipe in ("fp32", "-") or r["p50"] <= base["p50"] * (1 + margin):
                continue
            out.append(f"{dev}: {fam} {recipe} is slower than fp32 ({r['p50']:.2f} vs {base['p50']:.2f} ms "
                       f"p50, x{r['p50'] / base['p50']:.2f}, delegate {dlg}, threads "
                       f"{thr if thr is not None else 'auto'}); fp32 is the faster choice there")
    return out


def fastest(rows: Iterable[dict]) -> list:
    """Per device and model: the recipe with the lowest p50 (what to deploy there)."""
    best: dict = {}
    for r in rows:
        if r.get("p50") is None or r.get("kind") != "bench" or r.get("mode"):
            continue  # a throughput-mode p50 is per request under contention, not the single-request latency
        g = (r["device"], r["family"])
        if g not in best or r["p50"] < best[g]["p50"]:
            best[g] = r
    return [f"{d}: fastest {fam} is {r['recipe']} ({r['delegate']}, t={r['threads'] or 'auto'}) "
            f"at {fmt(r['p50'])} ms p50" for (d, fam), r in sorted(best.items(), key=lambda kv: str(kv[0]))]


def thread_advice(rows: Iterable[dict]) -> list:
    """Per device and model: what the newest ``--threads auto`` sweep found fastest there."""
    newest: dict = {}
    for r in rows:
        if r.get("sweep"):
            newest[(r["device"], r["model"])] = r  # rows come oldest first
    out = []
    for (dev, model), r in sorted(newest.items(), key=lambda kv: str(kv[0])):
        bl, bt = r["sweep"].get("best_latency") or {}, r["sweep"].get("best_throughput") or {}
        text = f"{dev}: {model} threads (tried {', '.join(map(str, r['sweep'].get('tried') or []))})"
        if bl.get("threads"):
            text += f": fastest request with {bl['threads']} ({fmt(bl.get('p50_ms'))} ms p50)"
        if bt.get("threads"):
            text += (f"; most inferences/s with {bt.get('streams') or 1} stream(s) x {bt['threads']} thread(s) "
                     f"({fmt(bt.get('fps'), 1)}/s)")
        out.append(text)
    return out


# -- comparison against a saved set ------------------------------------------

def compare(current: Iterable[dict], baseline: Iterable[dict], tolerance: float) -> list:
    """Match rows by configuration and judge each p50 against the baseline.

    status: ``regressed`` (p50 above baseline x (1 + tolerance)), ``improved``
    (below baseline / (1 + tolerance)), ``same``, ``new`` or ``missing``.
    """
    baseline = list(baseline)
    # A baseline saved before device ids existed names devices by hostname: match it that way.
    legacy = bool(baseline) and all("device_key" not in b for b in baseline)
    cur = {key_of(r, legacy): r for r in current}
    base = {key_of(r, legacy): r for r in baseline}
    out = []
    for k in sorted(set(cur) | set(base), key=str):
        c, b = cur.get(k), base.get(k)
        ref = c or b
        entry = {"key": key_str(ref), "device": ref.get("device"), "model": ref.get("model"),
                 "recipe": ref.get("recipe"), "delegate": ref.get("delegate"), "threads": ref.get("threads"),
                 "baseline_p50": b.get("p50") if b else None, "p50": c.get("p50") if c else None,
                 "ratio": None}
        if c is None:
            entry["status"] = "missing"
        elif b is None or b.get("p50") is None or c.get("p50") is None:
            entry["status"] = "new"
        else:
            ratio = c["p50"] / b["p50"] if b["p50"] > 0 else math.inf
            entry["ratio"] = round(ratio, 4)
            entry["status"] = ("regressed" if ratio > 1 + tolerance else
                               "improved" if ratio < 1 / (1 + tolerance) else "same")
        out.append(entry)
    return out


def to_reportset(rows: list, reports: Optional[list] = None) -> dict:
    d = {"schema": REPORTSET, "rows": rows, "warnings": quantized_slower(rows), "fastest": fastest(rows),
         "threads": thread_advice(rows)}
    if reports is not None:
        d["reports"] = reports
    return d


def load_baseline(path: Path) -> list:
    """Rows of a baseline: a saved report set, a JSON list of reports, or a results DB."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{path}: no such baseline file")
    if path.suffix in (".db", ".sqlite", ".sqlite3"):
        from edgepipe.pipeline.store import Store, StoreError
        try:
            with Store(path, readonly=True) as s:
                return latest(row(r) for r in s.query())
        except StoreError as e:
            raise ValueError(str(e)) from None
    try:
        doc = json.loads(path.read_text("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a readable JSON report set ({e})") from None
    if isinstance(doc, dict) and doc.get("schema") == REPORTSET and isinstance(doc.get("rows"), list):
        return doc["rows"]
    if isinstance(doc, dict) and doc.get("schema") == "edgepipe.report/1":
        doc = [doc]
    if isinstance(doc, list) and all(isinstance(r, dict) and r.get("schema") == "edgepipe.report/1" for r in doc):
        return latest(row(Report.from_dict(r)) for r in doc)  # a file: checked, ContractError is a ValueError
    raise ValueError(f"{path}: expected a report set from `edgepipe report --save/--json` "
                     "or a JSON list of reports")


# -- text tables ---------------------------------------------------------------

def fmt(x, digits: int = 2) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        if abs(x) >= 1000:
            return f"{x:.0f}"
        return f"{x:.{digits if abs(x) >= 1 or x == 0 else digits + 1}f}"
    return str(x)


def format_table(headers: list, rows: list) -> str:
    """A plain aligned text table (numbers right-aligned)."""
    cells = [[fmt(c) for c in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    numeric = [all(isinstance(r[i], (int, float)) or r[i] is None for r in rows) for i in range(len(headers))]

    def line(vals):
        return "  ".join(v.rjust(w) if num else v.ljust(w)
                         for v, w, num in zip(vals, widths, numeric)).rstrip()
    out = [line(headers), line(["-" * w for w in widths])]
    out += [line(r) for r in cells]
    return "\n".join(out)


def size_mb(n) -> Optional[float]:
    return round(n / 1e6, 2) if isinstance(n, int) else None


def short_id(device_id) -> str:
    """The first 8 characters of a device id (enough to tell devices apart in a table)."""
    return str(device_id)[:8] if device_id else "-"


def short_warnings(ws: list, width: int = 48) -> str:
    if not ws:
        return ""
    first = ws[0] if len(ws[0]) <= width else ws[0][: width - 3] + "..."
    return first + (f" (+{len(ws) - 1})" if len(ws) > 1 else "")


def _kind(r: dict) -> str:
    return f"{r['kind']} tput x{r.get('streams') or '?'}" if r.get("mode") == "throughput" else r["kind"]


def results_table(rows: list) -> str:
    """Device x recipe table: p50, p90, p99, FPS, load ms, size, warnings (+ accuracy when known)."""
    timing = [r for r in rows if r.get("kind") != "eval"]
    with_acc = any(r.get("top1") is not None or r.get("agreement") is not None for r in timing)
    with_id = any(r.get("device_id") for r in timing)
    with_src = any(r.get("source") for r in timing)
    headers = (["device"] + (["device id"] if with_id else []) + ["model", "recipe", "kind"]
               + (["input"] if with_src else []) + ["delegate", "thr", "p50 ms", "p90 ms", "p99 ms", "FPS",
                                                    "load ms", "MB"]
               + (["top-1", "agree"] if with_acc else []) + ["warnings"])
    body = [[r["device"]] + ([short_id(r.get("device_id"))] if with_id else [])
            + [r["family"], r["recipe"], _kind(r)] + ([r.get("source") or "-"] if with_src else [])
            + [r["delegate"], r["threads"], r["p50"], r["p90"],
               r["p99"], r["fps"], (r["load_ms"] if r.get("load") != "warm" else "warm"), size_mb(r["size"])]
            + ([r.get("top1"), r.get("agreement")] if with_acc else []) + [short_warnings(r["warnings"])]
            for r in timing]
    out = format_table(headers, body) if timing else ""
    runs = [r for r in timing if r.get("kind") == "run" and r.get("stages")]
    if runs:  # where a run's frame time goes; invoke here is what a bench measures
        table = format_table(["run", "input"] + [f"{s} p50" for s in STAGES] + ["end-to-end p50", "FPS"],
                             [[f"{r['device']} {r['family']} {r['recipe']}", r.get("source") or "-"]
                              + [(r["stages"].get(s) or {}).get("p50") for s in STAGES] + [r["p50"], r["fps"]]
                              for r in runs])
        out = (out + "\n\n" if out else "") + table
    evals = [r for r in rows if r.get("kind") == "eval"]
    if evals:
        # "evaluated on": this workstation, or the board of `edgepipe evaluate --device` (with its delegate)
        table = format_table(["evaluated on", "model", "recipe", "top-1", "agreement vs float", "delegate", "MB",
                              "warnings"],
                             [[r["device"], r["family"], r["recipe"], r.get("top1"), r.get("agreement"), r["delegate"],
                               size_mb(r["size"]), short_warnings(r["warnings"])] for r in evals])
        out = (out + "\n\n" if out else "") + table
    return out


def comparison_table(entries: list) -> str:
    headers = ["configuration", "recipe", "base p50", "p50", "ratio", "status"]
    body = [[e["key"], e["recipe"], e["baseline_p50"], e["p50"], e["ratio"], e["status"].upper()
             if e["status"] == "regressed" else e["status"]] for e in entries]
    return format_table(headers, body)


def pivot_table(rows: list) -> str:
    """p50 (ms) of every recipe on every device, per model: the at-a-glance view."""
    blocks = []
    fams = sorted({r["family"] for r in rows if r.get("kind") == "bench"})
    for fam in fams:
        sub = [r for r in rows if r["family"] == fam and r.get("kind") == "bench"]
        recipes = sorted({r["recipe"] for r in sub}, key=_recipe_order)
        cols = sorted({(r["device"], r["delegate"], r["threads"]) for r in sub}, key=str)
        cell = {(r["recipe"], (r["device"], r["delegate"], r["threads"])): r["p50"] for r in sub}
        headers = [f"{fam} p50 ms"] + [f"{d} {g} t{t if t is not None else '-'}" for d, g, t in cols]
        body = [[rc] + [cell.get((rc, c)) for c in cols] for rc in recipes]
        blocks.append(format_table(headers, body))
    return "\n\n".join(blocks)


RECIPE_ORDER = ("fp32", "fp16", "dynamic", "int8", "int8-io", "int16x8")


def _recipe_order(r: str):
    return (RECIPE_ORDER.index(r) if r in RECIPE_ORDER else len(RECIPE_ORDER), r)
