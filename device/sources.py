"""Frame sources for `edgerun run`: image file, folder, video file, USB camera, Pi camera.

A source yields :class:`Frame` objects in order. File sources hand over the
encoded bytes (decoding is preprocessing, done in worker threads); video and
cameras hand over decoded ndarrays with their channel order. Live sources
(cameras, or a clip played at its own frame rate) run a grabber thread and
keep only the newest frame: frames replaced before the runner took them are
counted as dropped, so a slow model shows up as drops, not as growing lag.

OpenCV (video files, USB cameras) and picamera2 (Pi camera) are optional:
they are imported when such a source is opened, with a one-line hint when
missing.
"""
from __future__ import annotations

import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, List, Optional, Tuple

from edgepipe.device.bundle import ColorOrder, Preprocess
from edgepipe.device.preprocess import IMAGE_EXTENSIONS, list_images
from edgepipe.device.timing import now_ns, ns_to_ms
from edgepipe.device.errors import EdgepipeError

VIDEO_EXTENSIONS = frozenset({".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v", ".mpg", ".mpeg", ".h264",
                              ".mjpeg", ".mjpg", ".wmv", ".flv", ".3gp", ".ts"})
OPENCV_HINT = "pip install opencv-python-headless (or: pip install 'edgepipe[camera]')"
PICAMERA_HINT = ("install picamera2 from Raspberry Pi OS (sudo apt install python3-picamera2) and create the venv "
                 "with --system-site-packages")
CAMERA_SIZE = (640, 480)  # requested from cameras; the model's resize happens in preprocessing


class SourceError(EdgepipeError):
    """A source that cannot be opened or read; the message is one line for the user."""


@dataclass
class Frame:
    """One captured frame.

    ``data`` is encoded bytes (files) or a uint8 ndarray in ``order``
    (video/cameras); ``error`` is set instead when the capture itself failed
    (e.g. an unreadable file), and the runner skips and counts the frame.
    """

    index: int
    name: str
    data: Any
    order: ColorOrder = ColorOrder.RGB
    capture_ms: float = 0.0
    t0_ns: int = 0  # when capture started: end-to-end latency is measured from here
    error: Optional[str] = None
    display: Any = None  # full-size BGR frame to annotate when ``data`` is an ISP-scaled model-size frame


class Source:
    """Base class: iterate for frames, ``close()`` when done (also a context manager)."""

    kind = "source"
    live = False

    def __init__(self, spec: str):
        self.spec = spec
        self.non_images = 0  # files in a folder that are not images (by extension)
        self.dropped = 0  # live sources: frames replaced before they were taken

    def __iter__(self) -> Iterator[Frame]:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self) -> "Source":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def info(self) -> dict:
        """The report's ``input`` block."""
        return {"kind": self.kind, "source": self.spec, "live": self.live}


# --------------------------------------------------------------------------- files


class FileSource(Source):
    """A single image file, or every image in a folder (sorted by name)."""

    def __init__(self, spec: str, paths: List[Path], kind: str, non_images: int = 0):
        super().__init__(spec)
        self.kind = kind
        self.paths = paths
        self.non_images = non_images

    def __iter__(self) -> Iterator[Frame]:
        for i, p in enumerate(self.paths):
            t0 = now_ns()
            try:
                with open(p, "rb") as f:
                    data = f.read()
                err = None if data else "empty file"
            except OSError as e:
                data, err = None, (e.strerror or str(e))
            yield Frame(i, p.name, data, capture_ms=ns_to_ms(now_ns() - t0), t0_ns=t0,
                        error=f"{p.name}: cannot read image ({err})" if err else None)

    def info(self) -> dict:
        d = super().info()
        d.update(files=len(self.paths), non_images=self.non_images)
        return d


# --------------------------------------------------------------------------- OpenCV


def import_cv2():
    """OpenCV, quiet, or SourceError with the install command."""
    # OpenCV logs failed camera probes to stderr; errors reach the user through us.
    os.environ.setdefault("OPENCV_LOG_LEVEL", "ERROR")
    try:
        import cv2  # noqa: PLC0415
    except ImportError as e:
        raise SourceError(f"video files and USB cameras need OpenCV ({e}); {OPENCV_HINT}") from None
    return cv2


class VideoSource(Source):
    """A video file decoded with OpenCV, every frame in order (BGR ndarrays)."""

    kind = "video"

    def __init__(self, spec: str, path: Path):
        super().__init__(spec)
        cv2 = import_cv2()
        if not path.is_file():
            raise SourceError(f"{path}: no such video file")
        self.cap = cv2.VideoCapture(os.fspath(path))
        if not self.cap.isOpened():
            raise SourceError(f"{path}: cannot open video (unsupported format or corrupt file)")
        self.path = path
        self.fps = float(self.cap.get(cv2.CAP_PROP_FPS) or 0.0)
        self.frame_count = int(self.cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
        self.size = (int(self.cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(self.cap.get(cv2.CAP_PROP_FRAME_HEIGHT)))

    def read(self) -> Tuple[Optional[Any], float, int]:
        t0 = now_ns()
        ok, img = self.cap.read()
        return (img if ok else None), ns_to_ms(now_ns() - t0), t0

    def __iter__(self) -> Iterator[Frame]:
        i = 0
        while True:
            img, ms, t0 = self.read()
            if img is None:
                break
            yield Frame(i, f"frame {i}", img, ColorOrder.BGR, ms, t0)
            i += 1
        if i == 0:
            raise SourceError(f"{self.path}: no frames could be decoded")

    def close(self) -> None:
        self.cap.release()

    def info(self) -> dict:
        d = super().info()
        d.update(fps=self.fps or None, frame_count=self.frame_count or None, width=self.size[0],
                 height=self.size[1])
        return d


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


# --------------------------------------------------------------------------- parsing

_CAMERA = re.compile(r"^(camera|picamera)(?::(\d+))?$", re.IGNORECASE)


def open_source(spec: str, *, live: bool = False, model: Optional[Preprocess] = None,
                display: bool = False) -> Source:
    """Open ``spec``: ``camera``, ``camera:N``, ``picamera``, ``picamera:N``, a folder, an image or a video.

    ``live`` replays a video file in real time with the latest-frame policy.
    ``model`` (the model's preprocessing) lets the Pi camera scale frames in
    its ISP; ``display`` asks it for a full-size frame to annotate as well.
    Raises SourceError (one line) for anything that cannot be opened.
    """
    spec = str(spec)
    m = _CAMERA.match(spec.strip())
    if m and not Path(spec).exists():
        kind, idx = m.group(1).lower(), int(m.group(2) or 0)
        return open_camera(spec, idx) if kind == "camera" else open_picamera(spec, idx, model, display)
    p = Path(spec)
    if not p.exists():
        raise SourceError(f"{spec}: no such file or directory (sources: DIR, image, video, camera[:N], "
                          "picamera)")
    if p.is_dir():
        if live:
            raise SourceError("--live needs a video file or a camera")
        try:
            paths, non_images = list_images(p)
        except OSError as e:
            raise SourceError(f"{spec}: cannot list folder ({e.strerror or e})") from None
        if not paths:
            extra = f" ({non_images} other file(s) skipped)" if non_images else ""
            raise SourceError(f"{spec}: no images in folder{extra}")
        return FileSource(spec, paths, "folder", non_images)
    ext = p.suffix.lower()
    if ext in IMAGE_EXTENSIONS:
        if live:
            raise SourceError("--live needs a video file or a camera")
        return FileSource(spec, [p], "image")
    video = VideoSource(spec, p)
    if ext not in VIDEO_EXTENSIONS and not video.frame_count:
        video.close()
        raise SourceError(f"{spec}: not an image or a video file")
    return replay_live(spec, video) if live else video


__all__ = ["Frame", "FileSource", "LatestFrame", "LiveSource", "Source", "SourceError", "VideoSource",
           "import_cv2", "open_camera", "open_picamera", "open_source", "replay_live"]
