"""HTML sections of results, shared by the live dashboard and the static `report --html` page.

Every function takes report *rows* (pipeline/reporting.py) and returns an HTML
fragment: server-rendered tables and inline SVG charts (pipeline/svg.py).
``link`` turns a row into the URL of its history (the dashboard) or None (the
static page, which has no server behind it).
"""
from __future__ import annotations

from typing import Callable, Iterable, Optional
from urllib.parse import urlencode

from edgepipe.pipeline import svg
from edgepipe.pipeline.pareto import pareto_front
from edgepipe.pipeline.reporting import (LOAD_PARTS, STAGES, fastest, fmt, quantized_slower, short_id, size_mb,
                                         _recipe_order)

Link = Optional[Callable[[dict], Optional[str]]]
esc = svg.esc


def config_label(r: dict, with_model: bool = True) -> str:
    thr = r.get("threads")
    parts = [str(r.get("device"))] + ([str(r.get("family")), str(r.get("recipe"))] if with_model else [])
    parts += [str(r.get("delegate")), f"t{thr if thr is not None else '-'}"]
    if r.get("kind") == "run":
        parts.append(f"run {r['source']}" if r.get("source") else "run")
    return " ".join(parts)


def _a(text: str, url: Optional[str]) -> str:
    return f'<a href="{esc(url)}">{esc(text)}</a>' if url else esc(text)


def table(headers: list, body: list, cls: Optional[list] = None, raw: Iterable[int] = ()) -> str:
    """A table inside its own scroll box (wide tables never widen the page); ``raw`` columns hold HTML."""
    raw = set(raw)
    out = ['<div class="scroll"><table><thead><tr>' + "".join(f"<th>{esc(h)}</th>" for h in headers)
           + "</tr></thead><tbody>"]
    for i, r in enumerate(body):
        cells = []
        for j, v in enumerate(r):
            num = isinstance(v, (int, float)) and not isinstance(v, bool)
            cells.append(f"<td{' class=n' if num else ''}>{v if j in raw else esc(fmt(v))}</td>")
        klass = f' class="{cls[i]}"' if cls and cls[i] else ""
        out.append(f"<tr{klass}>" + "".join(cells) + "</tr>")
    return "\n".join(out) + "</tbody></table></div>"


def summary(rows: list) -> str:
    best, warns = fastest(rows), quantized_slower(rows)
    if not (best or warns):
        return ""
    items = [f"<li>{esc(b)}</li>" for b in best] + [f'<li class="warn">warning: {esc(w)}</li>' for w in warns]
    return '<section id="summary"><h2>Summary</h2><ul>' + "".join(items) + "</ul></section>"


def _columns(sub: list) -> list:
    return sorted({(r["device_key"] or r["device"], r["device"], r["delegate"], r["threads"]) for r in sub},
                  key=lambda c: tuple(str(x) for x in c))


def matrix(rows: list, link: Link = None) -> str:
    """Per model: recipes x (device, delegate, threads) of the latest bench p50, accuracy alongside."""
    bench = [r for r in rows if r.get("kind") == "bench"]
    if not bench:
        return '<section id="matrix"><h2>Latest p50 per device</h2><p class="muted">no bench results yet</p></section>'
    out = ['<section id="matrix"><h2>Latest p50 (ms) per device, model and recipe</h2>']
    for fam in sorted({r["family"] for r in bench}):
        out.append(_matrix_table(fam, [r for r in bench if r["family"] == fam], link))
    out.append('<p class="muted">Green: fastest recipe on that device. Accuracy comes from the newest '
               "evaluation of the same model file.</p></section>")
    return "".join(out)


def _matrix_table(fam: str, sub: list, link: Link) -> str:
    """One model's recipes x (device, delegate, threads) table; the fastest p50 per column marked."""
    cols = _columns(sub)
    cell = {(r["recipe"], (r["device_key"] or r["device"], r["device"], r["delegate"], r["threads"])): r
            for r in sub}
    best = _fastest(cell, cols)
    acc = {r["recipe"]: r for r in sub if r.get("top1") is not None or r.get("agreement") is not None}
    head = "".join(f'<th>{esc(d)}<br><span class="muted">{esc(g)} t{t if t is not None else "-"}</span></th>'
                   for _, d, g, t in cols)
    body = []
    for rc in sorted({r["recipe"] for r in sub}, key=_recipe_order):
        tds = [_matrix_cell(cell.get((rc, c)), best[c], link) for c in cols]
        a = acc.get(rc) or {}
        tds.append(f'<td class="n acc">{esc(fmt(a.get("top1")))}</td><td class="n acc">'
                   f'{esc(fmt(a.get("agreement")))}</td>')
        body.append(f"<tr><th>{esc(rc)}</th>" + "".join(tds) + "</tr>")
    return (f'<h3>{_a(fam, _url(model=fam) if link else None)}</h3><div class="scroll">'
            f'<table class="matrix" data-family="{esc(fam)}"><thead><tr><th>recipe</th>{head}'
            f"<th>top-1</th><th>agreement vs float</th></tr></thead><tbody>" + "".join(body)
            + "</tbody></table></div>")


def _fastest(cell: dict, cols: list) -> dict:
    """Column -> its lowest p50 (None where no recipe has one)."""
    return {c: min((r["p50"] for (rc, cc), r in cell.items() if cc == c and r["p50"] is not None),
                   default=None) for c in cols}


def _matrix_cell(r: Optional[dict], best: Optional[float], link: Link) -> str:
    if r is None or r["p50"] is None:
        return '<td class="n muted">-</td>'
    klass = "n best" if r["p50"] == best else "n"
    tip = f"p90 {fmt(r['p90'])} ms, {r['created']}"
    return (f'<td class="{klass}" data-id="{esc(r["id"])}" data-p50="{r["p50"]}" title="{esc(tip)}">'
            f'{_a(fmt(r["p50"]), link(r) if link else None)}</td>')


def _url(**params) -> str:
    return "/?" + urlencode({k: v for k, v in params.items() if v is not None})


def latency_charts(rows: list) -> str:
    """Invoke-only latency and end-to-end frame latency as two charts, never one axis."""
    colors = {d: svg.PALETTE[i % len(svg.PALETTE)] for i, d in enumerate(sorted({str(r["device"]) for r in rows}))}
    inv = [{"label": config_label(r), "value": r.get("invoke_p50"),
            "hi": r.get("p90") if r.get("kind") == "bench" else (r["stages"].get("invoke") or {}).get("p90"),
            "color": colors[str(r["device"])]} for r in rows if r.get("kind") in ("bench", "run")]
    e2e = [{"label": config_label(r), "value": r.get("p50"), "hi": r.get("p90"), "color": colors[str(r["device"])]}
           for r in rows if r.get("kind") == "run"]
    out = ['<section id="latency"><h2>Invoke latency (model only)</h2>'
           '<p class="muted">p50 bar, p90 whisker; one colour per device; runs show their invoke stage.</p>']
    out.append(svg.hbars(inv, "invoke latency p50") or '<p class="muted">no data</p>')
    out.append('<h2>End-to-end frame latency (runs)</h2><p class="muted">capture to prediction per frame, '
               "a different quantity from invoke latency.</p>")
    out.append(svg.hbars(e2e, "end-to-end frame latency p50") or '<p class="muted">no runs yet</p>')
    return "".join(out) + "</section>"


def stage_breakdown(rows: list) -> str:
    runs = [r for r in rows if r.get("kind") == "run" and r.get("stages")]
    if not runs:
        return ""
    names = list(STAGES) + sorted({s for r in runs for s in r["stages"]} - set(STAGES))
    items = [{"label": config_label(r), "parts": {s: (r["stages"].get(s) or {}).get("mean") for s in names}}
             for r in runs]
    body = [[config_label(r)] + [(r["stages"].get(s) or {}).get("p50") for s in names] + [r.get("p50"), r.get("fps")]
            for r in runs]
    return ('<section id="stages"><h2>Per-stage breakdown of runs</h2>'
            + svg.stacked(items, names, "stage time, ms (mean per frame)")
            + table(["run"] + [f"{s} p50 ms" for s in names] + ["end-to-end p50 ms", "FPS"], body) + "</section>")


def pareto(rows: list) -> str:
    """Latency vs accuracy per model and device; red: the recipes no other beats on both."""
    out = []
    bench = [r for r in rows if r.get("kind") == "bench" and r.get("p50") is not None]
    for fam in sorted({r["family"] for r in bench}):
        for cfg in sorted({config_label(r, False) for r in bench if r["family"] == fam}):
            figure = _pareto_figure(fam, cfg, [r for r in bench if r["family"] == fam
                                               and config_label(r, False) == cfg])
            if figure:
                out.append(figure)
    if not out:
        return ""
    return ('<section id="pareto"><h2>Latency vs accuracy</h2><p class="muted">Red: the Pareto front '
            "(no other recipe is both faster and at least as accurate).</p>" + "".join(out) + "</section>")


def _pareto_figure(fam: str, cfg: str, pts: list) -> Optional[str]:
    """One model on one configuration: p50 vs accuracy, or None with fewer than two accuracies."""
    metric = "agreement" if any(r.get("agreement") is not None for r in pts) else "top1"
    points = [{"label": r["recipe"], "x": r["p50"], "y": r.get(metric)} for r in pts]
    if sum(p["y"] is not None for p in points) < 2:
        return None
    front = pareto_front(points, lambda p: p["x"], lambda p: p["y"])
    chart = svg.scatter(points, front, f"{fam} on {cfg}", "agreement vs float" if metric == "agreement" else "top-1")
    return f'<figure><figcaption>{esc(fam)} on {esc(cfg)}</figcaption>{chart}</figure>'


def results(rows: list, link: Link = None) -> str:
    headers = ["device", "device id", "model", "recipe", "kind", "input", "backend", "delegate", "threads", "load",
               "n", "p50 ms", "p90 ms", "p99 ms", "invoke p50 ms", "FPS", "load ms", "MB", "top-1", "agreement",
               "governor", "created", "warnings"]
    body = [[r["device"], short_id(r.get("device_id")), r["model"], r["recipe"], r["kind"], r.get("source") or "-",
             r["backend"], r["delegate"], r["threads"], r["load"], r["n"],
             _a(fmt(r["p50"]), link(r) if link else None), r["p90"], r["p99"], r.get("invoke_p50"), r["fps"],
             r["load_ms"], size_mb(r["size"]), r.get("top1"), r.get("agreement"), r["governor"], r.get("created"),
             "; ".join(r["warnings"])] for r in rows]
    return '<section id="results"><h2>All configurations</h2>' + table(headers, body, raw=[11]) + "</section>"


def cold_start(rows: list) -> str:
    sub = [r for r in rows if r.get("load") != "warm" and r.get("load_ms") is not None][:40]
    items = [{"label": config_label(r), "parts": {p.replace("_", " "): r["load_parts"].get(p) for p in LOAD_PARTS}}
             for r in sub]
    chart = svg.stacked(items, [p.replace("_", " ") for p in LOAD_PARTS], "cold start, ms (load to first result)")
    return f'<section id="cold"><h2>Cold start: time to the first result</h2>{chart}</section>' if chart else ""


def comparison(entries: list) -> str:
    cls = ["bad" if e["status"] == "regressed" else "good" if e["status"] == "improved" else None for e in entries]
    return ('<section id="comparison"><h2>Comparison with the baseline</h2>'
            + table(["configuration", "recipe", "baseline p50 ms", "p50 ms", "ratio", "status"],
                    [[e["key"], e["recipe"], e["baseline_p50"], e["p50"], e["ratio"], e["status"]] for e in entries],
                    cls) + "</section>")


def history(rows: list, band: Optional[tuple]) -> str:
    """One configuration over time (rows oldest first), with the baseline band when known."""
    import datetime as _dt

    if not rows:
        return '<p class="muted">no reports for this configuration</p>'
    pts = []
    for r in rows:
        try:
            t = _dt.datetime.fromisoformat(str(r["created"]).replace("Z", "+00:00")).timestamp()
        except ValueError:
            continue
        pts.append({"t": t, "p50": r["p50"], "p90": r["p90"], "when": str(r["created"])[:19].replace("T", " ")})
    title = config_label(rows[-1])
    body = [[r.get("created"), r["p50"], r["p90"], r["p99"], r["fps"], r["governor"], "; ".join(r["warnings"])]
            for r in reversed(rows)]
    base = ("" if band is None else f'<p>Baseline p50 {fmt(band[1])} ms; the band is the compare tolerance '
            f"({fmt(band[0])} .. {fmt(band[2])} ms). Red points are beyond it.</p>")
    return (f'<section id="history"><h2>History: {esc(title)}</h2>{base}'
            + svg.history(pts, title, band)
            + table(["created", "p50 ms", "p90 ms", "p99 ms", "FPS", "governor", "warnings"], body) + "</section>")


def nav(rows: list) -> str:
    devices = sorted({(r["device_key"] or r["device"], r["device"], r.get("device_id")) for r in rows},
                     key=lambda d: str(d[1]))
    fams = sorted({r["family"] for r in rows})
    dev = " ".join(f'<a href="{esc(_url(device=k))}">{esc(n)}{" (" + esc(short_id(i)) + ")" if i else ""}</a>'
                   for k, n, i in devices)
    mod = " ".join(f'<a href="{esc(_url(model=f))}">{esc(f)}</a>' for f in fams)
    return (f'<nav><a href="/">overview</a> <span class="muted">devices:</span> {dev or "-"} '
            f'<span class="muted">models:</span> {mod or "-"}</nav>')


def overview(rows: list, link: Link = None) -> str:
    """Everything at a glance: what the dashboard's front page and the static report show."""
    return "".join([summary(rows), matrix(rows, link), latency_charts(rows), stage_breakdown(rows), pareto(rows),
                    results(rows, link), cold_start(rows)])
