"""`edgepipe ablate`: run an ablation spec -> table, Pareto fronts, PNG, HTML."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from edgepipe.device.cliout import fail

EPILOG = """\b
Examples:
  edgepipe ablate examples/ablate/fashion_mnist_arch.toml --out runs/fm-arch
  edgepipe ablate examples/ablate/mobilenet_v2.toml --out runs/mnv2
  edgepipe ablate examples/ablate/mobilenet_v2.toml --out runs/mnv2-pi --device http://pi.local:8751
  edgepipe ablate examples/ablate/mobilenet_v2.toml --out runs/mnv2 --db postgresql://ci@db.lan/edgepipe
Re-running with the same --out reuses every point already measured.
"""


@click.command(epilog=EPILOG)
@click.argument("spec_path", metavar="SPEC.toml", type=click.Path(path_type=Path))
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Folder for results, plots and the resume cache (required unless --dry-run).")
@click.option("--device", "device_url", help="Time on an 'edgerun agent' at this URL instead of locally.")
@click.option("--token", envvar="EDGERUN_TOKEN", help="Bearer token of the agent at --device [env: EDGERUN_TOKEN].")
@click.option("--db", "db_path", default=None, metavar="PATH|URL",
              help="Also store every point's bench and eval reports in this results database (a SQLite file "
                   "or postgresql://...), for `edgepipe report` and the dashboard.")
@click.option("--dry-run", is_flag=True, help="Validate the spec and list the points, measure nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON on stdout.")
@click.option("--quiet", is_flag=True, help="No progress output.")
def ablate(spec_path, out_dir, device_url, token, db_path, dry_run, as_json, quiet):
    """Measure every point of SPEC.toml: size, p50 latency, accuracy/agreement.

    Writes results.json, table.md, pareto.png and index.html into --out, and
    each point's full reports into --out/reports/. Points measured by an
    earlier (or interrupted) run of the same spec are reused from
    --out/points.jsonl; with --db their kept reports are stored as well
    (reports the database has already are not stored twice).
    """
    from edgepipe.pipeline.ablate_spec import SpecError, load_spec

    try:
        spec = load_spec(spec_path)
    except SpecError as e:
        raise fail(e) from None
    points = spec.points()
    if dry_run:
        for p in points:
            click.echo(p.label())
        click.echo(f"{len(points)} point(s)", err=True)
        return
    if out_dir is None:
        raise click.ClickException("--out: required (the folder receiving results and the resume cache)")
    from edgepipe.pipeline.ablate import AblateError, quality_key, run_ablation
    from edgepipe.pipeline.ablate_store import PointReports
    from edgepipe.pipeline.cli_samples import not_built_hint
    from edgepipe.pipeline.samples import SampleDataError, SampleNotBuiltError

    progress = _Progress(len(points), talk=not (quiet or as_json))
    store = _open_store(db_path)
    keep = PointReports(out_dir, store)
    try:
        with progress.bar:
            results = run_ablation(spec, out_dir, device_url=device_url, token=token, say=progress.say,
                                   tick=progress.tick, keep=keep)
    except SampleNotBuiltError as e:
        raise click.ClickException(f"model.source: {e}; {not_built_hint(e.name)}") from None
    except (AblateError, SampleDataError) as e:
        raise fail(e) from None
    except KeyboardInterrupt:
        click.echo(f"interrupted: re-run the same command to resume ({progress.n} point(s) kept)",
                   err=True)
        sys.exit(130)
    finally:
        if store is not None:
            store.close()
    quality = quality_key(results)
    cmd = f"edgepipe ablate {spec_path} --out {out_dir}" + (f" --device {device_url}" if device_url else "")
    table = _write_outputs(spec, results, quality, out_dir, cmd, progress.say)
    _print_results(spec, results, quality, out_dir, table, keep, store, as_json=as_json)
    if keep.tally.failed:
        click.echo(f"warning: {keep.tally.failed} report(s) not stored: {keep.tally.error}", err=True)
    if results and all(r.get("error") for r in results):
        raise click.ClickException("every point failed; see the table above")


class _Progress:
    """What an ablation says while it runs: one bar with ETA over the points on a terminal, otherwise
    plain ``[n/N]`` lines on stderr; nothing when ``talk`` is off (--quiet, --json)."""

    def __init__(self, total: int, talk: bool):
        from edgepipe.device import progress as pg

        self.total, self.talk, self.n = total, talk, 0
        self.bar = pg.Bar(total, "ablate", unit="point", on=talk and pg.enabled())

    def say(self, msg: str) -> None:
        if self.talk:
            self.bar.write(f"edgepipe: {msg}") if self.bar.active else click.echo(f"edgepipe: {msg}", err=True)

    def tick(self, res: dict) -> None:
        """One point finished (measured, cached or failed)."""
        self.n += 1
        if self.talk:
            tag = "cached" if res.get("cached") else ("FAILED" if res.get("error") else "done")
            p50 = res.get("p50_ms")
            detail = res.get("error") or (f"p50 {p50:.3f} ms" if p50 is not None else "")
            line = f"[{self.n}/{self.total}] {res.get('label')}: {tag} {detail}"
            self.bar.message(line, at_start=False) if self.bar.active else click.echo(line, err=True)


def _print_results(spec, results: list, quality: str, out_dir: Path, table: tuple, keep, store, *,
                   as_json: bool) -> None:
    """The results as JSON, or the table, what was written and what was stored."""
    stored = _stored_line(keep.tally, store)
    if as_json:
        doc = {"name": spec.name, "quality": quality, "out": str(out_dir), "results": results}
        if store is not None:
            doc["stored"] = {"new": keep.tally.new, "already": keep.tally.known, "failed": keep.tally.failed,
                             "db": str(store.path)}
        click.echo(json.dumps(doc, indent=2))
        return
    from edgepipe.device.tables import format_table

    headers, rows = table
    click.echo(format_table(headers, rows, right=range(1, 7)))
    click.echo(f"\nwrote {out_dir}/index.html, pareto.png, table.md, results.json")
    if stored:
        click.echo(stored)


def _open_store(db_path):
    """The results store for --db (None without it); a bad path or URL fails before any work."""
    if db_path is None:
        return None
    from edgepipe.pipeline.store import open_store

    from edgepipe.device.errors import EdgepipeError

    try:
        return open_store(db_path)  # a SQLite file or a postgresql:// URL
    except EdgepipeError as e:  # its message names the database (a URL without its password)
        raise click.ClickException(f"--db: {e}") from None
    except Exception as e:  # noqa: BLE001 - sqlite3/OS errors: one line, the flag named
        raise click.ClickException(f"--db: cannot open the results database ({type(e).__name__}: {e})") from None


def _stored_line(tally, store) -> str:
    if store is None:
        return ""
    return f"stored {tally.new} new report(s) in {store.path}" + (
        f" ({tally.known} already there)" if tally.known else "")


def _write_outputs(spec, results: list, quality: str, out_dir: Path, cmd: str, say) -> tuple:
    """results.json, table.md, pareto.png (with matplotlib) and index.html; returns the table."""
    from edgepipe.pipeline import pareto

    headers, rows = pareto.table_rows(results, quality)
    title = f"ablation: {spec.name}"
    (out_dir / "results.json").write_text(json.dumps(
        {"spec": str(spec.path), "name": spec.name, "quality": quality, "results": results},
        indent=2) + "\n", encoding="utf-8")
    (out_dir / "table.md").write_text(pareto.markdown_table(headers, rows) + "\n", encoding="utf-8")
    try:
        pareto.plot_png(results, quality, out_dir / "pareto.png", title)
        png = "pareto.png"
    except ImportError:
        png = ""
        say("matplotlib is not installed: no pareto.png (pip install matplotlib)")
    (out_dir / "index.html").write_text(pareto.html_page(title, headers, rows, png, quality, cmd),
                                        encoding="utf-8")
    return headers, rows

