"""`edgepipe report`: tables across devices/recipes/threads/delegates, compare, HTML."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from edgepipe.device.cliout import fail


@click.command(epilog="""\b
Examples:
  edgepipe report                                  # latest result per configuration
  edgepipe report --device pi5 --kind bench --json
  edgepipe report --save baseline.json             # keep a report set for later
  edgepipe report --compare baseline.json --tolerance 0.1   # CI gate: exit 1 on a p50 regression
  edgepipe report --html results.html
""")
@click.option("--db", "db_path", default=None,
              help="Results database: a SQLite file or a postgresql://user@host/db URL. "
                   "Default: $EDGEPIPE_DB or ~/.local/share/edgepipe/results.db.")
@click.option("--kind", type=click.Choice(["bench", "run", "eval"]), default=None, help="Only this kind.")
@click.option("--device", default=None, help="Only this device (its id, name or hostname).")
@click.option("--model", default=None, help="Only this bundle/model name.")
@click.option("--recipe", default=None, help="Only this recipe.")
@click.option("--all", "show_all", is_flag=True, help="Every report, not only the latest per configuration.")
@click.option("--compare", "baseline", type=click.Path(dir_okay=False), default=None,
              help="Baseline report set (from --save/--json, a JSON list of reports, or a results .db); "
                   "exit 1 when a p50 regressed beyond --tolerance.")
@click.option("--tolerance", type=click.FloatRange(0, 100), default=0.10, show_default=True,
              help="Allowed p50 slowdown vs the baseline, as a fraction (0.10 = 10%).")
@click.option("--fail-on-missing", is_flag=True, help="With --compare: also fail when a baseline configuration "
                                                       "has no current result.")
@click.option("--html", "html_out", type=click.Path(dir_okay=False), default=None,
              help="Write one self-contained HTML page with tables and plots.")
@click.option("--save", "save_to", type=click.Path(dir_okay=False), default=None,
              help="Write the report set (rows + full reports) as JSON, usable as --compare baseline.")
@click.option("--json", "as_json", is_flag=True, help="Print the report set as JSON.")
def report(db_path, kind, device, model, recipe, show_all, baseline, tolerance, fail_on_missing, html_out,
           save_to, as_json):
    """Tables of stored results; compare against a baseline; write an HTML page.

    Rows are grouped by device, model, recipe, backend, delegate, threads and
    kind; by default only the newest report of each configuration is shown.
    Warns when a quantized recipe is slower than fp32 on the same device.
    """
    from edgepipe.pipeline import reporting as rp

    filters = dict(kind=kind, device=device, model=model, recipe=recipe)
    path, reports = _read_reports(db_path, filters)
    rows, kept = _select(reports, show_all)
    comparison = _compare(rows, baseline, tolerance, filters) if baseline else None

    doc = rp.to_reportset(rows)
    if comparison is not None:
        doc["comparison"] = {"baseline": str(baseline), "tolerance": tolerance, "entries": comparison}
    if save_to:
        _write(Path(save_to), json.dumps(rp.to_reportset(rows, kept), indent=2) + "\n")
    if html_out:
        from edgepipe.pipeline.html_report import render_html
        _write(Path(html_out), render_html(rows, comparison=comparison, source=str(path)))

    if as_json:
        click.echo(json.dumps(doc, indent=2))
    else:
        _print_tables(rows, doc)
        if comparison is not None:
            click.echo(f"\ncompared with {baseline} (tolerance {tolerance:.0%}):")
            click.echo(rp.comparison_table(comparison))
        for what, where in (("saved report set", save_to), ("wrote", html_out)):
            if where:
                click.echo(f"{what} {where}", err=True)
    if comparison is not None:
        _exit_on_regression(comparison, tolerance, fail_on_missing)


def _read_reports(db_path, filters: dict) -> tuple:
    """(the database as messages name it, its reports matching ``filters``), read-only."""
    from edgepipe.pipeline.store import StoreError, default_db, is_pg_url, open_store
    from edgepipe.pipeline.store_pg import redact

    target = db_path or default_db()
    path = redact(target) if is_pg_url(target) else Path(target)  # never print a password
    if not is_pg_url(target) and not path.exists():
        raise click.ClickException(f"no results database at {path}; collect some with `edgepipe bench` "
                                   "or `edgepipe serve` first, or pass --db")
    # Read-only: a report never creates, migrates or "repairs" the file it reads.
    try:
        with open_store(target, readonly=True) as store:
            return path, store.query(**filters)
    except StoreError as e:
        raise click.ClickException(f"{e}; pass --db with a database written by `edgepipe serve` "
                                   "or `edgepipe bench`") from None
    except Exception as e:  # sqlite3.Error while reading, OSError
        raise click.ClickException(f"cannot read {path}: {' '.join(str(e).split())}") from None


def _select(reports: list, show_all: bool) -> tuple:
    """(table rows, the full reports behind them): every report, or the newest per configuration."""
    from edgepipe.pipeline import reporting as rp

    rows = [rp.row(r) for r in reports]
    rows = rp.attach_accuracy(rp.sort_rows(rows) if show_all else rp.latest(rows))
    if show_all:
        return rows, reports
    keep = {r["id"] for r in rows}
    return rows, [r for r in reports if r["id"] in keep]


def _compare(rows: list, baseline: str, tolerance: float, filters: dict) -> list:
    """The comparison entries of ``rows`` against the baseline's rows under the same filters."""
    from edgepipe.pipeline import reporting as rp

    try:
        base_rows = rp.load_baseline(Path(baseline))
    except ValueError as e:
        raise fail(e) from None
    base_rows = [b for b in base_rows if _matches(b, **filters)]
    return rp.compare(rows, base_rows, tolerance)


def _print_tables(rows: list, doc: dict) -> None:
    from edgepipe.pipeline import reporting as rp

    if not rows:
        click.echo("no matching reports")
        return
    click.echo(rp.results_table(rows))
    pivot = rp.pivot_table(rows)
    if pivot:
        click.echo("\n" + pivot)
    click.echo("")
    for line in doc["fastest"] + doc["threads"]:
        click.echo(line)
    for w in doc["warnings"]:
        click.echo(f"warning: {w}")


def _exit_on_regression(comparison: list, tolerance: float, fail_on_missing: bool) -> None:
    regressed = [e for e in comparison if e["status"] == "regressed"]
    missing = [e for e in comparison if e["status"] == "missing"]
    if regressed or (fail_on_missing and missing):
        click.echo(f"FAIL: {len(regressed)} p50 regression(s) beyond {tolerance:.0%}"
                   + (f", {len(missing)} missing" if fail_on_missing and missing else ""), err=True)
        sys.exit(1)


def _matches(r: dict, kind, device, model, recipe) -> bool:
    return all(v is None or r.get(k) == v
               for k, v in (("kind", kind), ("device", device), ("model", model), ("recipe", recipe)))


def _write(path: Path, text: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    except OSError as e:
        raise click.ClickException(f"cannot write {path}: {e.strerror or e}") from None
