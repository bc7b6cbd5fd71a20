"""What a job request is: the parameters each kind takes, their bounds, and their validation.

A front end (HTTP ``POST /v1/jobs``, an MQTT job message) turns the JSON it
received into a :class:`JobSpec` with :func:`parse_job` before handing it to
the job core (:mod:`edgepipe.device.jobs`); anything it cannot accept is a
:class:`JobRefused` with an HTTP-style status and a one-line reason.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from edgepipe.device.bundle_store import SHA_RE, UploadError, check_digest
from edgepipe.device.errors import StatusError

MAX_TIMEOUT = 4 * 3600.0

# Job parameters: name -> (types, (min, max)). Unknown keys are refused so a
# typo never silently runs with defaults; bounds keep one job from holding the
# worker for ever (the timeout is the last word).
_INT, _NUM = (int,), (int, float)
_COMMON = {"threads": (_INT, (1, 256)), "delegate": ((str,), None), "backend": ((str,), None),
           "timeout": (_NUM, (1, MAX_TIMEOUT))}
BENCH_PARAMS = {**_COMMON, "runs": (_INT, (1, 100_000)), "warmup": (_INT, (0, 10_000)),
                "min_secs": (_NUM, (0, 3600)), "input": ((str,), None), "seed": (_INT, (0, 2**32 - 1)),
                "mode": ((str,), None), "streams": (_INT, (1, 64)), "profile_ops": ((bool,), None)}
RUN_PARAMS = {**_COMMON, "source": ((str,), None), "pipeline": ((bool,), None),
              "max_frames": (_INT, (1, 1_000_000))}
# evaluate: the bundle over an uploaded .npy blob of preprocessed inputs (PUT /v1/data/{sha256}).
EVALUATE_PARAMS = {**_COMMON, "data": ((str,), None)}
KIND_PARAMS = {"bench": BENCH_PARAMS, "run": RUN_PARAMS, "evaluate": EVALUATE_PARAMS}
MAX_STR = 4096


class JobRefused(StatusError):
    """A job request that cannot be accepted; ``status`` is the HTTP-style code (400, 404, 409, 422, 429)."""


@dataclass(frozen=True)
class JobSpec:
    """A validated job request."""

    kind: str  # bench | run | evaluate
    bundle: str  # the bundle tar's sha256
    params: dict
    timeout: Optional[float] = None  # None: the agent's default


def parse_job(doc) -> JobSpec:
    """Validate a job request (the JSON body of ``POST /v1/jobs``); raises :class:`JobRefused` (400)."""
    if not isinstance(doc, dict):
        raise JobRefused(400, "job must be a JSON object")
    kind = doc.get("kind")
    if kind not in KIND_PARAMS:
        raise JobRefused(400, "job kind must be 'bench', 'run' or 'evaluate'")
    bundle = doc.get("bundle")
    try:
        check_digest(bundle if isinstance(bundle, str) else "")
    except UploadError as e:
        raise JobRefused(400, f"bundle: {e.reason}") from None
    allowed = KIND_PARAMS[kind]
    params = {}
    for key, value in doc.items():
        if key in ("kind", "bundle") or value is None:
            continue
        if key not in allowed:
            raise JobRefused(400, f"unknown {kind} job parameter {key!r} (known: {', '.join(sorted(allowed))})")
        types, bounds = allowed[key]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise JobRefused(400, f"{key} must be {'/'.join(t.__name__ for t in types)}")
        if bounds and not bounds[0] <= value <= bounds[1]:
            raise JobRefused(400, f"{key} must be >= {bounds[0]:g} and <= {bounds[1]:g}")
        if isinstance(value, str) and len(value) > MAX_STR:
            raise JobRefused(400, f"{key} is longer than {MAX_STR} characters")
        params[key] = value
    if kind == "run" and "source" not in params:
        raise JobRefused(400, "a run job needs a source (DIR, FILE, VIDEO, camera[:N] or picamera)")
    if kind == "evaluate" and not (isinstance(params.get("data"), str) and SHA_RE.match(params["data"])):
        raise JobRefused(400, "an evaluate job needs data: the sha256 of an uploaded .npy (PUT /v1/data/{sha256})")
    timeout = params.pop("timeout", None)
    return JobSpec(kind, bundle, params, float(timeout) if timeout is not None else None)


__all__ = ["BENCH_PARAMS", "EVALUATE_PARAMS", "KIND_PARAMS", "MAX_STR", "MAX_TIMEOUT", "RUN_PARAMS", "JobRefused",
           "JobSpec", "parse_job"]
