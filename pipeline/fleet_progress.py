"""What `edgepipe bench` shows while a fleet works: a line per device with its current job, or plain lines.

On a terminal (and without --json) every device gets a bar over its jobs with
an ETA, showing the job it is on, under an overall bar over all jobs; failures,
devices going down, offline or back online are printed above the bars. Off a
terminal the events are the timestamped lines they always were. Both the HTTP
(``fleet.bench_fleet``) and the broker (``fleet_broker.bench_broker``) paths
call it with ``(device, bundle, stage, detail)``; every device runs the same
jobs in the same order, so the job after the n-th finished one is known.
"""
from __future__ import annotations

import sys
import threading
import time
from typing import Optional, Sequence, TextIO

from edgepipe.device.progress import Bar, enabled
from edgepipe.pipeline.fleet import setting_label

# Stages that end a job (the HTTP path reports a refusal as "refused").
FINAL = ("done", "failed", "refused", "skipped")
# Device-wide events (bundle "-") printed above the bars.
NOTICES = ("down", "offline", "online")


def job_names(packed: Sequence, settings: Sequence[dict]) -> list:
    """The job names every device runs, in order (as the fleet modules name them)."""
    return [f"{pb.name} {setting_label(st) if len(settings) > 1 else ''}".strip() for pb in packed for st in settings]


class FleetProgress:
    """The ``on_event`` callback of a fleet bench; a context manager that clears its bars on exit."""

    def __init__(self, jobs: Sequence[str], devices: Sequence[str] = (), *, on: Optional[bool] = None,
                 stream: Optional[TextIO] = None):
        """``jobs``: names per device in order; ``devices``: labels known up front (others join when seen)."""
        self.jobs = list(jobs)
        self.known = list(devices)
        self.stream = stream
        self.on = enabled(stream) if on is None else on
        self.t0 = time.monotonic()
        self._lock = threading.Lock()
        self._total: Optional[Bar] = None
        self._lines: dict = {}
        self._done: dict = {}

    def __call__(self, dev: str, bundle: str, stage: str, detail: str) -> None:
        with self._lock:
            if not self.on:
                self._plain(dev, bundle, stage, detail)
            else:
                self._event(dev, bundle, stage, detail)

    def _plain(self, dev: str, bundle: str, stage: str, detail: str) -> None:
        print(f"[{time.monotonic() - self.t0:6.1f}s] {dev:<21} {bundle:<28} {stage:<7} {detail}",
              file=self.stream or sys.stderr, flush=True)

    def _line(self, dev: str) -> Bar:
        """The device's bar, created (with the overall one) the first time it is needed."""
        if self._total is None:
            self._total = Bar(None, "all devices", unit="job", on=True, stream=self.stream, position=0)
            for d in self.known:
                self._add(d)
        if dev not in self._lines:
            self._add(dev)
        return self._lines[dev]

    def _add(self, dev: str) -> None:
        self._lines[dev] = Bar(len(self.jobs), dev, unit="job", on=True, stream=self.stream,
                               position=len(self._lines) + 1)
        self._done[dev] = 0
        self._total.set_total(len(self.jobs) * len(self._lines))
        self._lines[dev].note(self._current(dev))

    def _current(self, dev: str) -> str:
        n = self._done[dev]
        return self.jobs[n] if n < len(self.jobs) else "finished"

    def _event(self, dev: str, bundle: str, stage: str, detail: str) -> None:
        line = self._line(dev)
        if stage in FINAL:
            self._advance(dev, 1)
            if stage != "done":
                line.write(f"{stage.upper():<8}{dev}  {bundle}: {detail}")
            line.note(self._current(dev) if stage != "done" or not detail else
                      f"{self._current(dev)}  (last: {detail})")
        elif stage == "down":
            self._advance(dev, len(self.jobs) - self._done[dev])
            line.write(f"DOWN    {dev}: {detail}")
            line.note("down")
        elif stage in NOTICES:
            line.write(f"{stage.upper():<8}{dev}: {detail}")
            line.note(f"{self._current(dev)}  ({stage})")
        elif stage == "upload":
            line.note(f"{bundle}  uploading {detail}")
        elif stage == "running":
            line.note(f"{bundle}  {detail}".strip())
        else:  # queued (the HTTP path: running next; the broker: sent ahead): show the job in progress
            line.note(self._current(dev))

    def _advance(self, dev: str, n: int) -> None:
        n = max(0, min(n, len(self.jobs) - self._done[dev]))
        self._done[dev] += n
        self._lines[dev].update(n)
        self._total.update(n)

    def close(self) -> None:
        with self._lock:
            for b in self._lines.values():
                b.close()
            if self._total is not None:
                self._total.close()

    def __enter__(self) -> "FleetProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


__all__ = ["FleetProgress", "job_names"]
