"""`edgerun info` and `edgerun bench`: thin click commands over sysinfo / bench / report."""
from __future__ import annotations

import json
import sys
from typing import List, Optional

import click

from edgepipe.device.cliout import fail, isolate_option, preflight, save_and_echo
from edgepipe.device.cli_report import report_to_option


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def info(as_json: bool) -> None:
    """Show this device: runtimes, delegates, CPU, board, OS, governor, temperature, memory.

    \b
    Examples:
      edgerun info
      edgerun info --json
    """
    from edgepipe.device.sysinfo import info as gather

    data = gather()
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    for k, v in _info_rows(data) + _delegate_rows(data):
        if v is not None:  # missing sources are simply absent
            click.echo(f"{k:<16} {v}")


def _info_rows(data: dict) -> List[tuple]:
    mem = data["memory_mb"]
    return [
        ("host", data["hostname"]),
        ("board", data["board"]),
        ("cpu", f"{data['cpu'] or '?'} ({data['machine']}, {data['cores']} cores)"),
        ("os", data["os"]),
        ("python", data["python"]),
        ("governor", data["governor"]),
        ("temperature", f"{data['temperature_c']:.1f} C" if data["temperature_c"] is not None else None),
        ("throttled", (f"{data['throttled']} ({', '.join(data['throttled_flags']) or 'ok'})"
                       if data["throttled"] is not None else None)),
        ("memory", f"{mem['total']:.0f} MB total, {mem['available']:.0f} MB available"
         if mem["total"] is not None and mem["available"] is not None else None),
        ("backends", ", ".join(f"{b['name']} {b['version'] or ''}".strip() for b in data["backends"])
         or "none installed (pip install ai-edge-litert, or tflite-runtime)"),
    ]


def _delegate_rows(data: dict) -> List[tuple]:
    rows = []
    for name, d in data["delegates"].items():
        if name == "cpu":
            rows.append(("delegate cpu", d["note"]))
        elif d["available"]:
            extra = f" devices: {', '.join(d['devices'])}" if d.get("devices") else ""
            if name == "edgetpu" and not d.get("devices"):
                extra = " (no device visible)"
            rows.append((f"delegate {name}", f"{d['library']}{extra}"))
        elif d.get("devices"):
            rows.append((f"delegate {name}", f"library not found, but devices visible: {', '.join(d['devices'])} "
                                             "(install the Edge TPU runtime)"))
        else:
            rows.append((f"delegate {name}", "not found"))
    if data["emulated"]:
        rows.append(("note", "running under CPU emulation"))
    return rows


AUTO = "auto"  # --threads auto: sweep 1..cores (edgepipe.device.sweep)


def _int_list(ctx, param, value: Optional[str]) -> list:
    if value is not None and value.strip() == AUTO:
        return [AUTO]
    if value is None or value.strip() in ("", "default"):
        return [None]
    out: List[Optional[int]] = []
    for part in value.split(","):
        part = part.strip()
        if part == "default":
            out.append(None)
            continue
        try:
            n = int(part)
        except ValueError:
            raise click.BadParameter(f"{part!r} is not a number (use e.g. 1,2,4)") from None
        if n < 1:
            raise click.BadParameter("thread counts must be >= 1")
        out.append(n)
    return out


def _str_list(ctx, param, value: str) -> List[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    if not items:
        raise click.BadParameter("give at least one delegate")
    return items


@click.command()
@click.argument("model", metavar="BUNDLE|MODEL", type=click.Path(dir_okay=True, file_okay=True))
@click.option("--threads", default=None, callback=_int_list, metavar="N[,N...]|auto",
              help="CPU threads; a list (1,2,4) runs one bench per value; auto tries 1..cores and says which is "
                   "fastest (p50 and inferences/s). Default: the runtime's (1 with ai-edge-litert).")
@click.option("--delegate", default="cpu", show_default=True, callback=_str_list, metavar="NAME[,NAME...]",
              help="cpu, xnnpack, edgetpu[:usb|:pci|:N], gpu or /path/to/delegate.so; a list compares them.")
@click.option("--runs", default=50, show_default=True, type=click.IntRange(min=1), help="Minimum timed runs.")
@click.option("--warmup", default=5, show_default=True, type=click.IntRange(min=0), help="Untimed runs first.")
@click.option("--min-secs", default=1.0, show_default=True, type=click.FloatRange(min=0),
              help="Keep running until this many seconds of timed runs.")
@click.option("--input", "input_", default="random", show_default=True, metavar="random|DIR",
              help="Seeded random tensors, or real images from DIR through the bundle's preprocessing.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed for random inputs.")
@click.option("--backend", default=None, metavar="NAME",
              help="Force a runtime: ai_edge_litert, tflite_runtime or tensorflow.lite. Default: first installed.")
@click.option("--edgetpu-device", default=None, metavar="usb|pci|:N", help="Which Edge TPU to use.")
@click.option("--out", "out", default=None, type=click.Path(dir_okay=False),
              help="Write the report JSON here (a JSON list when several settings ran).")
@click.option("--json", "as_json", is_flag=True, help="Print the report JSON instead of a summary.")
@click.option("--mode", default="latency", show_default=True, type=click.Choice(["latency", "throughput"]),
              help="latency: one request at a time; throughput: --streams interpreters in parallel, "
                   "inferences/s as the figure.")
@click.option("--streams", default=None, type=click.IntRange(1, 64),
              help="Parallel interpreters in throughput mode. Default: cores / threads (fewer if memory is short).")
@click.option("--profile-ops", is_flag=True,
              help="Add a per-op profile: time per node, op type, delegate or CPU (after the timed runs).")
@isolate_option
@report_to_option
def bench(model, threads, delegate, runs, warmup, min_secs, input_, seed, backend, edgetpu_device, out,
          as_json, mode, streams, profile_ops, isolate) -> None:
    """Benchmark a bundle or a plain .tflite file on this device.

    Reports cold start (file read, interpreter build, delegate, allocate,
    first invoke), then latency stats over timed invokes after a warm-up.

    \b
    Examples:
      edgerun bench out/mobilenet_v2-int8
      edgerun bench model.tflite --threads 1,2,4 --runs 100
      edgerun bench out/mobilenet_v2-int8 --delegate cpu,edgetpu --json --out bench.json
      edgerun bench out/mobilenet_v2-fp32 --input sample_data/images
      edgerun bench out/mobilenet_v2-int8 --profile-ops
      edgerun bench out/mobilenet_v2-int8 --mode throughput --streams 2
      edgerun bench out/mobilenet_v2-int8 --threads auto
    """
    from edgepipe.device.errors import EdgepipeError

    expected = EdgepipeError  # bundle, load, runtime and crash-probe failures: one line each
    failures: List[str] = []

    def on_error(label: str, e: Exception) -> bool:
        if not isinstance(e, expected):
            return False
        if len(threads) * len(delegate) == 1:
            return False
        failures.append(f"{label}: {e}")
        click.echo(f"error: {label}: {e}", err=True)
        return True

    from edgepipe.device import progress as pg

    # One bar per setting: the timed runs with ETA (open-ended while --min-secs decides); off with --json or no TTY.
    bar = _RunsBar(None if min_secs else runs, pg.enabled(as_json=as_json))

    def on_report(r: dict) -> None:
        bar.done()
        if not as_json:
            _echo_summary(r)

    _check_mode(mode, streams, profile_ops, threads)

    try:
        preflight(model, isolate=isolate, delegates=delegate, threads=None if threads == [AUTO] else threads[0],
                  backend=backend, edgetpu_device=edgetpu_device)
        with bar:  # a bar left by a failing setting is cleared before the error line
            reports = _measure(model, threads, delegate, mode=mode, streams=streams, profile_ops=profile_ops,
                               on_report=on_report, on_error=on_error, runs=runs, warmup=warmup, min_secs=min_secs,
                               input=input_, backend=backend, seed=seed, edgetpu_device=edgetpu_device,
                               progress=bar.to if bar.on else None)
    except expected as e:
        raise fail(e) from None
    except KeyboardInterrupt:
        raise fail("interrupted") from None
    emit(reports, out=out, as_json=as_json)
    if not as_json:
        _echo_across(reports)
    if failures:
        raise fail(f"{len(failures)} of {len(failures) + len(reports)} settings failed (see above)")


def _echo_summary(r: dict) -> None:
    """One setting's summary (and its per-op profile), as soon as it reports."""
    from edgepipe.device.report import format_summary

    click.echo(format_summary(r))
    if r.get("profile"):
        from edgepipe.device.profiler import format_profile

        click.echo(format_profile(r["profile"]))
    click.echo("")


def _echo_across(reports: List[dict]) -> None:
    """What compares the settings: the threads x delegate table and the thread sweep's verdict."""
    if len(reports) > 1:
        from edgepipe.device.report import format_comparison

        click.echo(format_comparison(reports))
    sweep = (reports[0].get("settings") or {}).get("thread_sweep") if reports else None
    if sweep:
        from edgepipe.device.sweep import format_sweep

        click.echo(format_sweep(sweep))


class _RunsBar:
    """The current setting's progress bar, drawn from its first progress call and cleared when it reports."""

    def __init__(self, total: Optional[int], on: bool):
        self.total, self.on, self._bar = total, on, None

    def to(self, n: int) -> None:
        if self._bar is None:
            from edgepipe.device.progress import Bar

            self._bar = Bar(self.total, "timed runs", unit="run", on=True, leave=False)
        self._bar.to(n)

    def done(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> "_RunsBar":
        return self

    def __exit__(self, *exc) -> None:
        self.done()


def _check_mode(mode: str, streams: Optional[int], profile_ops: bool, threads: list) -> None:
    if streams is not None and mode != "throughput":
        raise click.UsageError("--streams needs --mode throughput")
    if profile_ops and (mode == "throughput" or threads == [AUTO]):
        raise click.UsageError("--profile-ops profiles one request at a time: use it with --mode latency "
                               "and a fixed --threads")


def _measure(model, threads: list, delegates: List[str], *, mode: str, streams: Optional[int], profile_ops: bool,
             on_report, on_error, progress=None, **kw) -> List[dict]:
    """The benches the flags ask for: a thread sweep, throughput runs, or the latency matrix."""
    from edgepipe.device.bench import run_matrix

    if threads == [AUTO]:
        from edgepipe.device.sweep import run_sweep

        return [r for d in delegates for r in run_sweep(model, delegate=d, on_report=on_report, **kw)]
    if mode == "throughput":
        from edgepipe.device.throughput import run_throughput

        reports = []
        for d in delegates:
            for t in threads:
                try:
                    reports.append(run_throughput(model, streams=streams, threads=t, delegate=d, **kw))
                except Exception as e:  # noqa: BLE001 - the same per-setting policy as run_matrix
                    if on_error(f"delegate {d}, threads {t or 1}, throughput", e):
                        continue
                    raise
                on_report(reports[-1])
        return reports
    return run_matrix(model, threads=threads, delegates=delegates, on_report=on_report, on_error=on_error,
                      profile_ops=profile_ops, progress=progress, **kw)


def emit(reports: List[dict], *, out: Optional[str], as_json: bool) -> None:
    """Hand finished reports to their destinations: --out file, --json stdout, --report-to collector."""
    if not reports:
        return
    payload = reports[0] if len(reports) == 1 else reports
    save_and_echo(payload, out, as_json)
    from edgepipe.device.cli_report import send_reports

    problem = send_reports(reports)
    sys.stdout.flush()
    if problem:  # measured, but the report is neither delivered nor on its way: the user must act
        raise fail(problem)
