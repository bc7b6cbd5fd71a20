"""The agent's bundle store: one directory per uploaded tar, keyed by its sha256.

Uploads are hashed while they stream to disk, checked against the digest in
the URL, extracted with :mod:`edgepipe.device.tarsafe` into a scratch directory, verified
as a bundle and only then renamed into place, so a bundle in the store is
always complete. Uploading the same bytes again is a no-op.
"""
from __future__ import annotations

import hashlib
import json
import re
import shutil
import uuid
from pathlib import Path
from typing import BinaryIO, Optional

from edgepipe.device.bundle import MANIFEST, MODEL, BundleError, load_bundle
from edgepipe.device.tarsafe import UnsafeArchive, safe_extract
from edgepipe.device.errors import EdgepipeError

SHA_RE = re.compile(r"^[0-9a-f]{64}$")
DEFAULT_MAX_BYTES = 512 << 20
INCOMING = ".incoming"


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


class BundleStore:
    def __init__(self, root: Path, max_bytes: int = DEFAULT_MAX_BYTES):
        self.root = Path(root)
        self.max_bytes = int(max_bytes)
        self.root.mkdir(parents=True, exist_ok=True)
        # Leftovers of an upload interrupted by a crash are never valid.
        shutil.rmtree(self.root / INCOMING, ignore_errors=True)

    def path(self, sha: str) -> Path:
        return self.root / check_digest(sha)

    def has(self, sha: str) -> bool:
        return self.path(sha).is_dir()

    def describe(self, sha: str) -> Optional[dict]:
        p = self.path(sha)
        if not p.is_dir():
            return None
        try:
            man = json.loads((p / MANIFEST).read_text("utf-8"))
            name, recipe = man.get("name"), man.get("recipe")
        except (OSError, ValueError):
            name, recipe = (next(iter(sorted(p.glob("*.tflite"))), p).stem, None)
        return {"sha256": sha, "name": name, "recipe": recipe}

    def list(self) -> list:
        return [self.describe(p.name) for p in sorted(self.root.iterdir())
                if p.is_dir() and SHA_RE.match(p.name)]

    def put(self, sha: str, stream: BinaryIO, length: int) -> tuple:
        """Store ``length`` bytes of tar from ``stream``; returns ``(path, new)``."""
        check_digest(sha)
        if length > self.max_bytes:
            raise UploadError(413, f"bundle of {length} bytes exceeds the limit of {self.max_bytes} bytes")
        final = self.root / sha
        scratch = self.root / INCOMING / uuid.uuid4().hex
        scratch.mkdir(parents=True)
        try:
            tar_path = scratch / "bundle.tar"
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
                raise UploadError(400, f"digest mismatch: the body's sha256 is {h.hexdigest()}, "
                                       f"not {sha}")
            if final.is_dir():
                return final, False
            try:
                safe_extract(tar_path, scratch / "x", max_bytes=self.max_bytes)
            except UnsafeArchive as e:
                raise UploadError(422, f"unsafe bundle archive: {e}") from None
            root = _bundle_root(scratch / "x")
            try:
                load_bundle(root, verify=True)
            except BundleError as e:
                raise UploadError(422, f"not a valid bundle: {e}") from None
            try:
                root.rename(final)
            except OSError:
                if final.is_dir():  # a concurrent upload of the same bytes won
                    return final, False
                raise
            return final, True
        finally:
            shutil.rmtree(scratch, ignore_errors=True)


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
