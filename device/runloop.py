"""The frame loop of `edgerun run`: sequential or pipelined, frames kept in order.

Sequential: one thread does capture, preprocess, invoke, postprocess per frame.
Pipelined: a reader thread captures frames in order and hands each to a pool of
preprocessing workers, then to the interpreter lane(s), through a bounded
queue; the calling thread takes results in frame order and postprocesses them.
``invoke`` releases the GIL, so decoding frame n+1 overlaps inference on frame
n. Lanes are interpreter copies with identical settings (same numerics).
"""
from __future__ import annotations

import io
import math
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import chain
from typing import Any, Callable, List, Optional, Tuple

import numpy as np

from edgepipe.device.postprocess import Postprocessor
from edgepipe.device.preprocess import ImageError, load_image, to_model_input
from edgepipe.device.sources import Frame
from edgepipe.device.timing import now_ns, ns_to_ms

STAGES = ("capture", "preprocess", "invoke", "postprocess")


class StopRun(Exception):
    """Raised by an ``on_prediction`` callback to end the run early and cleanly (e.g. its reader left)."""


@dataclass
class _Prepared:
    x: Optional[np.ndarray]
    ms: float
    error: Optional[str] = None
    size: Optional[Tuple[int, int]] = None  # the frame's own (w, h), for decoders that map boxes back


@dataclass
class _Result:
    raw: Optional[List[np.ndarray]]
    prep: _Prepared
    invoke_ms: float = 0.0


class LoopStats:
    """Per-frame samples and counters; the report is built from this."""

    def __init__(self):
        self.samples = {s: [] for s in STAGES}
        self.latency: List[float] = []
        self.frames = 0
        self.skipped: List[str] = []
        self.t_first: Optional[int] = None
        self.t_last: Optional[int] = None


def make_prep(pre, tensor, sizes: bool = False) -> Callable[[Frame], _Prepared]:
    """Frame -> model input (timed); an unreadable frame becomes an error record, not an exception.

    ``sizes``: also read each frame's own size (decoders map boxes back to it).
    """
    from edgepipe.device.decode_stage import source_size

    def prep(frame: Frame) -> _Prepared:
        if frame.error:
            return _Prepared(None, 0.0, frame.error)
        t0 = now_ns()
        data = io.BytesIO(frame.data) if isinstance(frame.data, (bytes, bytearray)) else frame.data
        try:
            x = to_model_input(load_image(data, pre, order=frame.order), pre, tensor)
            size = source_size(frame.data) if sizes else None
        except (ImageError, OSError) as e:
            msg = str(e)
            return _Prepared(None, ns_to_ms(now_ns() - t0), msg if frame.name in msg else f"{frame.name}: {msg}")
        return _Prepared(x, ns_to_ms(now_ns() - t0), size=size)
    return prep


def _infer(model, x: np.ndarray) -> List[np.ndarray]:
    model.set_input(0, x)
    model.invoke()
    return [model.get_output(i) for i in range(len(model.outputs))]


class FrameLoop:
    """Runs frames through prep -> a free interpreter lane -> postprocess -> emit, in frame order."""

    def __init__(self, models: "queue.Queue", prep, post: Postprocessor, emit: Callable[[dict], None],
                 decode: Any = None):
        """``decode``: a :class:`edgepipe.device.decode_stage.DecodeStage` for detection/segmentation."""
        self.models = models
        self.prep = prep
        self.post = post
        self.emit = emit
        self.decode = decode
        self.st = LoopStats()
        if decode is not None:
            self.st.samples["decode"] = []

    def infer(self, p: _Prepared) -> _Result:
        if p.x is None:
            return _Result(None, p)
        model = self.models.get()
        try:
            t0 = now_ns()
            raw = _infer(model, p.x)
            return _Result(raw, p, ns_to_ms(now_ns() - t0))
        finally:
            self.models.put(model)

    def finish(self, frame: Frame, res: _Result) -> None:
        """Postprocess and emit one frame, in order, on the calling thread."""
        st = self.st
        if st.t_first is None:
            st.t_first = frame.t0_ns
        if res.raw is None:
            st.skipped.append(res.prep.error or f"{frame.name}: skipped")
            self.emit({"frame": frame.index, "source": frame.name, "error": res.prep.error})
            return
        t0 = now_ns()
        record = {"frame": frame.index, "source": frame.name}
        t_post = t0
        if self.decode is not None:
            result = self.decode.decode(res.raw, res.prep.size)
            t_post = now_ns()
            st.samples["decode"].append(ns_to_ms(t_post - t0))
            record.update(self.decode.record(frame, result))
        else:
            record.update(self.post(res.raw))
        self.emit(record)
        t1 = now_ns()
        # With a decoder, postprocess is what follows decoding (summary, annotation hand-off, output).
        for stage, ms in zip(STAGES, (frame.capture_ms, res.prep.ms, res.invoke_ms, ns_to_ms(t1 - t_post))):
            st.samples[stage].append(ms)
        st.latency.append(ns_to_ms(t1 - frame.t0_ns))
        st.frames += 1
        st.t_last = t1

    def sequential(self, frames) -> None:
        for frame in frames:
            self.finish(frame, self.infer(self.prep(frame)))

    def pipelined(self, frames, workers: int, lanes: int, depth: int) -> None:
        done = object()
        q: "queue.Queue" = queue.Queue(maxsize=depth)
        stop = threading.Event()
        prep_pool = ThreadPoolExecutor(workers, thread_name_prefix="edgerun-prep")
        infer_pool = ThreadPoolExecutor(lanes, thread_name_prefix="edgerun-invoke")

        def put(item) -> bool:
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def reader() -> None:
            try:
                for frame in frames:
                    fp = prep_pool.submit(self.prep, frame)
                    fi = infer_pool.submit(lambda f=fp: self.infer(f.result()))
                    if not put((frame, fi)):
                        return
            except BaseException as e:  # noqa: BLE001 - handed to the consumer thread
                put(e)
            finally:
                put(done)

        t = threading.Thread(target=reader, name="edgerun-reader", daemon=True)
        t.start()
        try:
            while True:
                item = q.get()
                if item is done:
                    break
                if isinstance(item, BaseException):
                    raise item
                frame, fut = item
                self.finish(frame, fut.result())
        finally:
            stop.set()
            while True:  # unblock the reader, then let in-flight work end
                try:
                    q.get_nowait()
                except queue.Empty:
                    break
            t.join(timeout=10.0)
            prep_pool.shutdown(wait=True, cancel_futures=True)
            infer_pool.shutdown(wait=True, cancel_futures=True)


def probe_lanes(frames, prep, loaded, n_lanes: int, cores: int):
    """Pick the number of interpreter lanes from frame 0.

    With every core busy, invoking takes ``cores * i / (p + i)`` cores, where
    p is frame 0's capture + preprocess time and i a warm invoke on it: one
    lane when invoke is clearly the cheaper stage, more as it grows (a copy
    that is not needed costs memory, not CPU). Frame 0 is then run first as
    usual, with its preprocessing reused.
    """
    first = next(frames, None)
    if first is None:
        return n_lanes, None, iter(()), prep
    p0 = prep(first)

    def cached(frame: Frame) -> _Prepared:
        return p0 if frame is first else prep(frame)

    rest = chain([first], frames)
    if p0.x is None:  # unreadable frame 0: no figures, keep the default
        return n_lanes, None, rest, cached
    loaded.set_input(0, p0.x)
    samples = []
    for _ in range(2):
        t0 = now_ns()
        loaded.invoke()
        samples.append(ns_to_ms(now_ns() - t0))
    i_ms, p_ms = min(samples), p0.ms + first.capture_ms
    # A quarter core of slack: an invoke thread that must be busy all the time falls behind on
    # every hiccup (GIL hand-offs, the postprocessing thread), so near the edge take one more lane.
    chosen = max(1, min(n_lanes, math.ceil(cores * i_ms / (p_ms + i_ms) + 0.25)))
    return chosen, {"first": first, "invoke_ms": i_ms, "preprocess_ms": p_ms, "lanes": chosen}, rest, cached


__all__ = ["FrameLoop", "LoopStats", "STAGES", "StopRun", "make_prep", "probe_lanes"]
