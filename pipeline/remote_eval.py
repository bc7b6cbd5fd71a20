"""Accuracy on the board: `edgepipe evaluate --device URL` runs each bundle on an agent.

The host does everything but the model: it reads the images with the bundle's
own preprocessing (as a local evaluation does), ships them in batches as
``.npy`` blobs (``PUT /v1/data/{sha256}``), queues one ``evaluate`` job per
batch, and gets the board's raw outputs back; the metrics and the float
reference run on the host (:mod:`edgepipe.pipeline.evaluate`). A device that
stops answering leaves the images done so far, marked partial.
"""
from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from edgepipe.device.evaluate_job import MAX_OUTPUT_VALUES, decode_array
from edgepipe.device.http import ClientError
from edgepipe.pipeline.dataset import EvalError
from edgepipe.pipeline.remote import AgentClient, WaitTimeout, pack_bundle

DEFAULT_BATCH = 256
DEFAULT_DATA_LIMIT = 64 << 20
BATCH_TIMEOUT = 1800.0


class BatchFailed(EvalError):
    """One batch did not come back (the job failed, or the device stopped answering)."""


@dataclass
class DeviceRun:
    """What the board said about one bundle: who it is, how it ran, how far it got."""

    url: str
    images_total: int
    device: Optional[dict] = None
    runtime: Optional[dict] = None
    latencies_ms: list = field(default_factory=list)
    jobs: list = field(default_factory=list)
    stopped: Optional[str] = None  # why it stopped early (partial result)

    @property
    def images_done(self) -> int:
        return len(self.latencies_ms)


def npy_bytes(x: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(x), allow_pickle=False)
    return buf.getvalue()


def batch_size(per_image_outputs: int, row_bytes: int, *, batch: Optional[int], data_limit: int) -> int:
    """Images per job: what the user asked, within what one job may return and one upload may carry."""
    if per_image_outputs > MAX_OUTPUT_VALUES:
        raise EvalError(f"the model has {per_image_outputs} output values per image, more than the "
                        f"{MAX_OUTPUT_VALUES} an evaluate job may return")
    n = min(batch or DEFAULT_BATCH, MAX_OUTPUT_VALUES // per_image_outputs,
            max(1, (data_limit - 1024) // max(row_bytes, 1)))
    return max(1, n)


class DeviceRunner:
    """``runner`` for :func:`edgepipe.pipeline.evaluate.evaluate_bundles`: bundles run on one agent."""

    def __init__(self, client: AgentClient, *, delegate: Optional[str] = None, threads: Optional[int] = None,
                 batch: Optional[int] = None, say: Callable[[str, int], None] = lambda m, n: None,
                 batch_timeout: float = BATCH_TIMEOUT):
        self.client, self.delegate, self.threads, self.batch = client, delegate, threads, batch
        self.say, self.batch_timeout = say, batch_timeout
        self.runs: dict = {}  # bundle path (str) -> DeviceRun
        try:
            info = client.info()
        except ClientError as e:
            raise EvalError(f"device {client.url} is unreachable ({e})", param="device_url") from None
        self.data_limit = int((info.get("agent") or {}).get("max_data_bytes") or DEFAULT_DATA_LIMIT)

    def __call__(self, bundle, x: np.ndarray, progress: Callable[[int], None]) -> np.ndarray:
        """The board's first-output rows for ``x`` (fewer rows when the device dropped out)."""
        run = self.runs[str(bundle.path)] = DeviceRun(self.client.url, images_total=int(x.shape[0]))
        try:
            packed = pack_bundle(bundle.path)
            self.client.upload(packed)
        except ClientError as e:
            raise EvalError(f"{bundle.name}: cannot ship it to {self.client.url} ({e})", param="device_url") from None
        per_image = int(np.prod(bundle.manifest.outputs[0].shape[1:]))
        x = np.ascontiguousarray(x, np.float32)
        size = batch_size(per_image, x[0].nbytes, batch=self.batch, data_limit=self.data_limit)
        rows = []
        for i in range(0, x.shape[0], size):
            try:
                rows.append(self._batch(packed.sha256, x[i:i + size], run))
            except BatchFailed as e:
                if not rows:  # nothing measured: no result to keep
                    raise EvalError(f"{bundle.name} on {self.client.url}: {e}", param="device_url") from None
                run.stopped = str(e)
                self.say(f"{bundle.name}: stopped after {run.images_done} of {run.images_total} images ({e})", 0)
                break
            progress(rows[-1].shape[0])
        return np.concatenate(rows).astype(np.float64)

    def _batch(self, bundle_sha: str, x: np.ndarray, run: DeviceRun) -> np.ndarray:
        data = npy_bytes(x)
        sha = hashlib.sha256(data).hexdigest()
        try:
            self.client.upload_data(data, sha)
            job = self.client.submit("evaluate", bundle_sha, data=sha, delegate=self.delegate, threads=self.threads)
            run.jobs.append(job["id"])
            state = self.client.wait(job["id"], timeout=self.batch_timeout)
        except WaitTimeout:
            try:  # do not leave the board busy with a batch nobody waits for
                self.client.cancel(run.jobs[-1])
            except ClientError:
                pass
            raise BatchFailed(f"a batch did not finish within {self.batch_timeout:.0f} s") from None
        except ClientError as e:
            raise BatchFailed(f"device stopped answering: {e}") from None
        if state.get("status") != "done":
            raise BatchFailed(f"job {state.get('status')}: {state.get('error') or 'no reason given'}")
        return _outputs(state.get("report") or {}, x.shape[0], run)


def _outputs(report: dict, n: int, run: DeviceRun) -> np.ndarray:
    """The rows of one job's report, checked, with its latencies and the device's identity recorded."""
    outs = report.get("outputs") or {}
    try:
        rows = decode_array(outs.get("npy_b64") or "")
    except (ValueError, TypeError, OSError) as e:
        raise BatchFailed(f"the device sent unreadable outputs ({e})") from None
    lat = outs.get("latency_ms") or []
    if rows.ndim != 2 or rows.shape[0] != n or len(lat) != n:
        raise BatchFailed(f"the device sent {tuple(rows.shape)} outputs for {n} images")
    run.device = run.device or report.get("device")
    run.runtime = run.runtime or report.get("runtime")
    run.latencies_ms.extend(float(t) for t in lat)
    return rows


def device_eval_report(e, data: Path, run: DeviceRun) -> dict:
    """The ``eval`` report of a bundle evaluated on a board: its device and runtime, how far it got."""
    from edgepipe.device.timing import stats
    from edgepipe.pipeline.evaluate import eval_report

    r = eval_report(e, data)
    if run.device:
        r["device"] = run.device
    if run.runtime:
        r["runtime"] = {k: v for k, v in run.runtime.items() if k != "load_ms"}
    partial = run.stopped is not None
    r["accuracy"].update({"partial": partial, "images_done": run.images_done, "images_total": run.images_total})
    # Not the report's latency_ms: these include quantize/dequantize in Python, and a bench measures latency.
    r["settings"] = {"device_url": run.url, "agent_jobs": run.jobs[:1000],
                     "board_ms_per_image": stats(run.latencies_ms) if run.latencies_ms else None}
    if partial:
        r["warnings"].append(f"partial: {run.images_done} of {run.images_total} images ({run.stopped})")
    return r


__all__ = ["BatchFailed", "DeviceRun", "DeviceRunner", "batch_size", "device_eval_report", "npy_bytes"]
