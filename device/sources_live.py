"""Live sources for `edgerun run`: USB camera, Pi camera, or a clip replayed in real time.

A grabber thread (:class:`LatestFrame`) keeps only the newest frame: frames
replaced before the runner took them are counted as dropped, so a slow model
shows up as drops, not as growing lag. :func:`edgepipe.device.sources.open_source`
opens these; they live apart because they start threads and need the camera
libraries, which a folder or a video file never does.
"""
from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional, Tuple

from edgepipe.device.bundle import ColorOrder, Preprocess
from edgepipe.device.sources import CAMERA_SIZE, PICAMERA_HINT, Frame, Source, SourceError, import_cv2
from edgepipe.device.timing import now_ns, ns_to_ms

if TYPE_CHECKING:
    from edgepipe.device.sources import VideoSource


class LatestFrame:
    """A grabber thread keeping only the newest frame (the live-camera policy).

    ``grab()`` returns ``(array or None at end, capture_ms, t0_ns)``. Frames
    that are replaced before :meth:`take` saw them count as ``dropped``.
    """

    def __init__(self, grab: Callable[[], Tuple[Optional[Any], float, int]], name: str = "grabber"):
        self._grab = grab
        self._cond = threading.Condition()
        self._slot: Optional[Tuple[int, Any, float, int]] = None
        self._seq = 0
        self._done = False
        self._error: Optional[BaseException] = None
        self.dropped = 0
        self.grabbed = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                img, ms, t0 = self._grab()
                if img is None:
                    break
                with self._cond:
                    if self._slot is not None:
                        self.dropped += 1
                    self._slot = (self._seq, img, ms, t0)
                    self._seq += 1
                    self.grabbed += 1
                    self._cond.notify_all()
        except BaseException as e:  # noqa: BLE001 - re-raised in the consumer thread
            self._error = e
        finally:
            with self._cond:
                self._done = True
                self._cond.notify_all()

    def take(self, timeout: Optional[float] = None) -> Optional[Tuple[int, Any, float, int]]:
        """The newest frame not taken yet; blocks; None when the source ended."""
        with self._cond:
            deadline = None if timeout is None else time.monotonic() + timeout
            while self._slot is None and not self._done:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise SourceError("no frame arrived within "
                                      f"{timeout:.0f} s (camera stalled or disconnected)")
                self._cond.wait(left)
            if self._error is not None and self._slot is None:
                raise SourceError(f"capture failed: {self._error}")
            item, self._slot = self._slot, None
            return item

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5.0)


class LiveSource(Source):
    """A live stream (USB camera, Pi camera, or a clip replayed in real time), latest-frame policy."""

    live = True
    first_frame_timeout = 10.0

    def __init__(self, spec: str, kind: str, grab: Callable, order: ColorOrder, closer: Callable[[], None],
                 extra: Optional[dict] = None, paired: bool = False):
        super().__init__(spec)
        self.kind = kind
        self.order = order
        self._paired = paired  # grab() returns (model frame, display frame) pairs
        self._closer = closer
        self._extra = dict(extra or {})
        self._grabber = LatestFrame(grab, name=f"{kind}-grabber")

    @property
    def dropped(self) -> int:  # type: ignore[override]
        return self._grabber.dropped if hasattr(self, "_grabber") else 0

    @dropped.setter
    def dropped(self, value: int) -> None:
        pass  # counted by the grabber

    def __iter__(self) -> Iterator[Frame]:
        n = 0
        while True:
            item = self._grabber.take(timeout=self.first_frame_timeout)
            if item is None:
                if n == 0:
                    raise SourceError(f"{self.spec}: no frames arrived")
                return
            seq, img, ms, t0 = item
            img, display = img if self._paired else (img, None)
            yield Frame(seq, f"frame {seq}", img, self.order, ms, t0, display=display)
            n += 1

    def close(self) -> None:
        self._grabber.stop()
        self._closer()

    def info(self) -> dict:
        d = super().info()
        d.update(self._extra, grabbed=self._grabber.grabbed, dropped=self._grabber.dropped)
        return d


def open_camera(spec: str, index: int, size: Tuple[int, int] = CAMERA_SIZE) -> LiveSource:
    """USB/V4L2 camera ``index`` via OpenCV."""
    cv2 = import_cv2()
    cap = cv2.VideoCapture(index)
    if not cap.isOpened():
        cap.release()
        dev = f"/dev/video{index}"
        seen = sorted(p.name for p in Path("/dev").glob("video*")) if Path("/dev").is_dir() else []
        hint = f"cameras visible: {', '.join(seen)}" if seen else "no /dev/video* devices are visible"
        raise SourceError(f"no camera at index {index} ({dev} cannot be opened; {hint})")
    cap.set(cv2.CAP_PROP_FRAME_WIDTH, size[0])
    cap.set(cv2.CAP_PROP_FRAME_HEIGHT, size[1])
    # Keep the driver's own queue short so "latest" really is the latest.
    cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)

    def grab():
        t0 = now_ns()
        ok, img = cap.read()
        return (img if ok else None), ns_to_ms(now_ns() - t0), t0

    return LiveSource(spec, "camera", grab, ColorOrder.BGR, cap.release, {"index": index})


def open_picamera(spec: str, index: int = 0, model: Optional[Preprocess] = None,
                  display: bool = False) -> LiveSource:
    """Pi camera via picamera2; with ``model`` its ISP scales frames to the model (:mod:`edgepipe.device.picam`).

    ``display`` adds a 640x480 frame of the same instant to annotate.
    """
    try:
        from picamera2 import Picamera2  # noqa: PLC0415
    except ImportError as e:
        raise SourceError(f"picamera needs the picamera2 package ({e}); {PICAMERA_HINT}") from None
    from edgepipe.device.picam import start_picamera  # noqa: PLC0415
    try:
        cam = start_picamera(Picamera2, index, model, display)
    except Exception as e:  # noqa: BLE001 - libcamera raises many types; one line for the user
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise SourceError(f"no usable Raspberry Pi camera {index} ({msg}); check the ribbon cable and "
                          "'rpicam-hello --list-cameras'") from None
    order = ColorOrder.RGB if cam.plan.display is not None else cam.plan.order

    def grab():
        t0 = now_ns()
        img, _order, shown = cam.grab()
        return (img, shown), ns_to_ms(now_ns() - t0), t0

    streams = {"model_stream": list(cam.plan.model)}
    if cam.plan.display:
        streams["display_stream"] = list(cam.plan.display)
    return LiveSource(spec, "picamera", grab, order, cam.close, {"index": index, **streams}, paired=True)


def replay_live(spec: str, video: VideoSource, speed: float = 1.0) -> LiveSource:
    """A video file played at its own frame rate as if it were a camera (latest-frame policy)."""
    fps = (video.fps or 30.0) * speed
    period_ns = int(1e9 / fps)
    state = {"next": None}

    def grab():
        now = now_ns()
        if state["next"] is None:
            state["next"] = now
        wait = state["next"] - now
        if wait > 0:
            time.sleep(wait / 1e9)
        state["next"] += period_ns
        return video.read()

    return LiveSource(spec, "video-live", grab, ColorOrder.BGR, video.close,
                      {"fps": video.fps or None, "frame_count": video.frame_count or None, "speed": speed})


__all__ = ["LatestFrame", "LiveSource", "open_camera", "open_picamera", "replay_live"]
