"""Content-addressed cache of conversions.

Key: sha256 of (source model bytes, recipe, calibration digest, preprocessing
request, input size, converter and edgepipe versions). A hit serves the
.tflite bytes plus the manifest facts recorded at conversion time, so a fully
cached run never imports TensorFlow.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Optional

from edgepipe.device.paths import user_dir


def default_cache_dir() -> Path:
    """``$EDGEPIPE_CACHE``, else ``$XDG_CACHE_HOME/edgepipe`` (~/.cache)."""
    return user_dir("cache", "edgepipe", env="EDGEPIPE_CACHE")


def cache_key(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


class ConversionCache:
    """``<root>/convert/<key>.tflite`` + ``<key>.json``; writes are atomic."""

    def __init__(self, root: Path):
        self.dir = Path(root) / "convert"

    def get(self, key: str) -> Optional[tuple]:
        """(tflite bytes, meta dict) or None; a damaged entry counts as a miss."""
        model, meta = self.dir / f"{key}.tflite", self.dir / f"{key}.json"
        try:
            info = json.loads(meta.read_text())
            data = model.read_bytes()
        except (OSError, ValueError):
            return None
        if hashlib.sha256(data).hexdigest() != info.get("model_sha256"):
            return None
        return data, info

    def put(self, key: str, data: bytes, meta: dict) -> None:
        """Store an entry; failures to write the cache never fail a conversion."""
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            meta = dict(meta, model_sha256=hashlib.sha256(data).hexdigest())
            _atomic_write(self.dir / f"{key}.tflite", data)
            _atomic_write(self.dir / f"{key}.json", json.dumps(meta, indent=1).encode())
        except OSError:
            pass


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
