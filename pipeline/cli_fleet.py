"""`edgepipe bench`: push bundles to device agents, bench them, collect the reports."""
from __future__ import annotations

import json
import sys

import click

from edgepipe.pipeline.cli_fleet_broker import bench_over_broker, broker_bench_options


@click.command(epilog="""\b
Examples:
  edgerun agent --port 8751                                   # on each device
  edgepipe bench out/mobilenet_v2-*/ --device http://127.0.0.1:8751
  edgepipe bench out/*/ --device http://pi4:8751 --device http://pi5:8751 \\
      --token "$EDGERUN_TOKEN" --threads 1,2,4 --runs 200 --db results.db
  edgepipe bench out/*/ --broker mqtt://broker.lan:1883 --password "$EDGEPIPE_MQTT_PASSWORD" --devices tag:lab
""")
@click.argument("bundles", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--device", "devices", multiple=True, metavar="URL",
              help="Agent URL (`edgerun agent`), e.g. http://pi.local:8751; repeat for more devices "
                   "(or --broker for boards that dial out).")
@click.option("--token", envvar="EDGERUN_TOKEN", default=None,
              help="Bearer token of the agents [env: EDGERUN_TOKEN].")
@click.option("--db", "db_path", type=click.Path(dir_okay=False), default=None,
              help="Results database. Default: $EDGEPIPE_DB or ~/.local/share/edgepipe/results.db.")
@click.option("--no-db", is_flag=True, help="Do not store the reports (print only).")
@click.option("--threads", default=None, metavar="N[,N...]",
              help="Interpreter threads; a list (1,2,4) benches each value. Default: the runtime's choice.")
@click.option("--delegate", default=None, metavar="NAME[,NAME...]",
              help="cpu | xnnpack | edgetpu | gpu | PATH.so; a list compares them. Default cpu.")
@click.option("--backend", default=None, help="Runtime on the device (default: the first installed).")
@click.option("--runs", type=click.IntRange(1, 100000), default=None, help="Timed runs per bundle.")
@click.option("--warmup", type=click.IntRange(0, 10000), default=None, help="Untimed warm-up runs.")
@click.option("--min-secs", type=click.FloatRange(0, 3600), default=None, help="Keep running at least this long.")
@click.option("--input", "input_", default=None, metavar="random|DIR",
              help="Seeded random tensors (default) or a folder of images ON THE DEVICE.")
@click.option("--seed", type=int, default=None, help="Seed of the random input.")
@click.option("--mode", type=click.Choice(["latency", "throughput"]), default=None,
              help="latency (one request at a time, the default) or throughput (--streams interpreters at once, "
                   "inferences/s).")
@click.option("--streams", type=click.IntRange(1, 64), default=None,
              help="With --mode throughput: concurrent interpreters (default: from the board's cores and the "
                   "model's size).")
@click.option("--profile-ops", is_flag=True, default=None,
              help="Also time every op on the board (latency mode): the per-op profile goes into the report.")
@click.option("--timeout", "job_timeout", type=click.FloatRange(1, 86400), default=1800, show_default=True,
              help="Seconds to wait for one job; a job still going then is cancelled on the device.")
@click.option("--force", is_flag=True,
              help="Upload every bundle again, even when the device has it; lifts the device's refusal "
                   "of a bundle that crashed its runtime.")
@broker_bench_options
@click.option("--json", "as_json", is_flag=True, help="Print outcomes and reports as JSON.")
def bench(bundles, devices, token, db_path, no_db, threads, delegate, backend, runs, warmup, min_secs,
          input_, seed, mode, streams, profile_ops, job_timeout, force, as_json, **broker_kw):
    """Bench BUNDLE(s) on every --device at once and store the reports.

    Uploads only what a device lacks (bundles are keyed by sha256), runs the
    jobs on all devices concurrently (one at a time per device), prints a
    device x recipe table. Exit code 0 only when every job succeeded. On a
    terminal (not with --json) a bar per device shows its current job and an
    ETA on stderr; otherwise each event is one timestamped line on stderr.
    """
    from edgepipe.device.progress import enabled
    from edgepipe.pipeline.fleet import bench_fleet, device_label, expand_settings
    from edgepipe.pipeline.fleet_progress import FleetProgress, job_names

    if bool(devices) == bool(broker_kw["broker"]):
        raise click.UsageError("give --device URL (agents that listen) or --broker URL (boards that dial out)")
    thread_list = _list(threads, "--threads", int)
    delegate_list = _list(delegate, "--delegate", str)
    packed = _pack(bundles)
    for url in devices:
        if not url.startswith(("http://", "https://")):
            raise click.BadParameter(f"{url!r} is not an http(s) URL", param_hint="--device")
    store = None if no_db else _open_results(db_path)

    if streams is not None and mode != "throughput":
        raise click.UsageError("--streams needs --mode throughput")
    params = dict(backend=backend, runs=runs, warmup=warmup, min_secs=min_secs, input=input_, seed=seed,
                  mode=mode, streams=streams, profile_ops=profile_ops or None)
    settings = expand_settings(params, threads=thread_list, delegates=delegate_list)
    n_devices = len(devices)
    # On a terminal: a bar per device with its current job and an ETA; otherwise the timestamped event lines.
    progress = FleetProgress(job_names(packed, settings), [device_label(u) for u in devices],
                             on=enabled(as_json=as_json))
    try:
        with progress:  # the bars are closed before the table
            if broker_kw["broker"]:
                result, n_devices = bench_over_broker(packed, settings, store=store, job_timeout=job_timeout,
                                                      progress=progress, **broker_kw)
            else:
                result = bench_fleet(packed, list(devices), settings=settings, token=token, store=store,
                                     job_timeout=job_timeout, force=force, on_event=progress)
    finally:
        if store is not None:
            store.close()
    _print_outcomes(result, store, n_devices, force=force, as_json=as_json)
    sys.exit(0 if result.ok else 1)


def _pack(bundles) -> list:
    """Each BUNDLE as an upload-ready tar (keyed by sha256); a bad one is a one-line error."""
    from edgepipe.device.bundle import BundleError
    from edgepipe.pipeline.remote import pack_bundle

    packed = []
    for b in bundles:
        try:
            packed.append(pack_bundle(b))
        except (BundleError, OSError) as e:
            raise click.ClickException(f"{b}: {e}") from None
    return packed


def _open_results(db_path):
    """The results store at ``--db`` (a SQLite file or a postgresql:// URL), or the default database."""
    from edgepipe.pipeline.store import default_db, open_store

    path = db_path or default_db()
    try:
        return open_store(path)
    except Exception as e:
        raise click.ClickException(f"cannot open results database {path}: {e}") from None


def _print_outcomes(result, store, n_devices: int, *, force: bool, as_json: bool) -> None:
    """The device x recipe table, warnings, failures and a summary line (or all of it as JSON)."""
    from edgepipe.pipeline.reporting import quantized_slower, results_table, row, sort_rows

    ok_rows = sort_rows(dict(row(o.report), device=o.device) for o in result.outcomes if o.report)
    if as_json:
        click.echo(json.dumps({
            "ok": result.ok,
            "outcomes": [{"device": o.device, "bundle": o.bundle, "recipe": o.recipe, "setting": o.setting,
                          "status": o.status,
                          "error": o.error, "crash": o.crash, "uploaded": o.uploaded, "stored": o.stored,
                          "report": o.report} for o in result.outcomes],
            "warnings": quantized_slower(ok_rows)}, indent=2))
        return
    if ok_rows:
        click.echo(results_table(ok_rows))
    for w in quantized_slower(ok_rows):
        click.echo(f"warning: {w}")
    for o in result.failed():
        click.echo(f"{o.status.upper():<8}{o.device}  {o.bundle}: {o.error}")
    if not force and any(o.status == "refused" for o in result.outcomes):
        click.echo("hint: a bundle that crashed a device's runtime is refused there until it is sent "
                   "again with --force")
    n_ok = sum(o.status == "ok" for o in result.outcomes)
    where = "not stored" if store is None else f"stored in {store.path}"
    click.echo(f"{n_ok}/{len(result.outcomes)} jobs succeeded on {n_devices} device(s); reports {where}")


def _list(value, hint: str, kind):
    """``"1,2,4"`` -> [1, 2, 4]; None -> [None] (the agent's default)."""
    if value is None or not value.strip():
        return [None]
    out = []
    for part in value.split(","):
        part = part.strip()
        try:
            v = kind(part)
        except ValueError:
            raise click.BadParameter(f"{part!r} is not a number", param_hint=hint) from None
        if kind is int and not 1 <= v <= 256:
            raise click.BadParameter("thread counts must be between 1 and 256", param_hint=hint)
        if not part:
            raise click.BadParameter("empty item in the list", param_hint=hint)
        out.append(v)
    return out
