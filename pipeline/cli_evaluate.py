"""`edgepipe evaluate`: accuracy per bundle and agreement with the float model."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from edgepipe.device.cliout import fail

from edgepipe.device.tables import format_bytes, format_table

EPILOG = """\b
Examples:
  edgepipe evaluate bundles/fashion_mnist_cnn-* --data sample_data/fashion_mnist/test
  edgepipe evaluate bundles/mobilenet_v2-int8 bundles/mobilenet_v2-fp16 \\
      --data sample_data/images --reference "$(edgepipe samples path mobilenet_v2)" --json
  edgepipe evaluate bundles/*-int8 --data photos/ --labels photo_labels.txt --db results.db
  edgepipe evaluate bundles/mobilenet_v2-int8 --data sample_data/images \
      --device http://pi5.local:8751 --delegate edgetpu --db results.db
"""


class _Bar:
    """A click progress bar on stderr, opened per stage, silent with --json or --quiet."""

    def __init__(self, enabled: bool):
        self.enabled, self.bar, self.total = enabled, None, 0  # total: images to evaluate, when known

    def start(self, label: str, total: int):
        self.close()
        if self.enabled:
            self.bar = click.progressbar(length=total, label=label, file=sys.stderr, width=30)
            self.bar.__enter__()

    def step(self, n: int):
        if self.bar:
            self.bar.update(n)

    def close(self):
        if self.bar:
            self.bar.__exit__(None, None, None)
            self.bar = None

    def progress(self, msg: str, n: int) -> None:
        """The evaluation's progress callback: ``n`` images done, or a stage message.

        Reading and running stages get a bar over ``total`` images; other
        messages close the bar and are printed (unless silent).
        """
        if n:
            self.step(n)
        elif msg:
            if msg.startswith(("reading", "running")) and not msg.startswith("running float"):
                self.start(msg, self.total or 1)
            elif self.enabled:
                self.close()
                click.echo(f"edgepipe: {msg}", err=True)


def format_results(results) -> str:
    from edgepipe.pipeline.metrics import fmt_snr

    rows = []
    for r in results:
        a = r.agreement or {}
        rows.append([
            r.bundle, r.recipe or "-", format_bytes(r.size), r.images,
            f"{r.accuracy['top1']:.4f}" if "top1" in r.accuracy else "-",
            f"{r.accuracy['top5']:.4f}" if "top5" in r.accuracy else "-",
            f"{a.get('top1_agreement', 0):.4f}", f"{a.get('mean_abs', 0):.2e}",
            f"{a.get('max_abs', 0):.2e}", f"{a.get('cosine', 0):.5f}",
            fmt_snr(a.get("snr_db") if a.get("snr_db") is not None else float("inf")),
        ])
    return format_table(["bundle", "recipe", "size", "images", "top1", "top5", "agree", "mean|d|",
                         "max|d|", "cosine", "SNR dB"], rows, right=range(2, 11))


@click.command(epilog=EPILOG)
@click.argument("bundles", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--data", required=True, type=click.Path(path_type=Path),
              help="Images: one sub-folder per class (labelled) or a flat folder. Detection bundles: a "
                   "folder of images or a video; box labels from --labels (COCO .json or a folder of .txt).")
@click.option("--reference", type=click.Path(path_type=Path),
              help="Float Keras model to compare with (default: the manifest's source model, "
                   "looked up next to the bundles and among the samples).")
@click.option("--labels", "labels_file", type=click.Path(path_type=Path),
              help="Class names one per line, or '<image file> <class>' per line for a flat folder.")
@click.option("--limit", type=click.IntRange(min=1), help="Evaluate at most N images (evenly spread).")
@click.option("--threads", type=click.IntRange(min=1), help="Interpreter threads.")
@click.option("--db", "db_path", type=click.Path(dir_okay=False),
              help="Also store one 'eval' report per bundle in this results database.")
@click.option("--layers", "n_layers", type=click.IntRange(min=1),
              help="For int8 bundles, also list the N layers with the largest int8 error vs float.")
@click.option("--device", "device_url", metavar="URL",
              help="Run the bundles on this board's agent (edgerun agent); metrics and the float "
                   "reference stay on this machine.")
@click.option("--delegate", help="With --device: the board's delegate (cpu, xnnpack, edgetpu, gpu, PATH.so).")
@click.option("--token", envvar="EDGERUN_TOKEN", default=None, help="With --device: the agent's bearer token "
                                                                    "[env: EDGERUN_TOKEN].")
@click.option("--batch", type=click.IntRange(min=1), help="With --device: images per job (default 256, "
                                                           "fewer when the outputs are large).")
@click.option("--json", "as_json", is_flag=True, help="Print results as JSON on stdout.")
@click.option("--quiet", is_flag=True, help="No progress output.")
def evaluate(bundles, data, reference, labels_file, limit, threads, db_path, n_layers, device_url, delegate,
             token, batch, as_json, quiet):
    """Top-1/top-5 accuracy of each BUNDLE and its agreement with the float model.

    Each bundle runs through the device runtime on images read with its own
    preprocessing; the float reference runs on the same inputs. Agreement is
    the fraction of images where both pick the same class; mean/max |d|,
    cosine and SNR compare the raw outputs. With --device the bundles run on
    the board (its runtime and delegate), in batches of preprocessed images.
    """
    from edgepipe.pipeline.evaluate import EvalError, evaluate_bundles, load_dataset
    from edgepipe.pipeline.cli_samples import not_built_hint
    from edgepipe.pipeline.evaluate_detection import all_detection
    from edgepipe.pipeline.samples import SampleNotBuiltError

    if all_detection(bundles):  # agreement with the float model's boxes, mAP with box labels
        from edgepipe.pipeline.cli_evaluate_detection import evaluate_detectors

        return evaluate_detectors(bundles, data, reference, labels_file, threads, db_path, as_json, quiet)

    bar = _Bar(enabled=not (as_json or quiet))
    progress = bar.progress
    try:
        # Count once for the bars (cheap listing; the real load validates again).
        try:
            bar.total = len(load_dataset(data, labels_file=labels_file, limit=limit).paths)
        except EvalError:
            pass
        runner = _device_runner(device_url, token, delegate, threads, batch, progress)
        results = evaluate_bundles(bundles, data, reference=reference, labels_file=labels_file,
                                   limit=limit, threads=threads, progress=progress, runner=runner)
        layers = _layers(results, reference, n_layers, progress) if n_layers else {}
    except EvalError as e:
        raise fail(e) from None
    except SampleNotBuiltError as e:
        raise click.ClickException(f"--reference: {e}; {not_built_hint(e.name)} "
                                   "(or pass --reference MODEL)") from None
    finally:
        bar.close()
    stored = _store(results, data, db_path, runner) if db_path is not None else None
    _output(results, layers, stored, runner, data=data, db_path=db_path, as_json=as_json)


def _output(results, layers: dict, stored, runner, *, data, db_path, as_json: bool) -> None:
    """The results as JSON on stdout, or the table, notes and (with --device) where each bundle ran."""
    if as_json:
        out = {"data": str(data), "results": [_result_dict(r, runner) for r in results]}
        if stored is not None:
            out["stored"] = stored
        if layers:
            out["layers"] = layers
        click.echo(json.dumps(out, indent=2))
        return
    _print_results(results, layers, stored, db_path)
    if runner is not None:
        _print_device(results, runner)


def _device_runner(url, token, delegate, threads, batch, progress):
    """The board runner for --device (None without it); the other flags need --device."""
    if url is None:
        for flag, value in (("--delegate", delegate), ("--batch", batch)):
            if value is not None:
                raise click.UsageError(f"{flag} needs --device URL (local evaluation runs on the CPU)")
        return None
    from edgepipe.pipeline.remote import AgentClient
    from edgepipe.pipeline.remote_eval import DeviceRunner

    try:
        client = AgentClient(url, token=token)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--device") from None
    return DeviceRunner(client, delegate=delegate, threads=threads, batch=batch, say=progress)


def _result_dict(r, runner) -> dict:
    """One result for --json; with --device also the board's identity, latency and how far it got."""
    d = r.to_dict()
    run = runner.runs.get(r.path) if runner is not None else None
    if run is not None:
        from edgepipe.device.timing import stats

        d["device"] = {"url": run.url, "info": run.device, "runtime": run.runtime,
                       "latency_ms": stats(run.latencies_ms) if run.latencies_ms else None,
                       "partial": run.stopped is not None, "images_done": run.images_done,
                       "images_total": run.images_total, "stopped": run.stopped}
    return d


def _layers(results, reference, n_layers: int, progress) -> dict:
    """``--layers``: the most sensitive layers of every int8 bundle."""
    from edgepipe.pipeline.layer_error import layer_errors

    layers = {}
    for r in results:
        if r.recipe in ("int8", "int8-io"):
            progress(f"per-layer error of {r.bundle}", 0)
            layers[r.bundle] = layer_errors(Path(r.path), reference, n_layers)
    return layers


def _print_results(results, layers: dict, stored, db_path) -> None:
    """The table, the most sensitive layers per int8 bundle, notes, and what was stored."""
    click.echo(format_results(results))
    for name, rows in layers.items():
        click.echo(f"\nmost sensitive layers of {name} (int8 error in quantization steps; "
                   "rounding alone is 0.29):")
        click.echo(format_table(["layer", "op", "rmse/step", "max |d|"], [
            [x["layer"], x["op"], "inf" if x["rmse_steps"] is None else f"{x['rmse_steps']:.3f}",
             f"{x['max_abs']:.3g}"] for x in rows], right=(2, 3)))
    for note in sorted({n for r in results for n in r.notes}):
        click.echo(f"note: {note}")
    if stored is not None:
        click.echo(f"stored {stored} eval report(s) in {db_path}")


def _print_device(results, runner) -> None:
    """Where the bundles ran: the board, its runtime, the per-image latency, and any partial result."""
    for r in results:
        d = _result_dict(r, runner).get("device")
        if not d:
            continue
        info, rt, lat = d["info"] or {}, d["runtime"] or {}, d["latency_ms"] or {}
        p50 = f"{lat['p50']:.2f} ms/image" if lat.get("p50") is not None else "-"
        line = (f"{r.bundle} ran on {info.get('name') or info.get('hostname') or d['url']} "
                f"({rt.get('backend')} {rt.get('version') or ''}, {rt.get('delegate')}): p50 {p50}")
        if d["partial"]:
            line += f"; PARTIAL {d['images_done']}/{d['images_total']} images ({d['stopped']})"
        click.echo(line)


def _store(results, data, db_path, runner=None) -> int:
    try:
        from edgepipe.pipeline.store import open_store
    except ImportError:
        raise click.ClickException("--db: the results store (edgepipe.pipeline.store) is not available "
                                   "in this installation") from None
    from edgepipe.pipeline.evaluate import eval_report
    from edgepipe.pipeline.remote_eval import device_eval_report

    def report(r):
        run = runner.runs.get(r.path) if runner is not None else None
        return device_eval_report(r, data, run) if run is not None else eval_report(r, data)

    try:
        with open_store(db_path) as store:  # a SQLite file or a postgresql:// URL
            return sum(1 for r in results if store.add(report(r)))
    except Exception as e:  # noqa: BLE001 - sqlite/OS errors become one line
        raise click.ClickException(f"--db: cannot store reports in {db_path} ({e})") from None
