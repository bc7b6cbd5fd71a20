"""Pareto fronts: the points no other point beats on both axes.

Used by `edgepipe ablate` to show which variants are worth considering:
higher accuracy is better, lower latency (or size) is better.
"""
from __future__ import annotations

import re
from typing import Callable, Sequence


def pareto_front(points: Sequence, cost: Callable, benefit: Callable) -> list:
    """Indices of the points on the front, sorted by increasing cost.

    A point is dominated when another has cost <= and benefit >= with at least
    one strict. Points whose cost or benefit is None are never on the front.
    Exact duplicates are all kept (neither dominates the other).
    """
    valid = [(i, float(cost(p)), float(benefit(p))) for i, p in enumerate(points)
             if cost(p) is not None and benefit(p) is not None]
    # Sort by cost ascending, then benefit descending: a sweep keeps a point
    # when its benefit beats the best seen at any lower cost.
    valid.sort(key=lambda t: (t[1], -t[2], t[0]))
    front, best, best_cost = [], float("-inf"), None
    for i, c, b in valid:
        if b > best:
            front.append(i)
            best, best_cost = b, c
        elif b == best and c == best_cost:
            front.append(i)  # exact duplicate of the last front point
    return front


# ------------------------------------------------------------------ outputs of a study

def _num(x, fmt):
    return "-" if x is None else format(x, fmt)


def table_rows(results: Sequence[dict], quality: str) -> tuple:
    """(headers, rows) for a study's results in grid order; the last column marks the fronts."""
    ok = [r for r in results if not r.get("error")]
    front_lat = {id(ok[i]) for i in pareto_front(ok, lambda r: r.get("p50_ms"), lambda r: r.get(quality))}
    front_size = {id(ok[i]) for i in pareto_front(ok, lambda r: r.get("size"), lambda r: r.get(quality))}
    headers = ["variant", "size KiB", "p50 ms", "top1", "top5", "agreement", "SNR dB", "Pareto"]
    rows = []
    for r in results:
        if r.get("error"):
            rows.append([r.get("label", "?"), "-", "-", "-", "-", "-", "-", "error: " + r["error"][:80]])
            continue
        marks = ("latency " if id(r) in front_lat else "") + ("size" if id(r) in front_size else "")
        rows.append([r["label"], _num(r.get("size", 0) / 1024, ".1f"), _num(r.get("p50_ms"), ".3f"),
                     _num(r.get("top1"), ".4f"), _num(r.get("top5"), ".4f"),
                     _num(r.get("agreement"), ".4f"),
                     "inf" if r.get("snr_db") is None else _num(r.get("snr_db"), ".1f"),
                     marks.strip()])
    return headers, rows


def markdown_table(headers, rows) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def plot_png(results: Sequence[dict], quality: str, path, title: str) -> None:
    """Two panels: quality vs p50 latency and vs size, fronts drawn as steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if not r.get("error") and r.get(quality) is not None]
    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    for ax, key, xlabel in ((axes[0], "p50_ms", "p50 latency (ms)"), (axes[1], "size", "model size (KiB)")):
        pts = [r for r in ok if r.get(key) is not None]
        if key == "size":
            pts = _one_per_bundle(pts)
        _panel(ax, pts, key, quality, xlabel, 1024.0 if key == "size" else 1.0)
    fig.suptitle(f"{title}: {quality} vs latency and size (red = Pareto front)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _one_per_bundle(pts: list) -> list:
    """Size and accuracy belong to the bundle: one dot per bundle, not per thread count."""
    seen, uniq = set(), []
    for r in pts:
        k = r.get("bundle") or r["label"]
        if k not in seen:
            seen.add(k)
            uniq.append(dict(r, label=re.sub(r" t\d+$", "", r["label"])))
    return uniq


def _panel(ax, pts: list, key: str, quality: str, xlabel: str, scale: float) -> None:
    """``quality`` against ``key`` (divided by ``scale``), the Pareto front as red steps with labels."""
    xs = [r[key] / scale for r in pts]
    ys = [r[quality] for r in pts]
    ax.scatter(xs, ys, color="#8899aa", s=28, zorder=2)
    front = pareto_front(pts, lambda r: r[key], lambda r: r[quality])
    fx = [pts[i][key] / scale for i in front]
    fy = [pts[i][quality] for i in front]
    ax.step(fx, fy, where="post", color="#d62728", zorder=3)
    ax.scatter(fx, fy, color="#d62728", s=40, zorder=4)
    for i in front:
        ax.annotate(pts[i]["label"], (pts[i][key] / scale, pts[i][quality]), fontsize=7,
                    xytext=(4, -10), textcoords="offset points")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(quality)
    ax.grid(alpha=0.3)


def html_page(title: str, headers, rows, png_name: str, quality: str, commands: str = "") -> str:
    import html

    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join(
        "<tr" + (' class="front"' if row[-1] and not str(row[-1]).startswith("error") else "") + ">"
        + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}td:first-child{{text-align:left}}
tr.front{{background:#fde8e8}}</style></head><body>
<h1>{html.escape(title)}</h1>
<p>Quality metric: <b>{html.escape(quality)}</b>. Highlighted rows are on a Pareto front
(no other variant is both faster/smaller and at least as accurate).</p>
<img src="{html.escape(png_name)}" alt="Pareto plot" style="max-width:100%">
<table><tr>{head}</tr>{body}</table>
<pre>{html.escape(commands)}</pre></body></html>
"""
