"""`edgepipe evaluate` on detection bundles: the click side of edgepipe.pipeline.evaluate_detection."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import click

from edgepipe.device.cliout import fail


def evaluate_detectors(bundles, data: Path, reference: Optional[Path], labels_file: Optional[Path],
                       threads: Optional[int], db_path, as_json: bool, quiet: bool) -> None:
    """Agreement with the float model (and mAP with box labels) per bundle; table or JSON on stdout."""
    from edgepipe.device.errors import EdgepipeError
    from edgepipe.pipeline.evaluate_detection import evaluate_detection, format_detection_results

    def progress(msg: str, n: int) -> None:
        if msg and not (as_json or quiet):
            click.echo(f"edgepipe: {msg}", err=True)

    try:
        results = evaluate_detection(bundles, data, reference=reference, labels_file=labels_file,
                                     threads=threads, progress=progress)
    except EdgepipeError as e:  # bundles, data, labels, reference, runtime: one line each
        raise fail(e) from None
    stored = _store(results, data, db_path) if db_path is not None else None
    if as_json:
        out = {"data": str(data), "task": "detection", "results": [r.to_dict() for r in results]}
        if stored is not None:
            out["stored"] = stored
        click.echo(json.dumps(out, indent=2))
        return
    click.echo(format_detection_results(results))
    click.echo("precision/recall/mean IoU: the variant's detections against the float model's "
               "(same class, IoU >= 0.5)")
    for note in sorted({n for r in results for n in r.notes}):
        click.echo(f"note: {note}")
    if stored is not None:
        click.echo(f"stored {stored} eval report(s) in {db_path}")


def _store(results, data, db_path) -> int:
    from edgepipe.pipeline.cli_evaluate import _store as store_reports

    return store_reports(results, data, db_path)
