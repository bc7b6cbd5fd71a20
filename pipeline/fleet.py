"""Bench bundles on several devices at once through their agents.

Devices run concurrently (one thread each); on a device the jobs run one after
another, as the agent would anyway. A device that is down or fails is
reported and the others carry on. Every report lands in the results DB.
"""
from __future__ import annotations

import threading
import urllib.parse
from dataclasses import dataclass, field
from typing import Callable, Optional

from edgepipe.device.http import ClientError
from edgepipe.pipeline.remote import AgentClient, PackedBundle
from edgepipe.pipeline.reporting import fmt

# What `edgepipe bench` forwards to every bench job (None = agent default).
JOB_PARAMS = ("threads", "delegate", "runs", "warmup", "min_secs", "input", "backend", "seed")


@dataclass
class Outcome:
    device: str
    bundle: str
    recipe: Optional[str]
    status: str  # ok | failed | skipped
    report: Optional[dict] = None
    error: Optional[str] = None
    uploaded: bool = False
    stored: Optional[bool] = None  # True new, False duplicate, None not stored
    index: int = 0  # position of the job (bundle x setting) on this device
    setting: dict = field(default_factory=dict)


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


def _bench_device(url: str, packed: list, settings: list, *, token: Optional[str], store, validate,
                  job_timeout: float, emit: Event, out: list, lock: threading.Lock) -> None:
    label = device_label(url)
    jobs = [(i, pb, st) for i, pb in enumerate(packed) for st in settings]

    def record(o: Outcome) -> None:
        with lock:
            out.append(o)

    def name(pb, st) -> str:
        extra = setting_label(st) if len(settings) > 1 else ""
        return f"{pb.name} {extra}".strip()

    client = AgentClient(url, token=token)
    try:
        client.info()
    except ClientError as e:
        emit(label, "-", "down", str(e))
        for n, (i, pb, st) in enumerate(jobs):
            record(Outcome(label, pb.name, pb.recipe, "failed", error=f"device unreachable: {e}", index=n,
                           setting=st))
        return
    present: set = set()
    for n, (i, pb, st) in enumerate(jobs):
        o = Outcome(label, pb.name, pb.recipe, "failed", index=n, setting=st)
        try:
            if pb.sha256 not in present:
                emit(label, name(pb, st), "upload", f"{len(pb.data) / 1e6:.1f} MB")
                o.uploaded = client.upload(pb)
                present.add(pb.sha256)
                emit(label, name(pb, st), "queued", "uploaded" if o.uploaded else "already on device")
            job = client.submit("bench", pb.sha256, **st)
            state = client.wait(job["id"], timeout=job_timeout)
            if state.get("status") != "done":
                o.error = state.get("error") or f"job ended as {state.get('status')}"
            else:
                rep = state.get("report")
                reason = validate(rep) if isinstance(rep, dict) else "no report in the job result"
                if reason:
                    o.error = f"invalid report from the agent: {reason}"
                else:
                    o.report, o.status = rep, "ok"
                    if store is not None:
                        o.stored = store.add(rep)
        except ClientError as e:
            o.error = str(e)
            if e.status is None:  # the device stopped answering: skip the rest
                record(o)
                emit(label, name(pb, st), "failed", o.error)
                for m in range(n + 1, len(jobs)):
                    _, pb2, st2 = jobs[m]
                    record(Outcome(label, pb2.name, pb2.recipe, "skipped", index=m, setting=st2,
                                   error="skipped: device stopped answering"))
                return
        except Exception as e:  # a bad report or a bug: report it, keep going
            o.error = f"{type(e).__name__}: {e}"
        record(o)
        if o.status == "ok":
            p50 = ((o.report or {}).get("latency_ms") or {}).get("p50")
            emit(label, name(pb, st), "done", f"p50 {fmt(p50)} ms" if isinstance(p50, (int, float)) else "")
        else:
            emit(label, name(pb, st), "failed", o.error or "")


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
                token: Optional[str] = None, store=None, job_timeout: float = 1800.0,
                on_event: Optional[Event] = None) -> FleetResult:
    """Run a bench job for every ``PackedBundle`` x setting on every device URL.

    ``settings`` is a list of job-parameter dicts (see :func:`expand_settings`);
    default: one job per bundle with ``params``.
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
        kwargs=dict(token=token, store=store, validate=validate, job_timeout=job_timeout,
                    emit=emit, out=out, lock=lock), name=f"fleet-{device_label(url)}", daemon=True)
        for url in devices]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    order = {device_label(u): i for i, u in enumerate(devices)}
    out.sort(key=lambda o: (order.get(o.device, 0), o.index))
    return FleetResult(out)


__all__ = ["bench_fleet", "expand_settings", "FleetResult", "Outcome", "PackedBundle", "device_label"]
