"""The agent's bundle store: one directory per uploaded tar, keyed by its sha256.

Uploads are hashed while they stream to disk, checked against the digest in
the URL, extracted with :mod:`edgepipe.device.tarsafe` into a scratch directory, verified
as a bundle and only then renamed into place, so a bundle in the store is
always complete. Uploading the same bytes again is a no-op.

The store is bounded: one bundle may not unpack to more than ``max_bytes``,
and all of them together stay under ``quota_bytes`` by evicting the least
recently used bundles that no queued or running job needs (``in_use``). A
bundle whose job crashed the runtime is marked refused (``.refused/<sha>.json``)
until it is uploaded again with ``force``.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tarfile
import threading
import uuid
from pathlib import Path
from typing import BinaryIO, Callable, Optional

from edgepipe.device.bundle import MANIFEST, MODEL, BundleError, load_bundle
from edgepipe.device.errors import EdgepipeError
from edgepipe.device.tarsafe import UnsafeArchive, safe_extract

SHA_RE = re.compile(r"^[0-9a-f]{64}$")
DEFAULT_MAX_BYTES = 512 << 20
DEFAULT_QUOTA = 2 << 30
INCOMING = ".incoming"
REFUSED = ".refused"
MAX_REASON = 1000


class UploadError(EdgepipeError):
    """A refused upload; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status
        self.reason = reason


def check_digest(sha: str) -> str:
    if not SHA_RE.match(sha or ""):
        raise UploadError(400, "bundle id must be the tar's sha256 as 64 lowercase hex digits")
    return sha


def _du(path: Path) -> int:
    """Bytes of the regular files under ``path``."""
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_size
            except OSError:
                pass
    return total


class BundleStore:
    def __init__(self, root: Path, max_bytes: int = DEFAULT_MAX_BYTES, quota_bytes: int = DEFAULT_QUOTA):
        self.root = Path(root)
        self.max_bytes = int(max_bytes)
        self.quota_bytes = int(quota_bytes)
        # Set by the job core: the bundles queued or running jobs need.
        self.in_use: Callable[[], set] = set
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / REFUSED).mkdir(exist_ok=True)
        # Leftovers of an upload interrupted by a crash are never valid.
        shutil.rmtree(self.root / INCOMING, ignore_errors=True)
        self._lock = threading.Lock()
        self._sizes = {p.name: _du(p) for p in self._dirs()}

    def _dirs(self) -> list:
        return [p for p in self.root.iterdir() if p.is_dir() and SHA_RE.match(p.name)]

    def path(self, sha: str) -> Path:
        return self.root / check_digest(sha)

    def has(self, sha: str) -> bool:
        return self.path(sha).is_dir()

    def touch(self, sha: str) -> None:
        """Mark a bundle as just used (least recently used bundles are evicted first)."""
        try:
            os.utime(self.path(sha))
        except OSError:
            pass

    def used_bytes(self) -> int:
        with self._lock:
            return sum(self._sizes.values())

    def describe(self, sha: str) -> Optional[dict]:
        p = self.path(sha)
        if not p.is_dir():
            return None
        try:
            man = json.loads((p / MANIFEST).read_text("utf-8"))
            name, recipe = man.get("name"), man.get("recipe")
        except (OSError, ValueError, AttributeError):
            name, recipe = (next(iter(sorted(p.glob("*.tflite"))), p).stem, None)
        with self._lock:
            size = self._sizes.get(sha)
        return {"sha256": sha, "name": name, "recipe": recipe, "size": size, "refused": self.refusal(sha)}

    def list(self) -> list:
        return [self.describe(p.name) for p in sorted(self._dirs())]

    # -- refusals ----------------------------------------------------------
    def mark_refused(self, sha: str, reason: str) -> None:
        """Refuse jobs on this bundle (it crashed the runtime) until it is uploaded again with force."""
        tmp = self.root / REFUSED / f".{uuid.uuid4().hex}.tmp"
        tmp.write_text(json.dumps({"reason": " ".join(reason.split())[:MAX_REASON]}), "utf-8")
        os.replace(tmp, self.root / REFUSED / f"{check_digest(sha)}.json")

    def refusal(self, sha: str) -> Optional[str]:
        """Why jobs on this bundle are refused, or None."""
        try:
            doc = json.loads((self.root / REFUSED / f"{check_digest(sha)}.json").read_text("utf-8"))
            return str(doc.get("reason") or "it crashed the runtime")
        except FileNotFoundError:
            return None
        except (OSError, ValueError, AttributeError):
            return "it crashed the runtime"

    def _clear_refusal(self, sha: str) -> None:
        (self.root / REFUSED / f"{sha}.json").unlink(missing_ok=True)

    # -- uploads -----------------------------------------------------------
    def put(self, sha: str, stream: BinaryIO, length: int, *, force: bool = False) -> tuple:
        """Store ``length`` bytes of tar from ``stream``; returns ``(path, new)``.

        ``force`` replaces a stored copy and lifts a refusal. Raises
        :class:`UploadError` (400 bad body, 409 in use, 413 too large,
        422 not a safe bundle, 507 store full of bundles in use).
        """
        check_digest(sha)
        if length > self.max_bytes:
            raise UploadError(413, f"bundle of {length} bytes exceeds this device's limit of {self.max_bytes} bytes")
        final = self.root / sha
        scratch = self.root / INCOMING / uuid.uuid4().hex
        scratch.mkdir(parents=True)
        try:
            tar_path = scratch / "bundle.tar"
            receive_checked(stream, length, tar_path, sha)
            if final.is_dir() and not force:
                self.touch(sha)
                return final, False
            root = self._unpack(tar_path, scratch / "x")
            try:
                load_bundle(root, verify=True)
            except BundleError as e:
                raise UploadError(422, f"not a valid bundle: {e}") from None
            return self._install(sha, root, _du(root), force)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    def _unpack(self, tar_path: Path, dest: Path) -> Path:
        cap = min(self.max_bytes, self.quota_bytes)
        if _declared_size(tar_path, cap) > cap:
            raise UploadError(413, f"bundle unpacks to more than this device's limit of {cap} bytes")
        try:
            safe_extract(tar_path, dest, max_bytes=cap)
        except UnsafeArchive as e:
            raise UploadError(422, f"unsafe bundle archive: {e}") from None
        except OSError as e:  # e.g. a file and a directory under one name; never show our paths
            raise UploadError(422, f"bundle archive cannot be unpacked: its members conflict "
                                   f"({e.strerror or type(e).__name__})") from None
        return _bundle_root(dest)

    def _install(self, sha: str, root: Path, size: int, force: bool) -> tuple:
        final = self.root / sha
        with self._lock:
            if final.is_dir():
                if not force:  # a concurrent upload of the same bytes won
                    return final, False
                if sha in self.in_use():
                    raise UploadError(409, "bundle is in use by queued or running jobs; upload it again "
                                           "when they have finished")
                self._remove(sha)
            self._make_room(size, sha)
            root.rename(final)
            self._sizes[sha] = size
            self._clear_refusal(sha)
        return final, True

    def _make_room(self, size: int, keep: str) -> None:
        """Evict least recently used bundles no job needs until ``size`` more bytes fit the quota."""
        if sum(self._sizes.values()) + size <= self.quota_bytes:
            return
        pinned = set(self.in_use()) | {keep}
        victims = sorted((p for p in self._dirs() if p.name not in pinned), key=lambda p: p.stat().st_mtime)
        for p in victims:
            if sum(self._sizes.values()) + size <= self.quota_bytes:
                break
            self._remove(p.name)
        used = sum(self._sizes.values())
        if used + size > self.quota_bytes:
            raise UploadError(507, f"bundle of {size} bytes does not fit: {used} of {self.quota_bytes} bytes are "
                                   "held by bundles that queued or running jobs need; retry later")

    def _remove(self, sha: str) -> None:
        shutil.rmtree(self.root / sha, ignore_errors=True)
        self._sizes.pop(sha, None)
        self._clear_refusal(sha)


def receive_checked(stream: BinaryIO, length: int, tar_path: Path, sha: str) -> None:
    """Copy exactly ``length`` bytes to ``tar_path``, checking their sha256 (bundles and data uploads)."""
    h = hashlib.sha256()
    left = length
    with open(tar_path, "wb") as out:
        while left > 0:
            chunk = stream.read(min(left, 1 << 16))
            if not chunk:
                raise UploadError(400, "upload ended before Content-Length bytes arrived")
            h.update(chunk)
            out.write(chunk)
            left -= len(chunk)
    if h.hexdigest() != sha:
        raise UploadError(400, f"digest mismatch: the body's sha256 is {h.hexdigest()}, not {sha}")


def _declared_size(tar_path: Path, cap: int) -> int:
    """Total size the tar's members say they unpack to, read from the headers until it passes ``cap``.

    Stopping there matters for a compressed tar: reaching the next header
    means decompressing the data before it.
    """
    try:
        with tarfile.open(tar_path, mode="r:*") as tar:
            total = 0
            for n, m in enumerate(tar):
                total += max(0, m.size) if m.isreg() else 0
                if total > cap or n > 10_000:  # tarsafe refuses that many members anyway
                    break
            return total
    except tarfile.TarError as e:
        raise UploadError(422, f"unsafe bundle archive: not a readable tar archive: {e}") from None


def _bundle_root(top: Path) -> Path:
    """The bundle directory inside an extracted tar: top level or its single folder."""
    if (top / MANIFEST).exists() or (top / MODEL).exists():
        return top
    entries = [p for p in top.iterdir()]
    if len(entries) == 1 and entries[0].is_dir():
        inner = entries[0]
        if (inner / MANIFEST).exists() or (inner / MODEL).exists():
            return inner
    raise UploadError(422, f"not a bundle: the archive holds no {MANIFEST} or {MODEL}")
