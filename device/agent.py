"""`edgerun agent`: the HTTP front end of the device's job core.

HTTP routes (DESIGN.md): ``GET /v1/info``, ``PUT /v1/bundles/{sha256}[?force=1]``
(tar body), ``GET /v1/bundles[/{sha256}]``, ``PUT|GET /v1/data/{sha256}`` (``.npy``
inputs of evaluate jobs), ``POST /v1/jobs``, ``GET
/v1/jobs[/{id}]``, ``DELETE /v1/jobs/{id}`` (cancel), ``GET /healthz``. The
queue, the job states and the worker process live in
:mod:`edgepipe.device.jobs`; this module only maps HTTP onto it, so another
front end (MQTT) can share the same core.
"""
from __future__ import annotations

import urllib.parse
from typing import Callable, Optional

from edgepipe.device.bundle_store import UploadError, check_digest
from edgepipe.device.data_store import check_data_digest
from edgepipe.device.http import HTTPError_, JSONHandler, Server, check_bind
from edgepipe.device.job_spec import JobRefused, parse_job
from edgepipe.device.jobs import JobCore

DEFAULT_PORT = 8751
# The HTTP front end's name for the job core (tests and `edgepipe ablate --device` build one).
Agent = JobCore


class AgentHandler(JSONHandler):
    def route(self, method, path, query):
        srv: AgentServer = self.server  # type: ignore[assignment]
        parts = [p for p in path.split("/") if p]
        if path == "/healthz":
            return 200, {"ok": True, "service": "edgerun-agent"}
        if parts[:1] != ["v1"] or len(parts) < 2:
            raise HTTPError_(404, f"no route for {method} {path}")
        res = parts[1]
        if res == "info" and len(parts) == 2 and method == "GET":
            return 200, srv.info()
        try:
            if res == "bundles":
                if len(parts) == 2 and method == "GET":
                    return 200, {"bundles": srv.agent.store.list()}
                if len(parts) == 3:
                    return self._bundle(method, parts[2], query, srv.agent)
            if res == "data" and len(parts) == 3:
                return self._data(method, parts[2], srv.agent)
            if res == "jobs" and len(parts) in (2, 3):
                return self._jobs(method, parts[2] if len(parts) == 3 else None, srv.agent)
        except (JobRefused, UploadError) as e:
            raise HTTPError_(e.status, e.reason) from None
        raise HTTPError_(404 if method in ("GET", "HEAD") else 405, f"no route for {method} {path}")

    def _jobs(self, method: str, job_id: Optional[str], core: JobCore):
        if job_id is None:
            if method == "POST":
                job = core.submit(parse_job(self.read_json(64 << 10)))
                return 202, job.to_dict(with_report=False)
            if method == "GET":
                return 200, {"jobs": [j.to_dict(with_report=False) for j in core.list()]}
            raise HTTPError_(405, f"{method} not allowed on /v1/jobs")
        if method in ("GET", "HEAD"):
            job = core.get(job_id)
            if job is None:
                raise HTTPError_(404, "no such job")
            return 200, job.to_dict()
        if method == "DELETE":
            return 200, core.cancel(job_id).to_dict(with_report=False)
        raise HTTPError_(405, f"{method} not allowed on jobs")

    def _bundle(self, method: str, sha: str, query: str, core: JobCore):
        """``PUT /v1/bundles/{sha256}[?force=1]``: one bundle tar; GET describes it."""
        check_digest(sha)
        force = urllib.parse.parse_qs(query).get("force", ["0"])[-1] in ("1", "true", "yes")
        return self._blob(method, sha, core.store, ("bundle", "bundles"), force,
                          lambda n: core.store.put(sha, self.rfile, n, force=force)[1])

    def _data(self, method: str, sha: str, core: JobCore):
        """``PUT /v1/data/{sha256}``: one ``.npy`` of preprocessed inputs for evaluate jobs; GET describes it."""
        check_data_digest(sha)
        return self._blob(method, sha, core.data, ("data", "data"), False,
                          lambda n: core.data.put(sha, self.rfile, n))

    def _blob(self, method: str, sha: str, store, names: tuple, force: bool, put: Callable[[int], bool]):
        """GET/PUT of one content-addressed blob in ``store``; ``put(length)`` reads the body, True when new.

        A blob already held is not received again (unless ``force``): its body
        is drained and only its last-used time is refreshed.
        """
        noun, route = names
        if method in ("GET", "HEAD"):
            d = store.describe(sha)
            if d is None:
                raise HTTPError_(404, f"{noun} not on this device")
            return 200, d
        if method != "PUT":
            raise HTTPError_(405, f"{method} not allowed on {route}")
        n = self.body_length(limit=store.max_bytes)
        if store.has(sha) and not force:
            self._drain(n)
            store.touch(sha)
            return 200, {**store.describe(sha), "new": False}
        try:
            new = put(n)
        finally:
            self._body_done = True
        return (201 if new else 200), {**store.describe(sha), "new": new}

    def _drain(self, n: int) -> None:
        while n > 0:
            chunk = self.rfile.read(min(n, 1 << 16))
            if not chunk:
                break
            n -= len(chunk)
        self._body_done = True


class AgentServer(Server):
    def __init__(self, agent: JobCore, host: str = "127.0.0.1", port: int = DEFAULT_PORT, *,
                 token: Optional[str] = None, info: Optional[Callable[[], dict]] = None):
        check_bind(host, token)
        self.agent = agent
        self._info = info
        super().__init__((host, port), AgentHandler, token=token, max_body=64 << 10)

    def info(self) -> dict:
        """What this device is (``info``) plus the agent's queue, limits and bundles."""
        base = dict(self._info()) if self._info else {}
        store = self.agent.store
        stats = self.agent.stats()
        base.update({"agent": {"queued": stats["queued"] + stats["running"], "keep_warm": self.agent.keep_warm,
                               "max_bundle_bytes": store.max_bytes, "max_data_bytes": self.agent.data.max_bytes,
                               "store_quota_bytes": store.quota_bytes, "store_used_bytes": store.used_bytes(),
                               "job_timeout_s": stats["default_timeout_s"],
                               "worker_pid": stats["worker_pid"], "worker_restarts": stats["worker_restarts"],
                               "crashes_contained": stats["crashes_contained"]},
                     "bundles": store.list()})
        return base
