"""`edgerun run`: frames from a source -> preprocess -> invoke -> postprocess -> predictions + report.

Two modes with identical predictions (the frame loop is ``edgepipe.device.runloop``):
sequential, and pipelined, where decoding/preprocessing runs in worker threads
overlapped with ``invoke`` through bounded queues. On the CPU delegate several
interpreter copies ("lanes", same numerics) may invoke in parallel; unless
lanes, threads or workers are given, the first frames of a file or video run
measure which split of the cores is fastest (``edgepipe.device.lane_probe``).

Per-stage timings (capture, preprocess, invoke = set_input + invoke +
get_output, postprocess) and end-to-end latency use :func:`edgepipe.device.timing.stats`
like ``edgerun bench``. Errors before the first frame raise (one line); errors
after it are recorded in the report's ``errors`` and the partial results are
kept.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field, replace
from itertools import islice
from typing import Any, Callable, List, Optional, Tuple, Union

import numpy as np

from edgepipe.device.bundle import load_bundle
from edgepipe.device.postprocess import Postprocessor, infer_task
from edgepipe.device.runloop import STAGES, FrameLoop, LanePool, LoopStats, StopRun, make_prep
from edgepipe.device.sources import Source, SourceError, open_source
from edgepipe.device.throughput import cores as usable_cores, default_streams
from edgepipe.device.timing import now_ns, ns_to_ms, stats
from edgepipe.device.errors import NATIVE_ERRORS, EdgepipeError
from edgepipe.device.lane_probe import lanes_that_fit, open_probe

MAX_WARNED_SKIPS = 5


class RunError(EdgepipeError):
    """A run that cannot start; the message is one line for the user."""


def _image_input(loaded) -> Any:
    if len(loaded.inputs) != 1 or len(loaded.inputs[0].shape) != 4:
        shapes = ", ".join(str(tuple(t.shape)) for t in loaded.inputs)
        raise RunError(f"edgerun run needs a model with one image input (N, H, W, C); this one takes {shapes}")
    return loaded.inputs[0]


@dataclass(frozen=True)
class _Plan:
    """How the frames will flow: mode, preprocessing workers, interpreter lanes, queue depth, whether the
    first frames measure the lanes/threads split (``threads``: what the probe chose)."""

    pipelined: bool
    workers: int
    lanes: int
    depth_asked: Optional[int] = None
    depth: int = 1
    probe: bool = False
    threads: Optional[int] = None


@dataclass
class _Model:
    """What the frame loop needs about the model: its tensor, pre/postprocessing and what was assumed."""

    loaded: Any
    cold: bool
    tensor: Any
    pre: Any
    post: Postprocessor
    assumed: List[str]
    zeros: np.ndarray
    decode: Any = None  # DecodeStage for detection/segmentation runs


@dataclass
class _Outcome:
    """What the frame loop left behind besides its stats."""

    errors: List[str] = field(default_factory=list)
    warnings: List[str] = field(default_factory=list)
    probe: Optional[dict] = None
    lane_ms: List[float] = field(default_factory=list)
    cpu_ms: float = 0.0
    predictions: int = 0
    annotated: Optional[dict] = None
    info: dict = field(default_factory=dict)
    dropped: int = 0


def run_source(bundle_path: os.PathLike, source: Union[str, Source], *, pipeline: Optional[bool] = None,
               max_frames: Optional[int] = None, threads: Optional[int] = None, delegate: str = "cpu",
               on_prediction: Optional[Callable[[dict], None]] = None, loaded=None,
               backend: Optional[str] = None, edgetpu_device: Optional[str] = None,
               workers: Optional[int] = None, lanes: Optional[int] = None, queue_depth: Optional[int] = None,
               top_k: int = 5, live: bool = False, task: Optional[str] = None, thresholds: Any = None,
               annotate: Optional[os.PathLike] = None) -> dict:
    """Run a bundle (or ``.tflite``) over a source; returns a ``run`` report.

    ``source`` is a :class:`edgepipe.device.sources.Source` or a spec for
    :func:`edgepipe.device.sources.open_source` (DIR, image, video, ``camera[:N]``,
    ``picamera``). ``pipeline`` None picks pipelined for folders, video and
    cameras, sequential for one image. ``workers`` preprocessing threads and
    ``lanes`` interpreter copies (CPU delegate only) default to the core
    count, and when none of them nor ``threads`` is given a file or video
    run measures the lanes/threads split on its first frames
    (``edgepipe.device.lane_probe``); ``loaded`` reuses a warm model (the agent's). ``on_prediction``
    gets each record in frame order. ``task`` (detection, segmentation, ...)
    overrides the manifest's; ``thresholds`` (a decode_stage.Thresholds)
    override the decoder's; ``annotate`` writes annotated frames there (a
    JPEG folder for images, an MP4 for video/cameras). Raises RunError,
    BundleError, SourceError, DecodeError, AnnotateError,
    edgepipe.device.runtime.RuntimeLoadError or ModelRunError before the
    first frame.
    """
    from edgepipe.device import sysinfo
    from edgepipe.device.bench import model_for  # the Edge TPU-compiled model when asked for the TPU

    if max_frames is not None and max_frames < 1:
        raise RunError("the frame limit must be at least 1", param="max_frames")
    bundle = load_bundle(bundle_path)
    model_path = model_for(bundle, delegate)
    load = dict(backend=backend, delegate=delegate, threads=threads, edgetpu_device=edgetpu_device)
    device = sysinfo.device_info()
    start = sysinfo.start_snapshot(device)
    # A Pi camera scales frames to the model in its ISP; annotated runs keep full-size frames to draw on.
    pre = bundle.manifest.preprocess if bundle.manifest is not None and annotate is None else None
    src = open_source(source, live=live, model=pre) if isinstance(source, (str, os.PathLike)) else source
    owned = src is not source
    try:
        model = _prepare_model(bundle, model_path, loaded, load, top_k, task, thresholds)
        plan = _plan(src, model, pipeline, workers, lanes, queue_depth, threads)
        annotated = _start_annotating(model, annotate, src)
        try:
            runner, plan, out = _drive(src, model, plan, model_path, load, max_frames, on_prediction)
        finally:
            annotated = _finish_annotating(model, annotated)
        out.annotated, out.info, out.dropped = annotated, src.info(), src.dropped
    finally:
        if owned:
            src.close()
    settings = {"threads": threads, "delegate": delegate, "backend": backend, "max_frames": max_frames,
                "top_k": top_k, "live": src.live, "model_path": os.fspath(model_path)}
    return _finish_report(bundle, model_path, model, plan, runner, out, src, settings, device, start)


def _finish_report(bundle, model_path, model: "_Model", plan: "_Plan", runner: FrameLoop, out: "_Outcome",
                   src: Source, settings: dict, device: dict, start: dict) -> dict:
    """The run report: the device's end state, stats, detections, warnings and errors."""
    from edgepipe.device import sysinfo

    end = sysinfo.snapshot()
    device["temperature_c"]["end"] = end["temperature_c"]
    device["throttled"]["end"] = end["throttled"]
    report = _run_report(bundle, model_path, model, plan, runner.st, out, device, settings)
    if model.decode is not None:
        report["detections"] = model.decode.report_block(out.annotated)
        out.errors.extend([out.annotated["error"]] if out.annotated and out.annotated.get("error") else [])
    report["warnings"].extend(_warnings(start, end, model.loaded, runner.st, out.dropped, src) + out.warnings)
    report["errors"].extend(out.errors)
    return report


def _prepare_model(bundle, model_path, loaded, load: dict, top_k: int, task: Optional[str] = None,
                   thresholds: Any = None) -> _Model:
    """Load (unless warm), pick pre/postprocessing from the manifest or infer them, and warm up once."""
    from edgepipe.device.bundle import Task
    from edgepipe.device.decode_stage import DecodeStage, Thresholds, decoder_for

    from edgepipe.device.inputs import assumed_preprocess
    from edgepipe.device.runtime import Stage, load_model, model_stage

    cold = loaded is None
    if cold:
        loaded = load_model(model_path, **load)
    tensor = _image_input(loaded)
    manifest = bundle.manifest
    assumed: List[str] = []
    pre = manifest.preprocess if manifest and manifest.preprocess else None
    if pre is None:
        pre, notes = assumed_preprocess(tensor)
        assumed += notes
    asked = Task(task) if task else None
    if manifest is not None:
        labels = bundle.labels
        kind = asked or manifest.task
    else:
        kind, notes = infer_task(loaded.outputs)
        labels = ()
        if asked is None and kind == Task.OTHER:
            kind = None  # a plain model: decoded when its outputs fit a known convention
        else:
            assumed += notes if asked is None else []
            kind = asked or kind
    decode = None
    if kind != Task.CLASSIFICATION:
        spec, notes = decoder_for(manifest, kind, loaded.outputs, thresholds or Thresholds())
        if spec is not None:
            decode = DecodeStage(spec, loaded.outputs, labels, pre, notes)
            kind = decode.task
            assumed += notes
        elif manifest is None and kind is None:
            assumed += infer_task(loaded.outputs)[1]
    post = Postprocessor(loaded.outputs, kind or Task.OTHER, labels, top_k=top_k)
    # Warm-up outside the timed window: the first invoke pays one-off costs.
    zeros = np.zeros(tensor.shape, dtype=np.dtype(tensor.dtype))
    with model_stage(loaded.path, Stage.SET_INPUTS):
        loaded.set_input(0, zeros)
    if cold:
        loaded.first_invoke()
    else:
        with model_stage(loaded.path, Stage.WARMUP):
            loaded.invoke()
    return _Model(loaded, cold, tensor, pre, post, assumed, zeros, decode)


def _plan(src: Source, model: _Model, pipeline: Optional[bool], workers: Optional[int], lanes: Optional[int],
          queue_depth: Optional[int], threads: Optional[int]) -> _Plan:
    many = src.kind != "image"
    use_pipeline = many if pipeline is None else bool(pipeline)
    cores = usable_cores()
    cpu = model.loaded.delegate.split(":")[0].lower() in ("cpu", "xnnpack")
    if not use_pipeline:
        return _Plan(False, max(1, workers or cores), 1, queue_depth)
    if (lanes or 1) > 1 and not cpu:
        raise RunError(f"several interpreter lanes need the CPU delegate (got {model.loaded.delegate}); "
                       "use --lanes 1")
    auto = cpu and many and not src.live  # files and video on the CPU: several lanes unless told otherwise
    # Lanes x threads within the cores: XNNPACK's pool threads spin while they wait.
    n_lanes = lanes or (default_streams(threads, model.loaded.model_size, cores) if auto else 1)
    # Nothing given: the first frames measure the split (a live source cannot wait for it).
    probe = auto and cores > 1 and not (lanes or threads or workers)
    return _Plan(True, max(1, workers or cores), n_lanes, queue_depth, probe=probe)


def _drive(src: Source, model: _Model, plan: _Plan, model_path, load: dict, max_frames: Optional[int],
           on_prediction) -> Tuple[FrameLoop, _Plan, _Outcome]:
    """Load the lanes (or the probe's candidates), then run the frame loop; errors after frame 0 are recorded."""
    out = _Outcome()
    prep = make_prep(model.pre, model.tensor, sizes=model.decode is not None)
    frames = islice(iter(src), max_frames) if max_frames else iter(src)
    probe = None
    if plan.probe:  # the candidates' interpreters load before the clock starts
        probe = open_probe(model.loaded, usable_cores(), lambda n: lanes_that_fit(n, model.loaded.model_size),
                           lambda n, t: _load_copies(n, model_path, dict(load, threads=t), model.zeros, out))
    if probe is not None:
        pool = LanePool([model.loaded])  # every frame is routed by the probe
    else:
        pool = LanePool([model.loaded] + _load_copies(plan.lanes - 1, model_path, load, model.zeros, out))
    width = probe.width if probe is not None else pool.size
    depth = plan.depth_asked or (1 if src.live else 2 * (plan.workers + width))
    plan = replace(plan, lanes=width, depth=max(1, depth))

    def emit(rec: dict) -> None:
        out.predictions += 1
        if on_prediction is not None:
            on_prediction(rec)

    runner = FrameLoop(pool, prep, model.post, emit, model.decode)
    cpu0 = time.process_time()
    _loop(runner, frames, plan, out, probe)
    out.cpu_ms = (time.process_time() - cpu0) * 1000.0
    if probe is not None and probe.chosen is not None:
        plan = replace(plan, lanes=probe.chosen.lanes, threads=probe.chosen.threads)
        out.probe = probe.report()
    return runner, plan, out


def _load_copies(n: int, model_path, load: dict, zeros: np.ndarray, out: _Outcome) -> list:
    """Interpreter copies load before the clock starts: a copy loading while frames run would steal the CPU the
    measurement is about. A copy that fails is a warning; the run goes on with the ones it has."""
    from edgepipe.device.runtime import load_model

    copies = []
    for _ in range(max(0, n)):
        t0 = now_ns()
        try:
            m = load_model(model_path, **load)
            m.set_input(0, zeros)
            m.invoke()
        except Exception as e:  # noqa: BLE001 - the run goes on with the lanes it has
            out.warnings.append(f"extra interpreter lane failed to load: {e}")
            break
        out.lane_ms.append(ns_to_ms(now_ns() - t0))
        copies.append(m)
    return copies


def _loop(runner: FrameLoop, frames, plan: _Plan, out: _Outcome, probe=None) -> None:
    try:
        if plan.pipelined:
            runner.pipelined(frames, plan.workers, plan.lanes, plan.depth, probe)
        else:
            runner.sequential(frames)
    except KeyboardInterrupt:
        out.errors.append(f"interrupted after {runner.st.frames} frame(s)")
    except StopRun as e:
        out.warnings.append(f"stopped after {runner.st.frames} frame(s): {e or 'by the consumer'}")
    except SourceError as e:
        out.errors.append(str(e))
    except (*NATIVE_ERRORS, OSError, EdgepipeError) as e:
        out.errors.append(f"run failed after {runner.st.frames} frame(s): {type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}")


def _start_annotating(model: _Model, annotate: Optional[os.PathLike], src: Source) -> Optional[dict]:
    """Open the annotator (a worker thread) for a decoding run; None when not asked."""
    if annotate is None:
        return None
    if model.decode is None:
        raise RunError("annotated output needs a detection or segmentation model (this one runs as "
                       f"{model.post.task.value})")
    from edgepipe.device.decode_stage import open_annotator

    info = src.info()
    model.decode.annotator = open_annotator(annotate, src.kind, info.get("fps"), str(info.get("source") or ""))
    return {"path": os.path.abspath(model.decode.annotator.out), "kind": model.decode.annotator.kind}


def _finish_annotating(model: _Model, annotated: Optional[dict]) -> Optional[dict]:
    """Drain the annotation queue and close the output; its failure is recorded, not raised."""
    if annotated is None or model.decode is None or model.decode.annotator is None:
        return annotated
    from edgepipe.device.annotate import AnnotateError

    try:
        annotated["frames"] = model.decode.annotator.close()
    except AnnotateError as e:
        annotated["error"] = str(e)
        annotated["frames"] = model.decode.annotator.written
    model.decode.annotator = None
    return annotated


def _run_report(bundle, model_path, model: _Model, plan: _Plan, st: LoopStats, out: _Outcome, device: dict,
                settings: dict) -> dict:
    from edgepipe.device import sysinfo
    from edgepipe.device.bench import model_block
    from edgepipe.device.report import new_report

    if st.frames == 0 and not out.errors:
        out.errors.append(f"no frame could be processed ({len(st.skipped)} unreadable)" if st.skipped
                          else "the source produced no frames")
    wall_ms = ns_to_ms(st.t_last - st.t_first) if st.frames and st.t_last and st.t_first else None
    runtime = model.loaded.runtime_dict()
    runtime["load"] = "cold" if model.cold else "warm"
    if plan.threads is not None:
        runtime["threads"] = plan.threads  # the probe's pick ran most frames
    info = out.info
    info.update(unreadable=len(st.skipped), assumed=model.assumed + list(model.pre.assumed),
                preprocess=model.pre.to_dict(), task=model.post.task.value)
    p = plan
    settings = dict(settings, pipeline=p.pipelined, workers=p.workers, lanes=p.lanes, queue_depth=p.depth,
                    wall_ms=wall_ms, process_cpu_ms=out.cpu_ms, predictions=out.predictions,
                    lane_load_ms=out.lane_ms or None, lane_probe=out.probe)
    return new_report(
        "run", device=device, runtime=runtime, model=model_block(bundle, model_path),
        load_ms=dict(model.loaded.load_ms) if model.cold else None,
        latency_ms=stats(st.latency),
        stages_ms={s: stats(v) for s, v in st.samples.items()},
        throughput=_throughput(st, p, wall_ms, out.dropped), peak_rss_mb=sysinfo.peak_rss_mb(), input=info,
        settings=settings,
    )


def _throughput(st: LoopStats, p: _Plan, wall_ms: Optional[float], dropped: int) -> dict:
    return {"fps": (st.frames / (wall_ms / 1000.0)) if wall_ms else None,
            "mode": "pipelined" if p.pipelined else "sequential", "workers": p.workers if p.pipelined else 1,
            "queue_depth": p.depth if p.pipelined else None, "frames": st.frames, "frames_dropped": dropped,
            "frames_skipped": len(st.skipped)}


def _warnings(start: dict, end: dict, loaded, st: LoopStats, dropped: int, src: Source) -> List[str]:
    out: List[str] = []
    try:
        # governor, throttling, heat, CPU fallback
        from edgepipe.device.bench import resource_warnings as bench_warnings
        out.extend(bench_warnings(start, end, loaded, None))
    except ImportError:
        pass
    if st.skipped:
        shown = "; ".join(st.skipped[:MAX_WARNED_SKIPS])
        more = f" (+{len(st.skipped) - MAX_WARNED_SKIPS} more)" if len(st.skipped) > MAX_WARNED_SKIPS else ""
        out.append(f"skipped {len(st.skipped)} unreadable frame(s): {shown}{more}")
    if src.non_images:
        out.append(f"skipped {src.non_images} non-image file(s) in the folder")
    if dropped:
        out.append(f"dropped {dropped} live frame(s): the model is slower than the source "
                   "(latest-frame policy)")
    return out


__all__ = ["RunError", "STAGES", "StopRun", "run_source"]
