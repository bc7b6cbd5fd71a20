"""`edgepipe report --html`: one self-contained page, the dashboard's sections frozen in time.

Same templates and sections as the live dashboard (pipeline/dashboard.py,
pipeline/views.py): the p50 matrix, invoke and end-to-end latency charts
(log scale when the values span more than 10x), per-stage breakdown of runs,
latency vs accuracy with the Pareto front, the results table in its own
scroll box, cold start, and the baseline comparison. Inline CSS and SVG only:
no scripts, no external files, so it opens anywhere, offline.
"""
from __future__ import annotations

import datetime as _dt
from typing import Optional

from edgepipe.pipeline import detection_view, views
from edgepipe.pipeline.dashboard import render_page


def render_html(rows: list, *, comparison: Optional[list] = None, source: str = "") -> str:
    """The whole page as a string."""
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    parts = [views.summary(rows)]
    if comparison is not None:
        parts.append(views.comparison(comparison))
    parts += [views.matrix(rows), views.latency_charts(rows), views.stage_breakdown(rows), views.pareto(rows),
              detection_view.section(rows), views.results(rows), views.cold_start(rows)]
    nav = ('<nav><a href="#matrix">matrix</a> <a href="#latency">latency</a> <a href="#stages">stages</a> '
           '<a href="#pareto">accuracy</a> <a href="#detection">detection</a> <a href="#results">table</a> '
           '<a href="#cold">cold start</a>'
           + (' <a href="#comparison">comparison</a>' if comparison is not None else "") + "</nav>")
    return render_page("".join(parts), status=f"{len(rows)} configurations from {source}, generated {now}",
                       nav=nav)
