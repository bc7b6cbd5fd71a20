"""`edgerun run`: predictions as JSON lines plus a run report (thin click layer over edgepipe.device.runner)."""
from __future__ import annotations

import os
import sys
from typing import Optional

import click

from edgepipe.device.cliout import fail, isolate_option, preflight, save_and_echo


def _report_options(f):
    """`--report-to` / `--report-token` when the collector client (edgepipe.device.send) is installed."""
    try:
        from edgepipe.device.cli_report import report_to_option
    except ImportError:
        return f
    return report_to_option(f)


@click.command()
@click.argument("bundle", metavar="BUNDLE|MODEL", type=click.Path(dir_okay=True, file_okay=True))
@click.option("--source", "-s", required=True, metavar="DIR|IMAGE|VIDEO|camera[:N]|picamera",
              help="Folder of images (sorted; non-images skipped), one image, a video file, a USB camera "
                   "or the Raspberry Pi camera.")
@click.option("--pipeline/--sequential", default=None,
              help="Overlap decoding/preprocessing with inference in worker threads (default for folders, "
                   "video and cameras), or do one frame at a time.")
@click.option("--max-frames", type=click.IntRange(min=1), default=None, help="Stop after N frames.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="CPU threads per interpreter. Default: the runtime's choice.")
@click.option("--delegate", default="cpu", show_default=True, metavar="NAME",
              help="cpu, xnnpack, edgetpu[:usb|:pci|:N], gpu or /path/to/delegate.so.")
@click.option("--backend", default=None, metavar="NAME",
              help="Force a runtime: ai_edge_litert, tflite_runtime or tensorflow.lite.")
@click.option("--edgetpu-device", default=None, metavar="usb|pci|:N", help="Which Edge TPU to use.")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="Preprocessing threads when pipelined. Default: one per core.")
@click.option("--lanes", type=click.IntRange(min=1), default=None,
              help="Interpreter copies invoking in parallel when pipelined (CPU delegate). Default for files and video: "
                   "measured on the first frames (copies x threads per copy) when --lanes, --threads and "
                   "--workers are all unset; 1 for cameras.")
@click.option("--queue-depth", type=click.IntRange(min=1), default=None,
              help="Frames in flight when pipelined. Default: 2 x (workers + lanes); 1 for live sources.")
@click.option("--live", is_flag=True,
              help="Play a video file in real time like a camera (latest-frame policy, drops counted).")
@click.option("--top-k", type=click.IntRange(min=1), default=5, show_default=True,
              help="Classes per prediction for classifiers.")
@click.option("--task", type=click.Choice(["classification", "detection", "segmentation", "other"]), default=None,
              help="What the outputs mean (default: the manifest's; a plain model's outputs are decoded when "
                   "they fit a known detection/segmentation convention, and the assumption is printed).")
@click.option("--score-threshold", type=click.FloatRange(0, 1), default=None,
              help="Detections below this score are dropped (default: the manifest's decoder, else 0.5).")
@click.option("--iou-threshold", type=click.FloatRange(0, 1), default=None,
              help="Non-maximum suppression IoU threshold (default: the manifest's decoder, else 0.5).")
@click.option("--max-detections", type=click.IntRange(1, 10000), default=None,
              help="Most detections kept per frame (default: the manifest's decoder, else 100).")
@click.option("--annotate", "annotate", default=None, type=click.Path(path_type=str), metavar="OUT",
              help="Draw boxes/labels/scores (or masks) on the frames: a folder of JPEGs for image sources, "
                   "an .mp4 for video and cameras (needs OpenCV). Drawn in a worker, off the inference path.")
@click.option("--out", "out", default=None, type=click.Path(dir_okay=False, allow_dash=True),
              help="Write predictions (JSON lines) here instead of stdout.")
@click.option("--report", "report_path", default=None, type=click.Path(dir_okay=False),
              help="Write the run report (JSON, edgepipe.report/1) here.")
@click.option("--json", "as_json", is_flag=True,
              help="Print the report JSON on stdout at the end (needs --out FILE for the predictions).")
@click.option("--quiet", "-q", is_flag=True, help="No summary (and no progress bar) on stderr.")
@isolate_option
@_report_options
def run(bundle, source, pipeline, max_frames, threads, delegate, backend, edgetpu_device, workers, lanes,
        queue_depth, live, top_k, task, score_threshold, iou_threshold, max_detections, annotate, out, report_path,
        as_json, quiet, isolate) -> None:
    """Run a bundle over images, a video or a camera; stream predictions as JSON lines.

    Predictions go to stdout (or --out), one JSON object per frame in frame
    order; a summary with per-stage timings goes to stderr, the full report
    to --report. Unreadable images are skipped, counted and reported. On a
    terminal a progress bar (frames, ETA when the count is known) is drawn on
    stderr; never with --json or --quiet (EDGEPIPE_PROGRESS=0/1 forces).

    \b
    Examples:
      edgerun run out/mobilenet_v2-int8 --source sample_data/images
      edgerun run out/mobilenet_v2-int8 --source sample_data/video/vtest_short.avi --out preds.jsonl --report run.json
      edgerun run out/mobilenet_v2-int8 --source sample_data/images --sequential --max-frames 10
      edgerun run out/mobilenet_v2-int8 --source camera:0 --max-frames 300
      edgerun run model.tflite --source picamera --threads 4
      edgerun run out/ssdlite_person-int8 --source sample_data/video/vtest_short.avi --annotate annotated.mp4
      edgerun run detector.tflite --source photos/ --task detection --score-threshold 0.4 --annotate boxes/
    """
    from edgepipe.device import progress as pg
    from edgepipe.device.errors import EdgepipeError
    from edgepipe.device.decode_stage import Thresholds
    from edgepipe.device.runner import run_source
    from edgepipe.device.sources import open_source

    if as_json and out in (None, "-"):
        raise fail("--json prints the report on stdout: send the predictions elsewhere with --out FILE")
    sink = _Predictions(out)
    try:
        preflight(bundle, isolate=isolate, delegates=[delegate], threads=threads, backend=backend,
                  edgetpu_device=edgetpu_device)
        # Opened here (same spec, same order as run_source would) so the bar knows how many frames come.
        with open_source(source, live=live) as src:
            sink.bar = pg.Bar(frames_total(src, max_frames), "run", unit="frame",
                              on=pg.enabled(as_json=as_json or quiet))
            with sink.bar:  # closed (and cleared) before the summary
                report = run_source(bundle, src, pipeline=pipeline, max_frames=max_frames, threads=threads,
                                    delegate=delegate, backend=backend, edgetpu_device=edgetpu_device,
                                    workers=workers, lanes=lanes, queue_depth=queue_depth, top_k=top_k,
                                    live=live, on_prediction=sink, task=task, annotate=annotate,
                                    thresholds=Thresholds(score_threshold, iou_threshold, max_detections))
    except EdgepipeError as e:  # bundle, source, load, runtime and crash-probe failures: one line each
        raise fail(e) from None
    except KeyboardInterrupt:
        raise fail("interrupted") from None
    finally:
        sink.close()
    finish(report, report_path=report_path, as_json=as_json, quiet=quiet)


class _Predictions:
    """Where the predictions go, one JSON line per frame: stdout (streamed) or --out FILE.

    Called with each prediction record; on a terminal that also shows the
    progress bar (``bar``, replaced once the frame count is known) the line is
    written above the bar.
    """

    def __init__(self, out: Optional[str]):
        from edgepipe.device import progress as pg
        from edgepipe.device.postprocess import json_line

        self._json_line = json_line
        self.to_stdout = out in (None, "-")
        try:
            self.file = sys.stdout if self.to_stdout else open(out, "w", encoding="utf-8")
        except OSError as e:
            raise fail(f"cannot write {out}: {e.strerror or e}") from None
        self.bar = pg.Bar(None, "run", unit="frame", on=False)
        self._above = _above_bar(lambda: self.bar.active and self.to_stdout and _isatty(sys.stdout))

    def __call__(self, rec: dict) -> None:
        try:
            with self._above():
                self.file.write(self._json_line(rec) + "\n")
                if self.to_stdout:
                    self.file.flush()  # stream: a consumer sees each frame as it is done
        except BrokenPipeError:
            # `edgerun run ... | head`: the reader left. Stop cleanly, keep the report.
            from edgepipe.device.runner import StopRun

            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            raise StopRun("the output pipe was closed") from None
        self.bar.update()

    def close(self) -> None:
        if not self.to_stdout:
            self.file.close()


def frames_total(src, max_frames: Optional[int]) -> Optional[int]:
    """Frames the run will take, when known: a folder's images, a video's frame count, or --max-frames.

    A live source (camera, or a video played live, which drops frames) is open-ended unless limited.
    """
    info = src.info()
    known = None if src.live else (info.get("files") or info.get("frame_count") or None)
    if max_frames:
        return min(known, max_frames) if known else max_frames
    return known


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def _above_bar(active):
    """A context for writing a prediction to a terminal that also shows the bar: the bar is lifted
    while the line is written and drawn again below it, so the two never share a line."""
    from contextlib import nullcontext

    def ctx():
        if not active():
            return nullcontext()
        from tqdm import tqdm

        return tqdm.external_write_mode(file=sys.stdout)
    return ctx


def finish(report: dict, *, report_path: Optional[str], as_json: bool, quiet: bool) -> None:
    """Hand the finished report on (file, stdout, collector), then fail if the run had errors.

    Partial results are written before the non-zero exit, so nothing already produced is lost.
    """
    from edgepipe.device.report import format_summary

    save_and_echo(report, report_path, as_json)
    if not quiet:
        click.echo(summary(report, format_summary), err=True)
    problem = None
    try:
        from edgepipe.device.cli_report import send_reports
    except ImportError:
        pass
    else:
        problem = send_reports([report])
    if report["errors"] and problem:
        click.echo(f"Error: {problem}", err=True)
    if report["errors"] or problem:  # a report neither delivered nor on its way: the user must act
        raise fail(report["errors"][0] if report["errors"] else problem)


def summary(report: dict, format_summary) -> str:
    """bench's summary plus the run's stages, mode and counters."""
    lines = [format_summary(report)]
    tp = report.get("throughput") or {}
    st = report.get("stages_ms") or {}
    parts = [f"{k} {v['p50']:.2f}" for k, v in st.items() if v and v.get("n")]
    if parts:
        lines.append("stages p50 (ms)  " + " | ".join(parts))
    s = report.get("settings") or {}
    mode = tp.get("mode")
    if mode == "pipelined":
        mode += f" ({s.get('workers')} workers, {s.get('lanes')} lane(s), queue {s.get('queue_depth')})"
    lines.append(f"frames {tp.get('frames')}  skipped {tp.get('frames_skipped')}  dropped {tp.get('frames_dropped')}"
                 f"  mode {mode}")
    lines += _decoded_lines(report.get("detections"))
    return "\n".join(lines)


def _decoded_lines(block: Optional[dict]) -> list:
    """The decoder, what it assumed, and what it found (detection/segmentation runs)."""
    if not block:
        return []
    dec = block.get("decoder") or {}
    lines = [f"decoder {dec.get('kind')}: " + "; ".join(block.get("assumed") or [])]
    if block.get("task") == "segmentation":
        found = ", ".join(f"{k} {v:.1%}" for k, v in list((block.get("classes") or {}).items())[:6])
        lines.append(f"mean class areas  {found or 'none'}")
    else:
        per = block.get("boxes_per_frame") or {}
        found = ", ".join(f"{k} {v}" for k, v in list((block.get("classes") or {}).items())[:6])
        lines.append(f"detections {block.get('boxes')} ({per.get('mean', 0):.2f}/frame, max {per.get('max')})"
                     f"  classes {found or 'none'}")
    ann = block.get("annotated")
    if ann:
        lines.append(f"annotated {ann.get('frames')} frame(s) -> {ann.get('path')}"
                     + (f"  ERROR {ann['error']}" if ann.get("error") else ""))
    return lines
