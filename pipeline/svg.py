"""Inline SVG charts for the dashboard and the static HTML report: no scripts, no fonts, no files.

Latency axes switch to a log scale when the values span more than 10x, so a
166 ms recipe does not squash the 2 ms ones to a few pixels; the axis title
says which scale it is.
"""
from __future__ import annotations

import html
import math
from dataclasses import dataclass
from typing import Optional, Sequence

PALETTE = ("#4c78a8", "#f58518", "#54a24b", "#e45756", "#72b7b2", "#b279a2", "#eeca3b", "#9d755d")
LOG_SPAN = 10.0  # max/min above this -> log axis
_FONT = 'font-family="system-ui,sans-serif" font-size="11"'


def esc(s) -> str:
    return html.escape(str(s), quote=True)


def fmt_ms(x: float) -> str:
    if x >= 100:
        return f"{x:.0f}"
    if x >= 10:
        return f"{x:.1f}"
    return f"{x:.2f}" if x >= 0.1 else f"{x:.3f}"


@dataclass(frozen=True)
class Scale:
    """Maps data values to pixels on [px0, px1], linear or log10."""

    lo: float
    hi: float
    px0: float
    px1: float
    log: bool

    @classmethod
    def for_values(cls, values: Sequence[float], px0: float, px1: float, *, allow_log: bool = True,
                   zero: bool = True) -> "Scale":
        vals = [v for v in values if v is not None and math.isfinite(v)]
        pos = [v for v in vals if v > 0]
        if not vals:
            return cls(0.0, 1.0, px0, px1, False)
        lo, hi = min(vals), max(vals)
        if allow_log and pos and len(pos) == len(vals) and hi / min(pos) > LOG_SPAN:
            return cls(10 ** math.floor(math.log10(min(pos))), 10 ** math.ceil(math.log10(hi)), px0, px1, True)
        if zero:
            lo = min(0.0, lo)
        if hi == lo:
            hi = lo + (abs(lo) or 1.0)
        step = nice_step((hi - lo) / 5)
        return cls(math.floor(lo / step) * step, math.ceil(hi / step) * step, px0, px1, False)

    def __call__(self, v: float) -> float:
        if self.log:
            v = max(v, self.lo)
            t = (math.log10(v) - math.log10(self.lo)) / (math.log10(self.hi) - math.log10(self.lo))
        else:
            t = (v - self.lo) / ((self.hi - self.lo) or 1.0)
        return self.px0 + t * (self.px1 - self.px0)

    def ticks(self) -> list:
        if self.log:
            out, d = [], self.lo
            while d <= self.hi * 1.0001:
                out += [d * m for m in (1, 2, 5) if d * m <= self.hi * 1.0001]
                d *= 10
            return out
        step = nice_step((self.hi - self.lo) / 5)
        n = int(round((self.hi - self.lo) / step))
        return [self.lo + i * step for i in range(n + 1)]


def nice_step(raw: float) -> float:
    if raw <= 0:
        return 1.0
    mag = 10 ** math.floor(math.log10(raw))
    for m in (1, 2, 2.5, 5, 10):
        if raw <= m * mag:
            return m * mag
    return 10 * mag


def _svg(width: int, height: int, body: list, title: str) -> str:
    return (f'<svg class="chart" viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
            f'role="img" aria-label="{esc(title)}" xmlns="http://www.w3.org/2000/svg" {_FONT}>'
            f"<title>{esc(title)}</title>" + "".join(body) + "</svg>")


def _x_axis(sc: Scale, y0: float, y1: float, label: str) -> list:
    out = []
    for t in sc.ticks():
        x = sc(t)
        out.append(f'<line x1="{x:.1f}" y1="{y0}" x2="{x:.1f}" y2="{y1}" stroke="#e5e5e5"/>')
        out.append(f'<text x="{x:.1f}" y="{y1 + 13}" text-anchor="middle" fill="#555">{fmt_ms(t)}</text>')
    mid = (sc.px0 + sc.px1) / 2
    out.append(f'<text x="{mid:.1f}" y="{y1 + 28}" text-anchor="middle" fill="#333">'
               f'{esc(label)}{" (log scale)" if sc.log else ""}</text>')
    return out


def _left(labels) -> int:
    """Room for the longest label (about 6 px a character), within reason."""
    return int(min(380, max(80, 6.2 * max((len(str(x)) for x in labels), default=10) + 12)))


def _legend(parts: Sequence[str], x0: float) -> list:
    out, x = [], x0
    for k, p in enumerate(parts):
        out.append(f'<rect x="{x:.0f}" y="4" width="10" height="10" fill="{PALETTE[k % len(PALETTE)]}"/>'
                   f'<text x="{x + 14:.0f}" y="13" fill="#333">{esc(p)}</text>')
        x += 26 + 6.2 * len(str(p))
    return out


def hbars(items: Sequence[dict], title: str, unit: str = "ms", width: int = 900) -> str:
    """Horizontal bars: ``{"label", "value", "hi" (whisker, optional), "color" (optional)}``."""
    items = [i for i in items if i.get("value") is not None]
    if not items:
        return ""
    left, right, row_h, top = _left(i["label"] for i in items), 40, 20, 8
    height = top + row_h * len(items) + 40
    sc = Scale.for_values([i["value"] for i in items] + [i.get("hi") for i in items if i.get("hi")],
                          left, width - right)
    base = sc(sc.lo)
    body = _x_axis(sc, top, top + row_h * len(items), f"{title}, {unit}")
    for n, it in enumerate(items):
        y = top + n * row_h
        x = sc(it["value"])
        color = it.get("color") or PALETTE[0]
        body.append(f'<text x="{left - 6}" y="{y + 14}" text-anchor="end" fill="#222">{esc(it["label"])}</text>')
        body.append(f'<rect x="{base:.1f}" y="{y + 4}" width="{max(1.0, x - base):.1f}" height="{row_h - 8}" '
                    f'fill="{color}"><title>{esc(it["label"])}: {fmt_ms(it["value"])} {unit}</title></rect>')
        if it.get("hi") and it["hi"] > it["value"]:
            xh = sc(it["hi"])
            body.append(f'<line x1="{x:.1f}" y1="{y + row_h / 2}" x2="{xh:.1f}" y2="{y + row_h / 2}" '
                        f'stroke="#333"/><line x1="{xh:.1f}" y1="{y + 6}" x2="{xh:.1f}" y2="{y + row_h - 6}" '
                        f'stroke="#333"/>')
        body.append(f'<text x="{x + 4:.1f}" y="{y + 14}" fill="#111" class="v">{fmt_ms(it["value"])}</text>')
    return _svg(width, height, body, title)


def stacked(items: Sequence[dict], parts: Sequence[str], axis: str, width: int = 900) -> str:
    """Horizontal stacked bars: ``{"label", "parts": {part: ms}}`` (linear: the parts add up)."""
    items = [i for i in items if any(i["parts"].get(p) for p in parts)]
    if not items:
        return ""
    left, right, row_h, top = _left(i["label"] for i in items), 40, 22, 26
    totals = [sum(i["parts"].get(p) or 0.0 for p in parts) for i in items]
    sc = Scale.for_values(totals, left, width - right, allow_log=False)
    height = top + row_h * len(items) + 40
    body = _x_axis(sc, top, top + row_h * len(items), axis) + _legend(parts, left)
    for n, (it, tot) in enumerate(zip(items, totals)):
        y, x = top + n * row_h, sc(0)
        body.append(f'<text x="{left - 6}" y="{y + 15}" text-anchor="end" fill="#222">{esc(it["label"])}</text>')
        for k, p in enumerate(parts):
            v = it["parts"].get(p) or 0.0
            w = sc(v) - sc(0)
            body.append(f'<rect x="{x:.1f}" y="{y + 4}" width="{max(0.0, w):.1f}" height="{row_h - 8}" '
                        f'fill="{PALETTE[k % len(PALETTE)]}"><title>{esc(p)}: {fmt_ms(v)} ms</title></rect>')
            x += w
        body.append(f'<text x="{x + 4:.1f}" y="{y + 15}" fill="#111">{fmt_ms(tot)}</text>')
    return _svg(width, height, body, axis)


def history(points: Sequence[dict], title: str, band: Optional[tuple] = None, width: int = 900) -> str:
    """p50 over time (``{"t": epoch s, "p50", "p90", "when"}``), with the baseline ``(lo, base, hi)`` band."""
    pts = [p for p in points if p.get("p50") is not None]
    if not pts:
        return ""
    left, right, top, bottom, height = 60, 20, 10, 44, 240
    ys = [p["p50"] for p in pts] + [p.get("p90") for p in pts if p.get("p90")] + (list(band) if band else [])
    sy = Scale.for_values(ys, height - bottom, top)
    # Evenly spaced in order of time: bursts of runs and week-long gaps both stay readable.
    pts = sorted(pts, key=lambda p: p["t"])
    pts = [dict(p, t=i) for i, p in enumerate(pts)]
    sx = Scale(0, max(1, len(pts) - 1), left + 10, width - right - 10, False)
    body = []
    for t in sy.ticks():
        y = sy(t)
        body.append(f'<line x1="{left}" y1="{y:.1f}" x2="{width - right}" y2="{y:.1f}" stroke="#e5e5e5"/>'
                    f'<text x="{left - 4}" y="{y + 4:.1f}" text-anchor="end" fill="#555">{fmt_ms(t)}</text>')
    if band:
        body.append(_band(band, sy, left, width - right))
    path = " ".join(f"{sx(p['t']):.1f},{sy(p['p50']):.1f}" for p in pts)
    body.append(f'<polyline points="{path}" fill="none" stroke="{PALETTE[0]}" stroke-width="1.5"/>')
    body += [_history_point(p, sx, sy, band) for p in pts]
    body.append(f'<text x="{left}" y="{height - 8}" fill="#555">{esc(pts[0].get("when", ""))}</text>'
                f'<text x="{width - right}" y="{height - 8}" text-anchor="end" fill="#555">'
                f'{esc(pts[-1].get("when", ""))}</text>'
                f'<text x="{(left + width) / 2:.0f}" y="{height - 8}" text-anchor="middle" fill="#333">'
                f'p50 ms{" (log scale)" if sy.log else ""}, whisker p90'
                f'{", green band: baseline" if band else ""}</text>')
    return _svg(width, height, body, title)


def _band(band: tuple, sy: Scale, x0: float, x1: float) -> str:
    """The baseline ``(lo, base, hi)`` as a green band with a dashed line at ``base``."""
    lo, base, hi = band
    return (f'<rect x="{x0}" y="{sy(hi):.1f}" width="{x1 - x0}" '
            f'height="{max(1.0, sy(lo) - sy(hi)):.1f}" fill="#54a24b" opacity=".15">'
            f'<title>baseline {fmt_ms(base)} ms, band {fmt_ms(lo)}..{fmt_ms(hi)}</title></rect>'
            f'<line x1="{x0}" y1="{sy(base):.1f}" x2="{x1}" y2="{sy(base):.1f}" '
            f'stroke="#54a24b" stroke-dasharray="4 3"/>')


def _history_point(p: dict, sx: Scale, sy: Scale, band: Optional[tuple]) -> str:
    """One run: its p90 whisker and its p50 dot, red above the baseline band."""
    x, y = sx(p["t"]), sy(p["p50"])
    out = ""
    if p.get("p90"):
        out += f'<line x1="{x:.1f}" y1="{y:.1f}" x2="{x:.1f}" y2="{sy(p["p90"]):.1f}" stroke="#999"/>'
    bad = band is not None and p["p50"] > band[2]
    return out + (f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3.5" fill="{"#e45756" if bad else PALETTE[0]}">'
                  f'<title>{esc(p.get("when", ""))}: p50 {fmt_ms(p["p50"])} ms</title></circle>')


def scatter(points: Sequence[dict], front: Sequence[int], title: str, y_label: str, width: int = 560) -> str:
    """Latency (x) vs accuracy (y): ``{"label", "x", "y"}``; ``front`` indices drawn as a red step line."""
    pts = [p for p in points if p.get("x") is not None and p.get("y") is not None]
    if not pts:
        return ""
    left, right, top, bottom, height = 56, 110, 10, 40, 280
    sx = Scale.for_values([p["x"] for p in pts], left, width - right, zero=False)
    sy = Scale.for_values([p["y"] for p in pts], height - bottom, top, allow_log=False, zero=False)
    body = _x_axis(sx, top, height - bottom, "p50 latency ms")
    for t in sy.ticks():
        body.append(f'<text x="{left - 4}" y="{sy(t) + 4:.1f}" text-anchor="end" fill="#555">{t:.3g}</text>'
                    f'<line x1="{left}" y1="{sy(t):.1f}" x2="{width - right}" y2="{sy(t):.1f}" stroke="#eee"/>')
    body.append(f'<text x="12" y="{(top + height - bottom) / 2:.0f}" fill="#333" '
                f'transform="rotate(-90 12 {(top + height - bottom) / 2:.0f})" text-anchor="middle">'
                f'{esc(y_label)}</text>')
    on = [points[i] for i in front if points[i] in pts]
    if len(on) > 1:
        d = []
        for a, b in zip(on, on[1:]):
            d.append(f"{sx(a['x']):.1f},{sy(a['y']):.1f} {sx(b['x']):.1f},{sy(a['y']):.1f}")
        d.append(f"{sx(on[-1]['x']):.1f},{sy(on[-1]['y']):.1f}")
        body.append(f'<polyline points="{" ".join(d)}" fill="none" stroke="#e45756" stroke-width="1.5"/>')
    for p in pts:
        hot = p in on
        x, y = sx(p["x"]), sy(p["y"])
        body.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{5 if hot else 4}" '
                    f'fill="{"#e45756" if hot else "#8899aa"}"><title>{esc(p["label"])}: '
                    f'{fmt_ms(p["x"])} ms, {p["y"]:.4g}</title></circle>'
                    f'<text x="{x + 6:.1f}" y="{y - 4:.1f}" fill="#333">{esc(p["label"])[:24]}</text>')
    return _svg(width, height, body, title)
