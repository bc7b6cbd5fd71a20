"""Frame sources for `edgerun run`: image file, folder, video file, USB camera, Pi camera.

A source yields :class:`Frame` objects in order. File sources hand over the
encoded bytes (decoding is preprocessing, done in worker threads); video and
cameras hand over decoded ndarrays with their channel order. Live sources
(cameras, or a clip played at its own frame rate; :mod:`edgepipe.device.sources_live`)
run a grabber thread and keep only the newest frame: frames replaced before
the runner took them are counted as dropped, so a slow model shows up as
drops, not as growing lag.

OpenCV (video files, USB cameras) and picamera2 (Pi camera) are optional:
they are imported when such a source is opened, with a one-line hint when
missing.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, List, Optional, Tuple

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
        from edgepipe.device.sources_live import open_camera, open_picamera  # noqa: PLC0415
        kind, idx = m.group(1).lower(), int(m.group(2) or 0)
        return open_camera(spec, idx) if kind == "camera" else open_picamera(spec, idx, model, display)
    p = Path(spec)
    if not p.exists():
        raise SourceError(f"{spec}: no such file or directory (sources: DIR, image, video, camera[:N], "
                          "picamera)")
    if p.is_dir():
        if live:
            raise SourceError("a live replay needs a video file or a camera", param="live")
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
            raise SourceError("a live replay needs a video file or a camera", param="live")
        return FileSource(spec, [p], "image")
    video = VideoSource(spec, p)
    if ext not in VIDEO_EXTENSIONS and not video.frame_count:
        video.close()
        raise SourceError(f"{spec}: not an image or a video file")
    if not live:
        return video
    from edgepipe.device.sources_live import replay_live  # noqa: PLC0415
    return replay_live(spec, video)


_LIVE = frozenset({"LatestFrame", "LiveSource", "open_camera", "open_picamera", "replay_live"})


def __getattr__(name: str):
    # The live sources moved to sources_live (loaded only when a live source is opened); keep their old names here.
    if name in _LIVE:
        from edgepipe.device import sources_live  # noqa: PLC0415
        return getattr(sources_live, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["CAMERA_SIZE", "Frame", "FileSource", "Source", "SourceError", "VideoSource", "import_cv2", "open_source"]
