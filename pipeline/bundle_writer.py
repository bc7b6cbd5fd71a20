"""Writing bundles atomically.

A bundle is assembled in a hidden temporary directory beside its final place
and renamed into position only when complete, so an interrupted or failed
conversion never leaves a half-written bundle, and an existing bundle is
replaced only by a complete new one.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Callable, Optional

from edgepipe.device.bundle import EDGETPU_MODEL, LABELS, MANIFEST, MODEL, Manifest, write_manifest
from edgepipe.pipeline import edgetpu
from edgepipe.device.errors import EdgepipeError


class BundleWriteError(EdgepipeError, OSError):
    """The output location cannot take the bundle; message is user-facing."""

    def __str__(self) -> str:  # OSError's default str adds errno noise
        return self.args[0] if self.args else "cannot write bundle"


def check_writable(out_dir: Path) -> None:
    """Create ``out_dir`` if needed and prove we can write there, before any slow work."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise BundleWriteError(f"output {out_dir}: exists and is not a directory") from None
    except OSError as e:
        raise BundleWriteError(f"output {out_dir}: cannot create ({e.strerror or e})") from None
    if not out_dir.is_dir():
        raise BundleWriteError(f"output {out_dir}: exists and is not a directory")
    try:
        fd, probe = tempfile.mkstemp(dir=out_dir, prefix=".edgepipe-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise BundleWriteError(f"output {out_dir}: not writable ({e.strerror or e})") from None


def _clean_stale(out_dir: Path, name: str) -> None:
    """Remove temp dirs left by a run that was killed before it could clean up."""
    for p in out_dir.glob(f".{name}.tmp-*"):
        shutil.rmtree(p, ignore_errors=True)


def _compile(tmp: Path) -> dict:
    """Compile for the Edge TPU; a compiler failure leaves a valid CPU bundle and says why."""
    try:
        tpu = edgetpu.compile_model(tmp / MODEL, tmp)
    except edgetpu.EdgeTPUError as e:
        return {"compiled": False, "reason": str(e)}
    compiled = tmp / tpu.pop("model_file")
    if compiled.name != EDGETPU_MODEL:
        os.replace(compiled, tmp / EDGETPU_MODEL)
    return dict(tpu, compiled=True, model_file=EDGETPU_MODEL)


def write_bundle(out_dir: Path, name: str, model: bytes, *,
                 manifest_for: Callable[[Path, Optional[dict]], Manifest],
                 labels: Optional[Path] = None, compile_edgetpu: bool = False) -> tuple:
    """Write ``out_dir/name`` atomically; returns (bundle path, edgetpu block or None).

    ``manifest_for(model_path, edgetpu_block)`` builds the manifest once the
    model file exists (it reads tensor details from the written file).
    """
    final = out_dir / name
    if final.exists() and not (final.is_dir() and (final / MANIFEST).exists()):
        raise BundleWriteError(f"{final}: exists and is not an edgepipe bundle; refusing to replace it")
    _clean_stale(out_dir, name)
    tmp = Path(tempfile.mkdtemp(dir=out_dir, prefix=f".{name}.tmp-"))
    try:
        (tmp / MODEL).write_bytes(model)
        if labels is not None:
            shutil.copyfile(labels, tmp / LABELS)
        tpu: Optional[dict] = None
        if compile_edgetpu:
            tpu = _compile(tmp)
        write_manifest(tmp, manifest_for(tmp / MODEL, tpu))
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; a bundle is meant to be shared
        if final.exists():
            old = out_dir / f".{name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, BundleWriteError):
            raise
        raise BundleWriteError(f"{final}: cannot write bundle ({e.strerror or e})") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final, tpu
