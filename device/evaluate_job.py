"""An agent ``evaluate`` job: a bundle over a blob of preprocessed inputs, raw outputs back.

The host (``edgepipe evaluate --device``) preprocesses the images with the
bundle's own preprocessing, uploads them as a ``.npy`` blob
(:mod:`edgepipe.device.data_store`) and computes every metric itself; the
board only runs the model with its own runtime and delegate, so the figures
are the board's. The first output of every image comes back dequantized, as
float32 rows in a base64 ``.npy`` (bounded: a job's report must stay small),
with the invoke latency of each image.
"""
from __future__ import annotations

import base64
import io
import os
from pathlib import Path

import numpy as np

from edgepipe.device.errors import EdgepipeError

# Output values one job may return (float32: 2 MB, 2.7 MB in base64); the host sizes its batches below it.
MAX_OUTPUT_VALUES = 1 << 19


class EvaluateJobError(EdgepipeError):
    """Data that does not fit the model, or outputs too large to return."""


def encode_array(a: np.ndarray) -> str:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(a), allow_pickle=False)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def decode_array(text: str) -> np.ndarray:
    """The array :func:`encode_array` made (never unpickles)."""
    return np.load(io.BytesIO(base64.b64decode(text, validate=True)), allow_pickle=False)


def _check_fit(x: np.ndarray, loaded) -> int:
    """Output values per image; refuses data of the wrong shape or outputs too large to send back."""
    if len(loaded.inputs) != 1:
        raise EvaluateJobError(f"evaluation needs a model with one input, this one has {len(loaded.inputs)}")
    want = tuple(loaded.inputs[0].shape[1:])
    if tuple(x.shape[1:]) != want:
        raise EvaluateJobError(f"data rows have shape {tuple(x.shape[1:])} but the model takes {want}")
    per_image = int(np.prod(loaded.outputs[0].shape[1:]))
    if per_image * x.shape[0] > MAX_OUTPUT_VALUES:
        raise EvaluateJobError(f"{x.shape[0]} images x {per_image} outputs exceed the {MAX_OUTPUT_VALUES} "
                               "output values one job may return; send fewer images per job")
    return per_image


def evaluate_job(bundle_dir: os.PathLike, params: dict, loaded) -> dict:
    """Run ``loaded`` on every row of the job's data blob; returns an ``eval`` report with the outputs."""
    from edgepipe.device import sysinfo
    from edgepipe.device.bench import model_block
    from edgepipe.device.bundle import load_bundle
    from edgepipe.device.report import new_report
    from edgepipe.device.timing import ns_to_ms, now_ns, stats

    x = np.load(params["data_path"], mmap_mode="r", allow_pickle=False)
    per_image = _check_fit(x, loaded)
    device = sysinfo.device_info()
    rows = np.empty((x.shape[0], per_image), np.float32)
    times = []
    for i in range(x.shape[0]):
        t0 = now_ns()
        rows[i] = loaded.predict([np.asarray(x[i:i + 1], np.float32)])[0].reshape(-1)
        times.append(ns_to_ms(now_ns() - t0))
    bundle = load_bundle(Path(bundle_dir))
    runtime = loaded.runtime_dict()
    report = new_report("eval", device=device, runtime=runtime, model=model_block(bundle, Path(loaded.path)),
                        latency_ms=stats(times), input={"source": f"data:{params['data'][:12]}", "frames": len(times)},
                        peak_rss_mb=sysinfo.peak_rss_mb())
    # Per image: quantize, invoke, dequantize (what the accuracy run costs, not invoke alone).
    report["settings"] = {"data_sha256": params["data"], "latency": "predict (quantize + invoke + dequantize)"}
    report["outputs"] = {"shape": list(rows.shape), "dtype": "float32", "npy_b64": encode_array(rows),
                         "latency_ms": [round(t, 4) for t in times]}
    return report


__all__ = ["EvaluateJobError", "MAX_OUTPUT_VALUES", "decode_array", "encode_array", "evaluate_job"]
