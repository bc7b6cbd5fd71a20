"""The agent's evaluation-data store: preprocessed inputs as ``.npy`` blobs keyed by their sha256.

An ``evaluate`` job runs a bundle over a blob of model inputs the host
preprocessed with the bundle's own preprocessing (``edgepipe evaluate
--device``). A blob is a single ``.npy`` file, not an archive: there is
nothing to extract, so no member can escape the directory, and its header
(dtype, shape) is checked against its length before it is accepted. Object
arrays (pickles) are refused; the file is read back with ``allow_pickle=False``.

Uploads stream to a scratch file while hashed, are checked against the digest
in the URL and only then renamed into ``<store>/.data/<sha>.npy``. The store
is bounded like the bundle store: one blob at most ``max_bytes``, all of them
under ``quota_bytes``, making room by evicting the least recently used blobs
no queued or running job needs (``in_use``).
"""
from __future__ import annotations

import os
import threading
import uuid
from pathlib import Path
from typing import BinaryIO, Callable, Optional

import numpy as np

from edgepipe.device.bundle_store import SHA_RE, UploadError, receive_checked

DATA_DIR = ".data"
DEFAULT_MAX_BYTES = 64 << 20
MAX_ROWS = 100_000
MAX_RANK = 6
# Numeric dtypes a model input can take (no objects, strings or structured arrays).
DTYPES = ("float32", "float16", "float64", "uint8", "int8", "int16", "int32", "int64")


def check_data_digest(sha) -> str:
    if not isinstance(sha, str) or not SHA_RE.match(sha):
        raise UploadError(400, "data id must be the .npy file's sha256 as 64 lowercase hex digits")
    return sha


class DataStore:
    """``.npy`` blobs under ``root``, bounded per blob and in total."""

    def __init__(self, root: Path, max_bytes: int = DEFAULT_MAX_BYTES, quota_bytes: int = 256 << 20):
        self.root = Path(root)
        self.max_bytes = int(max_bytes)
        self.quota_bytes = int(quota_bytes)
        self.in_use: Callable[[], set] = set  # set by the job core: blobs queued or running jobs need
        self.root.mkdir(parents=True, exist_ok=True)
        for p in self.root.glob(".*.part"):  # an upload interrupted by a crash
            p.unlink(missing_ok=True)
        self._lock = threading.Lock()

    def path(self, sha: str) -> Path:
        return self.root / f"{check_data_digest(sha)}.npy"

    def has(self, sha: str) -> bool:
        return self.path(sha).is_file()

    def _blobs(self) -> list:
        return [p for p in self.root.glob("*.npy") if SHA_RE.match(p.stem)]

    def used_bytes(self) -> int:
        return sum(p.stat().st_size for p in self._blobs())

    def describe(self, sha: str) -> Optional[dict]:
        p = self.path(sha)
        if not p.is_file():
            return None
        with open(p, "rb") as f:
            shape, dtype = read_header(f, p.stat().st_size)
        return {"sha256": sha, "shape": list(shape), "dtype": dtype, "size": p.stat().st_size}

    def touch(self, sha: str) -> None:
        try:
            os.utime(self.path(sha))
        except OSError:
            pass

    def put(self, sha: str, stream: BinaryIO, length: int) -> bool:
        """Store ``length`` bytes of ``.npy`` from ``stream``; True when new.

        Raises :class:`UploadError` (400 bad body or digest, 413 too large,
        422 not a plain numeric ``.npy``, 507 no room beside blobs in use).
        """
        final = self.path(sha)
        if length > self.max_bytes:
            raise UploadError(413, f"data of {length} bytes exceeds this device's limit of {self.max_bytes} "
                                   "bytes; send it in smaller batches")
        tmp = self.root / f".{uuid.uuid4().hex}.part"
        try:
            receive_checked(stream, length, tmp, sha)
            with open(tmp, "rb") as f:
                read_header(f, length)
            with self._lock:
                if final.is_file():
                    self.touch(sha)
                    return False
                self._make_room(length, sha)
                os.replace(tmp, final)
            return True
        finally:
            tmp.unlink(missing_ok=True)

    def _make_room(self, size: int, keep: str) -> None:
        used = self.used_bytes()
        if used + size <= self.quota_bytes:
            return
        pinned = set(self.in_use()) | {keep}
        for p in sorted((p for p in self._blobs() if p.stem not in pinned), key=lambda p: p.stat().st_mtime):
            if used + size <= self.quota_bytes:
                break
            used -= p.stat().st_size
            p.unlink(missing_ok=True)
        if used + size > self.quota_bytes:
            raise UploadError(507, f"data of {size} bytes does not fit: {used} of {self.quota_bytes} bytes are "
                                   "held by data that queued or running jobs need; retry later")


def read_header(f: BinaryIO, length: int) -> tuple:
    """``(shape, dtype name)`` of a plain numeric C-order ``.npy`` whose size is exactly ``length``."""
    fmt = np.lib.format
    try:
        version = fmt.read_magic(f)
        if version not in ((1, 0), (2, 0), (3, 0)):
            raise ValueError(f"unknown .npy version {version}")
        read = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
        shape, fortran, dtype = read(f)  # numpy caps the header size itself (10 KB)
    except (ValueError, OSError, SyntaxError, TypeError) as e:
        raise UploadError(422, f"not a .npy array: {' '.join(str(e).split())[:200]}") from None
    if dtype.name not in DTYPES or dtype.hasobject:
        raise UploadError(422, f"data dtype {dtype.str!r} is not one of {', '.join(DTYPES)}")
    if fortran:
        raise UploadError(422, "data must be a C-order array")
    if not 2 <= len(shape) <= MAX_RANK or not 1 <= shape[0] <= MAX_ROWS or any(d < 1 for d in shape):
        raise UploadError(422, f"data shape {tuple(shape)} must be (images, ...) with 1 to {MAX_ROWS} images "
                               f"and at most {MAX_RANK} dimensions")
    expected = f.tell() + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if expected != length:
        raise UploadError(422, f"data is {length} bytes but its header says {expected}")
    return tuple(int(d) for d in shape), dtype.name


__all__ = ["DATA_DIR", "DataStore", "check_data_digest", "read_header"]
