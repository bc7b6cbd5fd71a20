"""The frame loop of `edgerun run`: sequential or pipelined, frames kept in order.

Sequential: one thread does capture, preprocess, invoke, postprocess per frame.
Pipelined: a reader thread captures frames in order and hands each to a pool of
preprocessing workers, then to the interpreter lane(s), through a bounded
queue; the calling thread takes results in frame order and postprocesses them.
``invoke`` releases the GIL, so decoding frame n+1 overlaps inference on frame
n. Lanes are interpreter copies of one model (same numerics); a lane probe
(``edgepipe.device.lane_probe``) may route the first frames through several
pools of them to measure which split of the cores is fastest.
"""
from __future__ import annotations

import io
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, List, Optional, Sequence, Tuple

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


class LanePool:
    """Interpreters with the same settings, lent to at most ``width`` frames at a time."""

    def __init__(self, models: Sequence[Any], width: Optional[int] = None):
        self._free: "queue.Queue" = queue.Queue()
        for m in models:
            self._free.put(m)
        self.size = len(models)
        self.width = min(self.size, width or self.size)
        self._slots = threading.BoundedSemaphore(self.width)

    def narrowed(self, width: int) -> "LanePool":
        """The same interpreters, at most ``width`` of them busy at once (one copy can never run twice at once:
        both pools lend from one queue)."""
        view = LanePool((), None)
        view._free, view.size, view.width = self._free, self.size, max(1, min(self.size, width))
        view._slots = threading.BoundedSemaphore(view.width)
        return view

    @contextmanager
    def lend(self) -> Iterator[Any]:
        with self._slots:
            model = self._free.get()
            try:
                yield model
            finally:
                self._free.put(model)


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

    def __init__(self, models: LanePool, prep, post: Postprocessor, emit: Callable[[dict], None],
                 decode: Any = None):
        """``models``: the interpreter lanes; ``decode``: a :class:`edgepipe.device.decode_stage.DecodeStage`
        for detection/segmentation."""
        self.models = models
        self.prep = prep
        self.post = post
        self.emit = emit
        self.decode = decode
        self.st = LoopStats()
        if decode is not None:
            self.st.samples["decode"] = []

    def infer(self, p: _Prepared, ticket: Any = None) -> _Result:
        """Invoke on a free lane of ``ticket.pool()`` (the probe's pick for this frame) or of the loop's own."""
        if p.x is None:
            return _Result(None, p)
        with (ticket.pool() if ticket is not None else self.models).lend() as model:
            t0 = now_ns()
            raw = _infer(model, p.x)
            return _Result(raw, p, ns_to_ms(now_ns() - t0))

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

    def pipelined(self, frames, workers: int, lanes: int, depth: int, probe: Any = None) -> None:
        """``lanes``: invoke threads (the widest pool); ``probe``: a :class:`edgepipe.device.lane_probe.LaneProbe`
        that routes each frame (by its position) and is told when each stage of a frame ends."""
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
                for n, frame in enumerate(frames):
                    fp = prep_pool.submit(self._prep_task, frame, probe)
                    ticket = probe.route(n) if probe is not None else None
                    if not put((frame, infer_pool.submit(self._infer_task, fp, ticket))):
                        return
            except BaseException as e:  # noqa: BLE001 - handed to the consumer thread
                put(e)
            finally:
                put(done)

        t = threading.Thread(target=reader, name="edgerun-reader", daemon=True)
        t.start()
        try:
            self._consume(q, done)
        finally:
            stop.set()
            if probe is not None:
                probe.close()  # frames waiting for the probe's choice go on (or are cancelled below)
            while True:  # unblock the reader, then let in-flight work end
                try:
                    q.get_nowait()
                except queue.Empty:
                    break
            t.join(timeout=10.0)
            prep_pool.shutdown(wait=True, cancel_futures=True)
            infer_pool.shutdown(wait=True, cancel_futures=True)

    def _prep_task(self, frame: Frame, probe: Any) -> _Prepared:
        p = self.prep(frame)
        if probe is not None and p.x is not None:
            probe.prepped(p.ms)
        return p

    def _infer_task(self, fp, ticket: Any) -> _Result:
        res = None
        try:
            res = self.infer(fp.result(), ticket)
        finally:
            if ticket is not None:  # also for an unreadable frame or a failure: the next trial may start
                ticket.done(res.invoke_ms if res is not None and res.raw is not None else None)
        return res

    def _consume(self, q: "queue.Queue", done: object) -> None:
        """Take results in frame order and finish them, until the reader is done or hands over its error."""
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            frame, fut = item
            self.finish(frame, fut.result())


__all__ = ["FrameLoop", "LanePool", "LoopStats", "STAGES", "StopRun", "make_prep"]
