"""Client for `edgerun agent`: ship bundles, queue jobs, wait for reports."""
from __future__ import annotations

import hashlib
import io
import os
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from edgepipe.device.http import ClientError, request


@dataclass(frozen=True)
class PackedBundle:
    """A bundle directory as the deterministic tar the agent stores by sha256."""

    path: Path
    name: str
    recipe: Optional[str]
    data: bytes
    sha256: str


def pack_bundle(path: os.PathLike) -> PackedBundle:
    """Tar a bundle directory reproducibly (sorted names, zeroed owners/times).

    The same bundle always gives the same bytes, so its sha256 names it on
    every device and re-deploying is a no-op.
    """
    from edgepipe.device.bundle import load_bundle

    b = load_bundle(path)  # refuses broken bundles before anything is sent
    root = Path(path)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for f in files:
            arc = f.name if root.is_file() else f.relative_to(root).as_posix()
            if root.is_file():
                arc = "model.tflite"  # a bare .tflite becomes a manifest-less bundle
            info = tarfile.TarInfo(arc)
            info.size = f.stat().st_size
            info.mode = 0o644
            info.mtime = 0
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            with open(f, "rb") as fh:
                tar.addfile(info, fh)
    data = buf.getvalue()
    recipe = b.manifest.recipe if b.manifest else None
    return PackedBundle(path=root, name=b.name, recipe=recipe, data=data,
                        sha256=hashlib.sha256(data).hexdigest())


class WaitTimeout(ClientError):
    """The job was still queued or running when the host stopped waiting (the device answered)."""


# Final job states (`cancelled`: DELETE /v1/jobs/{id}).
FINAL_STATES = ("done", "failed", "cancelled")


class AgentClient:
    """One agent at ``url`` (e.g. ``http://pi.local:8751``)."""

    def __init__(self, url: str, token: Optional[str] = None, timeout: float = 30.0):
        self.url = url.rstrip("/")
        if not self.url.startswith(("http://", "https://")):
            raise ValueError(f"device URL must start with http:// or https://, got {url!r}")
        self.token = token
        self.timeout = timeout

    def _call(self, method: str, path: str, **kw):
        kw.setdefault("timeout", self.timeout)
        return request(method, self.url + path, token=self.token, **kw)[1]

    def info(self) -> dict:
        return self._call("GET", "/v1/info")

    def alive(self) -> bool:
        """Whether the agent answers at all (``/healthz``, no token needed)."""
        try:
            self._call("GET", "/healthz", timeout=min(self.timeout, 10.0))
            return True
        except ClientError:
            return False

    def has_bundle(self, sha: str) -> bool:
        try:
            self._call("GET", f"/v1/bundles/{sha}")
            return True
        except ClientError as e:
            if e.status == 404:
                return False
            raise

    def upload(self, packed: PackedBundle, *, force: bool = False) -> bool:
        """PUT the bundle unless the device has it; True when bytes were sent.

        ``force`` sends it anyway and lifts the device's refusal of a bundle
        that crashed its runtime.
        """
        if not force and self.has_bundle(packed.sha256):
            return False
        self._call("PUT", f"/v1/bundles/{packed.sha256}{'?force=1' if force else ''}", data=packed.data,
                   content_type="application/x-tar", timeout=max(self.timeout, 300.0))
        return True

    def upload_data(self, data: bytes, sha: str) -> dict:
        """PUT one ``.npy`` of evaluation inputs (``/v1/data/{sha256}``); a blob the device has is not stored twice."""
        return self._call("PUT", f"/v1/data/{sha}", data=data, content_type="application/octet-stream",
                          timeout=max(self.timeout, 300.0))

    def submit(self, kind: str, bundle_sha: str, **params) -> dict:
        body = {"kind": kind, "bundle": bundle_sha}
        body.update({k: v for k, v in params.items() if v is not None})
        return self._call("POST", "/v1/jobs", body=body)

    def job(self, job_id: str) -> dict:
        return self._call("GET", f"/v1/jobs/{job_id}")

    def cancel(self, job_id: str) -> dict:
        """Cancel a queued or running job (DELETE /v1/jobs/{id}); returns its final state."""
        return self._call("DELETE", f"/v1/jobs/{job_id}", timeout=max(self.timeout, 60.0))

    def wait(self, job_id: str, *, timeout: float = 1800.0, poll: float = 0.1,
             on_poll: Optional[Callable[[dict], None]] = None) -> dict:
        """Poll a job until it is done, failed or cancelled; returns its final state.

        Raises :class:`WaitTimeout` when it is still going after ``timeout`` s.
        """
        deadline = time.monotonic() + timeout
        delay = poll
        while True:
            state = self.job(job_id)
            if on_poll is not None:
                on_poll(state)
            if state.get("status") in FINAL_STATES:
                return state
            if time.monotonic() > deadline:
                raise WaitTimeout(f"job {job_id} on {self.url} did not finish within {timeout:.0f} s",
                                  payload=state)
            time.sleep(delay)
            delay = min(delay * 1.5, 2.0)
