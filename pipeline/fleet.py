"""Bench bundles on several devices at once through their agents.

Devices run concurrently (one thread each); on a device the jobs run one after
another, as the agent would anyway. A device that is down is reported and the
others carry on; a bundle a device refuses (413 too large, 422 not a bundle or
crashed its runtime before, 507 no room) or a job that fails (its worker
crashed, it timed out) is one row with the reason, and that device goes on
with its other bundles. Every report lands in the results DB.
"""
from __future__ import annotations

import threading
import urllib.parse
from dataclasses import dataclass, field
from enum import Enum
from typing import Callable, Optional

from edgepipe.device.http import ClientError
from edgepipe.pipeline.remote import AgentClient, PackedBundle, WaitTimeout
from edgepipe.pipeline.reporting import fmt

# What `edgepipe bench` forwards to every bench job (None = agent default).
JOB_PARAMS = ("threads", "delegate", "runs", "warmup", "min_secs", "input", "backend", "seed", "mode", "streams",
              "profile_ops")


class Status(str, Enum):
    OK = "ok"
    FAILED = "failed"  # the job ran (or was queued) and failed: its reason says why
    REFUSED = "refused"  # the device refused the bundle (too large, not a safe bundle, crashed its runtime)
    SKIPPED = "skipped"  # never tried: the device was down or stopped answering


@dataclass
class Outcome:
    device: str
    bundle: str
    recipe: Optional[str]
    status: str  # a Status value
    report: Optional[dict] = None
    error: Optional[str] = None
    uploaded: bool = False
    stored: Optional[bool] = None  # True new, False duplicate, None not stored
    index: int = 0  # position of the job (bundle x setting) on this device
    setting: dict = field(default_factory=dict)
    crash: Optional[dict] = None  # the agent's crash record when the job's worker died


@dataclass
class FleetResult:
    outcomes: list = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.outcomes) and all(o.status == "ok" for o in self.outcomes)

    def failed(self) -> list:
        return [o for o in self.outcomes if o.status != "ok"]


def device_label(url: str) -> str:
    """``host:port`` of an agent URL: short, and unique per agent."""
    return urllib.parse.urlsplit(url).netloc or url


Event = Callable[[str, str, str, str], None]  # (device, bundle, stage, detail)


def setting_label(setting: dict) -> str:
    """``cpu t4``: the per-job settings that vary across a matrix."""
    parts = []
    if "delegate" in setting:
        parts.append(str(setting["delegate"]))
    if "threads" in setting:
        parts.append(f"t{setting['threads']}")
    return " ".join(parts)


# Answers that refuse one bundle, not the device: say so and go on with the next bundle.
REFUSALS = {413: "bundle too large for this device", 422: "bundle refused by the device",
            507: "no room for the bundle on the device", 409: "bundle busy on the device"}


class DeviceDown(Exception):
    """The device stopped answering (not even /healthz): skip what is left for it."""


def refusal(e: ClientError) -> Optional[str]:
    """``bundle too large for this device: <the agent's reason>`` for a refusal, else None."""
    what = REFUSALS.get(e.status)
    if what is None:
        return None
    reason = e.payload.get("error") if isinstance(e.payload, dict) else None
    return f"{what}: {reason or e}"


class _DeviceRun:
    """The jobs of one device, one after another; bundles refused once are not retried."""

    def __init__(self, url: str, *, token, store, validate, job_timeout: float, force: bool, emit: Event):
        self.label = device_label(url)
        self.client = AgentClient(url, token=token)
        self.store, self.validate, self.job_timeout, self.force, self.emit = store, validate, job_timeout, force, emit
        self.max_bytes: Optional[int] = None
        self.present: set = set()
        self.refused: dict = {}  # sha256 -> reason

    def upload(self, pb, name: str, o: Outcome) -> None:
        if pb.sha256 in self.present:
            return
        if self.max_bytes is not None and len(pb.data) > self.max_bytes:
            raise _Refused(f"bundle too large for this device: {len(pb.data) / 1e6:.1f} MB, the device takes "
                           f"at most {self.max_bytes / 1e6:.1f} MB")
        self.emit(self.label, name, "upload", f"{len(pb.data) / 1e6:.1f} MB")
        o.uploaded = self.client.upload(pb, force=self.force)
        self.present.add(pb.sha256)
        self.emit(self.label, name, "queued", "uploaded" if o.uploaded else "already on device")

    def job(self, pb, st: dict, name: str, o: Outcome) -> None:
        """Upload if needed, run one bench job, fill ``o``; raises DeviceDown."""
        try:
            if pb.sha256 in self.refused:
                raise _Refused(self.refused[pb.sha256])
            self.upload(pb, name, o)
            try:
                self._run(pb, st, o)
            except ClientError as e:
                if e.status != 409:
                    raise
                # Evicted from the device's store since we checked: send it again, once.
                self.present.discard(pb.sha256)
                self.upload(pb, name, o)
                self._run(pb, st, o)
        except _Refused as e:
            o.status, o.error = Status.REFUSED.value, str(e)
            self.refused[pb.sha256] = str(e)
        except ClientError as e:
            why = refusal(e)
            if why is not None:
                o.status, o.error = Status.REFUSED.value, why
                self.refused[pb.sha256] = why
            elif e.status is None and not isinstance(e, WaitTimeout) and not self.client.alive():
                o.error = str(e)
                raise DeviceDown(str(e)) from None
            else:  # the device answers: this job failed, the next may not
                o.error = str(e)
        except Exception as e:  # a bad report or a bug: report it, keep going
            o.error = f"{type(e).__name__}: {e}"

    def _run(self, pb, st: dict, o: Outcome) -> None:
        job = self.client.submit("bench", pb.sha256, **st)
        try:
            state = self.client.wait(job["id"], timeout=self.job_timeout)
        except WaitTimeout as e:
            self._cancel(job["id"])
            raise ClientError(f"{e} (cancelled on the device)") from None
        if state.get("status") != "done":
            o.error = state.get("error") or f"job ended as {state.get('status')}"
            o.crash = state.get("crash")
            return
        rep = state.get("report")
        reason = self.validate(rep) if isinstance(rep, dict) else "no report in the job result"
        if reason:
            o.error = f"invalid report from the agent: {reason}"
            return
        o.report, o.status = rep, Status.OK.value
        if self.store is not None:
            o.stored = self.store.add(rep)

    def _cancel(self, job_id: str) -> None:
        try:
            self.client.cancel(job_id)
        except ClientError:
            pass  # it finished meanwhile, or the device is going away: nothing to undo


class _Refused(Exception):
    pass


def _bench_device(url: str, packed: list, settings: list, *, token: Optional[str], store, validate,
                  job_timeout: float, force: bool, emit: Event, out: list, lock: threading.Lock) -> None:
    run = _DeviceRun(url, token=token, store=store, validate=validate, job_timeout=job_timeout, force=force,
                     emit=emit)
    label = run.label
    jobs = [(pb, st) for pb in packed for st in settings]

    def record(o: Outcome) -> None:
        with lock:
            out.append(o)

    def name(pb, st) -> str:
        extra = setting_label(st) if len(settings) > 1 else ""
        return f"{pb.name} {extra}".strip()

    try:
        info = run.client.info()
        run.max_bytes = ((info or {}).get("agent") or {}).get("max_bundle_bytes")
    except ClientError as e:
        emit(label, "-", "down", str(e))
        for n, (pb, st) in enumerate(jobs):
            record(Outcome(label, pb.name, pb.recipe, Status.FAILED.value, error=f"device unreachable: {e}",
                           index=n, setting=st))
        return
    for n, (pb, st) in enumerate(jobs):
        o = Outcome(label, pb.name, pb.recipe, Status.FAILED.value, index=n, setting=st)
        try:
            run.job(pb, st, name(pb, st), o)
        except DeviceDown:
            record(o)
            emit(label, name(pb, st), "failed", o.error or "")
            for m in range(n + 1, len(jobs)):
                pb2, st2 = jobs[m]
                record(Outcome(label, pb2.name, pb2.recipe, Status.SKIPPED.value, index=m, setting=st2,
                               error="skipped: device stopped answering"))
            return
        record(o)
        if o.status == Status.OK.value:
            p50 = ((o.report or {}).get("latency_ms") or {}).get("p50")
            emit(label, name(pb, st), "done", f"p50 {fmt(p50)} ms" if isinstance(p50, (int, float)) else "")
        else:
            emit(label, name(pb, st), o.status, o.error or "")


def expand_settings(params: Optional[dict], threads=(None,), delegates=(None,)) -> list:
    """One job-parameter dict per (delegate, threads) pair, shared params merged in."""
    base = {k: v for k, v in (params or {}).items() if k in JOB_PARAMS and v is not None}
    out = []
    for d in delegates or (None,):
        for t in threads or (None,):
            st = dict(base)
            if d is not None:
                st["delegate"] = d
            if t is not None:
                st["threads"] = t
            out.append(st)
    return out


def bench_fleet(packed: list, devices: list, *, params: Optional[dict] = None, settings: Optional[list] = None,
                token: Optional[str] = None, store=None, job_timeout: float = 1800.0, force: bool = False,
                on_event: Optional[Event] = None) -> FleetResult:
    """Run a bench job for every ``PackedBundle`` x setting on every device URL.

    ``settings`` is a list of job-parameter dicts (see :func:`expand_settings`);
    default: one job per bundle with ``params``. ``force`` uploads every
    bundle again, lifting a device's refusal of one that crashed its runtime.
    A bundle a device refuses (too large, unsafe, crashed before) is a
    ``refused`` outcome and the device goes on with its other bundles; only a
    device that stops answering altogether skips the rest.
    """
    from edgepipe.device.contracts import report_problem

    if settings is None:
        settings = expand_settings(params)
    validate = report_problem
    out: list = []
    lock = threading.Lock()
    emit_lock = threading.Lock()

    def emit(dev, bundle, stage, detail):
        if on_event is not None:
            with emit_lock:
                on_event(dev, bundle, stage, detail)

    threads = [threading.Thread(
        target=_bench_device, args=(url, packed, settings),
        kwargs=dict(token=token, store=store, validate=validate, job_timeout=job_timeout, force=force,
                    emit=emit, out=out, lock=lock), name=f"fleet-{device_label(url)}", daemon=True)
        for url in devices]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    order = {device_label(u): i for i, u in enumerate(devices)}
    out.sort(key=lambda o: (order.get(o.device, 0), o.index))
    return FleetResult(out)


__all__ = ["bench_fleet", "expand_settings", "FleetResult", "Outcome", "PackedBundle", "Status", "device_label",
           "refusal"]
