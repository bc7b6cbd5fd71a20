"""One self-contained HTML page of results: tables plus plots as embedded PNGs.

Plots: latency per recipe per device (p50 bars, p90 whiskers), latency
distributions (min..max, p50..p90 box, p99 mark: what the reports carry),
and the cold-start breakdown (file read, interpreter build, delegate,
allocate, first invoke). No external files, scripts or fonts.
"""
from __future__ import annotations

import base64
import datetime as _dt
import html
import io
from typing import Optional

from edgepipe.pipeline.reporting import LOAD_PARTS, RECIPE_ORDER, fastest, fmt, quantized_slower, size_mb

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2em;color:#222;max-width:1200px}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:.85em;margin:.5em 0}
th,td{border:1px solid #ddd;padding:.25em .5em;text-align:left}td.n{text-align:right;font-variant-numeric:tabular-nums}
th{background:#f4f4f4}.warn{color:#a15c00}.bad{color:#b00020;font-weight:bold}.good{color:#1b7f3b}
img{max-width:100%;border:1px solid #eee;margin:.5em 0}.muted{color:#777;font-size:.85em}
"""


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _config(r: dict) -> str:
    thr = r.get("threads")
    return f"{r['device']} {r['delegate']} t{thr if thr is not None else '-'}"


def _recipe_key(r: str):
    return (RECIPE_ORDER.index(r) if r in RECIPE_ORDER else len(RECIPE_ORDER), r)


def plot_latency_per_recipe(rows: list) -> Optional[str]:
    import matplotlib.pyplot as plt
    import numpy as np

    bench = [r for r in rows if r.get("kind") == "bench" and r.get("p50") is not None]
    fams = sorted({r["family"] for r in bench})
    if not fams:
        return None
    fig, axes = plt.subplots(len(fams), 1, figsize=(10, 3.6 * len(fams)), squeeze=False)
    for ax, fam in zip(axes[:, 0], fams):
        sub = [r for r in bench if r["family"] == fam]
        recipes = sorted({r["recipe"] for r in sub}, key=_recipe_key)
        configs = sorted({_config(r) for r in sub})
        width = 0.8 / max(1, len(configs))
        x = np.arange(len(recipes))
        for j, cfg in enumerate(configs):
            by = {r["recipe"]: r for r in sub if _config(r) == cfg}
            p50 = [by[rc]["p50"] if rc in by else np.nan for rc in recipes]
            up = [(by[rc]["p90"] or by[rc]["p50"]) - by[rc]["p50"] if rc in by else 0 for rc in recipes]
            ax.bar(x + (j - (len(configs) - 1) / 2) * width, p50, width, yerr=[[0] * len(up), up],
                   capsize=3, label=cfg)
        ax.set_xticks(x, recipes)
        ax.set_ylabel("latency ms (p50, whisker p90)")
        ax.set_title(f"{fam}: latency per recipe per device")
        ax.grid(axis="y", alpha=.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return _png(fig)


def plot_distributions(rows: list) -> Optional[str]:
    import matplotlib.pyplot as plt

    sub = [r for r in rows if r.get("p50") is not None and r.get("min") is not None][:60]
    if not sub:
        return None
    fig, ax = plt.subplots(figsize=(10, 0.35 * len(sub) + 1.2))
    labels = []
    for i, r in enumerate(sub):
        lo, hi = r["min"], r["max"] if r.get("max") is not None else r["p99"]
        ax.plot([lo, hi], [i, i], color="#999", lw=1)
        p90 = r["p90"] if r.get("p90") is not None else r["p50"]
        ax.barh(i, p90 - r["p50"], left=r["p50"], height=.5, color="#4c78a8", alpha=.6)
        ax.plot([r["p50"]], [i], "|", color="#1f3b5a", ms=12, mew=2)
        if r.get("p99") is not None:
            ax.plot([r["p99"]], [i], "x", color="#d62728")
        labels.append(f"{r['device']} {r['model']} {r['delegate']} t{r['threads'] or '-'} {r['kind']}")
    ax.set_yticks(range(len(sub)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("latency ms (log): line min..max, box p50..p90, | p50, x p99")
    ax.set_title("latency distributions")
    ax.grid(axis="x", alpha=.3)
    fig.tight_layout()
    return _png(fig)


def plot_cold_start(rows: list) -> Optional[str]:
    import matplotlib.pyplot as plt

    sub = [r for r in rows if r.get("load") != "warm" and r.get("load_ms") is not None][:60]
    if not sub:
        return None
    fig, ax = plt.subplots(figsize=(10, 0.35 * len(sub) + 1.2))
    left = [0.0] * len(sub)
    for part in LOAD_PARTS:
        vals = [r["load_parts"].get(part) or 0.0 for r in sub]
        ax.barh(range(len(sub)), vals, left=left, height=.6, label=part.replace("_", " "))
        left = [a + b for a, b in zip(left, vals)]
    ax.set_yticks(range(len(sub)), [f"{r['device']} {r['model']} {r['delegate']} t{r['threads'] or '-'}"
                                    for r in sub], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("ms")
    ax.set_title("cold start: where the time to first result goes")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(axis="x", alpha=.3)
    fig.tight_layout()
    return _png(fig)


def _table(headers: list, rows: list, cls=None) -> str:
    out = ["<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in headers) + "</tr>"]
    for i, r in enumerate(rows):
        cells = []
        for v in r:
            num = isinstance(v, (int, float)) and not isinstance(v, bool)
            cells.append(f"<td{' class=n' if num else ''}>{html.escape(fmt(v))}</td>")
        klass = f" class={cls[i]}" if cls and cls[i] else ""
        out.append(f"<tr{klass}>" + "".join(cells) + "</tr>")
    return "\n".join(out) + "</table>"


def render_html(rows: list, *, comparison: Optional[list] = None, source: str = "") -> str:
    """The whole page as a string."""
    import matplotlib

    matplotlib.use("Agg")
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    parts = [f"<!doctype html><html><head><meta charset=utf-8><title>edgepipe results</title>"
             f"<style>{CSS}</style></head><body>",
             "<h1>edgepipe results</h1>",
             f"<p class=muted>{len(rows)} configurations from {html.escape(source)}, generated {now}</p>"]
    warns = quantized_slower(rows)
    best = fastest(rows)
    if best or warns:
        parts.append("<h2>Summary</h2><ul>")
        parts += [f"<li>{html.escape(b)}</li>" for b in best]
        parts += [f"<li class=warn>warning: {html.escape(w)}</li>" for w in warns]
        parts.append("</ul>")
    if comparison is not None:
        parts.append("<h2>Comparison with the baseline</h2>")
        cls = ["bad" if e["status"] == "regressed" else "good" if e["status"] == "improved" else None
               for e in comparison]
        parts.append(_table(["configuration", "recipe", "baseline p50 ms", "p50 ms", "ratio", "status"],
                            [[e["key"], e["recipe"], e["baseline_p50"], e["p50"], e["ratio"], e["status"]]
                             for e in comparison], cls))
    parts.append("<h2>Results</h2>")
    parts.append(_table(
        ["device", "model", "recipe", "kind", "backend", "delegate", "threads", "load", "n", "p50 ms", "p90 ms",
         "p99 ms", "FPS", "load ms", "MB", "top-1", "agreement", "governor", "warnings"],
        [[r["device"], r["model"], r["recipe"], r["kind"], r["backend"], r["delegate"], r["threads"], r["load"],
          r["n"], r["p50"], r["p90"], r["p99"], r["fps"], r["load_ms"], size_mb(r["size"]), r.get("top1"),
          r.get("agreement"), r["governor"], "; ".join(r["warnings"])] for r in rows]))
    for title, fn in (("Latency per recipe per device", plot_latency_per_recipe),
                      ("Latency distributions", plot_distributions),
                      ("Cold-start breakdown", plot_cold_start)):
        img = fn(rows)
        parts.append(f"<h2>{title}</h2>")
        parts.append(f"<img alt='{html.escape(title)}' src='{img}'>" if img else "<p class=muted>no data</p>")
    parts.append("</body></html>")
    return "\n".join(parts)
