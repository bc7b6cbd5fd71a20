"""Pick how the pipelined runner spends the cores on inference by measuring it on the run's own first frames.

The candidates differ only in the interpreters that invoke: one single-thread
copy per core side by side ("lanes"), one copy using every core ("threads"),
one single-thread copy that leaves the other cores to preprocessing
("single"), and on four or more cores half as many two-thread copies
("split"). Which is fastest depends on the model, the preprocessing, the
runtime's thread pool and the board, and a formula over two timings got it
wrong (issue 15), so the first frames of a file or video run go through each
candidate in turn, a few frames each, in two rounds, without stopping the
pipeline. Each frame's emission interval counts for the candidate that invoked
it; a candidate's rate is its best round (other load only ever slows a run
down); the rest of the run uses the fastest. Every probe frame is a frame of
the run, emitted once and in order; the candidates' interpreters are copies of
one model, and XNNPACK's results do not depend on the thread count, so
predictions are those of any other setting.
"""
from __future__ import annotations

import statistics
import threading
from dataclasses import dataclass, replace
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from edgepipe.device.runloop import LanePool
from edgepipe.device.timing import now_ns, ns_to_ms


@dataclass(frozen=True)
class Candidate:
    """One way to run inference: ``lanes`` interpreter copies of ``threads`` threads each."""

    name: str
    lanes: int
    threads: int


@dataclass(frozen=True)
class ProbeLimits:
    """How long the probe may run: ``trial_frames`` per trial, ``rounds`` over the candidates, and no new trial
    after ``max_ms`` (the frames already routed finish their trial)."""

    trial_frames: int = 6
    rounds: int = 2
    max_ms: float = 1500.0


def lanes_that_fit(n_lanes: int, model_size: int) -> int:
    """Each copy holds its own packed weights (~ the model's size twice): keep all copies within a quarter
    of the free memory, so a big model on a small board stays at one."""
    from edgepipe.device import sysinfo

    free_mb = (sysinfo.memory_mb() or {}).get("available")
    if not free_mb:
        return n_lanes
    fit = int(free_mb * 1e6 * 0.25 // max(1, 2 * model_size))
    return max(1, min(n_lanes, fit))


def candidates(cores: int, copies: int) -> Tuple[Candidate, ...]:
    """The splits worth measuring on ``cores`` cores when ``copies`` interpreters fit in memory together.

    The thread-1 copies are shared by "lanes" and "single"; none when there is one core or room for one copy.
    """
    if cores < 2 or copies < 2:
        return ()
    width = min(cores, copies - 1)  # one copy is the all-cores one
    out = [Candidate("lanes", width, 1)] if width > 1 else []
    out += [Candidate("threads", 1, cores), Candidate("single", 1, 1)]
    left = copies - 1 - width
    if cores >= 4 and left >= 2:
        out.append(Candidate("split", min(cores // 2, left), 2))
    return tuple(out)


def copies_needed(cands: Sequence[Candidate]) -> Dict[int, int]:
    """Interpreters to hold per thread count: the widest candidate of each count."""
    need: Dict[int, int] = {}
    for c in cands:
        need[c.threads] = max(need.get(c.threads, 0), c.lanes)
    return need


def build_pools(cands: Sequence[Candidate], models: Dict[int, List[Any]]) -> Dict[str, LanePool]:
    """One pool per candidate; candidates with the same thread count lend from the same interpreters."""
    shared = {t: LanePool(ms) for t, ms in models.items() if ms}
    return {c.name: shared[c.threads].narrowed(c.lanes) for c in cands if c.threads in shared}


def open_probe(loaded: Any, cores: int, fit: Callable[[int], int],
               load: Callable[[int, int], List[Any]]) -> Optional["LaneProbe"]:
    """A probe over the candidates for ``cores`` cores, or None when fewer than two can be measured.

    ``loaded`` is the run's interpreter (reused for its thread count), ``fit(n)`` how many of n copies fit in
    memory, ``load(n, threads)`` up to n more warmed-up copies (fewer when one fails to load).
    """
    want = cores + 1 + (cores // 2 if cores >= 4 else 0)  # every candidate's copies
    cands = candidates(cores, fit(want))
    need = copies_needed(cands)
    models = {t: [loaded] if loaded.threads == t else [] for t in need}
    for t, n in need.items():
        models[t] += load(n - len(models[t]), t)
    # A copy that failed to load narrows its candidates; one lane of single-thread copies is "single" already.
    cands = [replace(c, lanes=min(c.lanes, len(models[c.threads]))) for c in cands if models[c.threads]]
    cands = [c for c in cands if not (c.name == "lanes" and c.lanes < 2)]
    if len(cands) < 2:
        return None
    return LaneProbe(cands, build_pools(cands, models))


@dataclass
class _Trial:
    candidate: Candidate
    frames: int = 0
    ns: int = 0

    @property
    def fps(self) -> Optional[float]:
        return self.frames / (self.ns / 1e9) if self.frames and self.ns > 0 else None


class LaneProbe:
    """Routes frame n to a candidate's pool while probing, then to the fastest; the frame loop reports emissions.

    ``route`` is called by the loop's reader in frame order, ``emitted`` by its consumer in frame order, and
    ``close`` when the loop ends (a choice is made from what was measured, so no frame waits for ever).
    """

    def __init__(self, cands: Sequence[Candidate], pools: Dict[str, LanePool], limits: ProbeLimits = ProbeLimits(),
                 clock: Callable[[], int] = now_ns):
        self.cands = tuple(c for c in cands if c.name in pools)
        if not self.cands:
            raise ValueError("a lane probe needs at least one candidate with interpreters")
        self.limits = limits
        self._pools = dict(pools)
        self._clock = clock
        self._trials = [_Trial(c) for _ in range(max(1, limits.rounds)) for c in self.cands]
        self._lock = threading.Lock()
        self._decided = threading.Event()
        self._t0: Optional[int] = None
        self._ms: Optional[float] = None
        self._end: Optional[int] = None  # the first frame after the probe
        self._emitted = 0
        self._last_ns: Optional[int] = None
        self._stage_ms: List[Tuple[float, float, int]] = []  # capture+preprocess, invoke, threads
        self.chosen: Optional[Candidate] = None

    @property
    def width(self) -> int:
        """Invoke threads the loop needs: the widest candidate."""
        return max(c.lanes for c in self.cands)

    def _trial_of(self, n: int) -> Optional[int]:
        k = max(1, self.limits.trial_frames)
        if self._t0 is None:
            self._t0 = self._clock()
        if self._end is None:
            t = n // k
            late = n % k == 0 and t > 0 and ns_to_ms(self._clock() - self._t0) >= self.limits.max_ms
            if t < len(self._trials) and not late:
                if n + 1 == len(self._trials) * k:  # the last probe frame: choose as soon as it is out
                    self._end = n + 1
                return t
            self._end = n
            self._decide_if_done()
        return None

    def route(self, n: int) -> Callable[[], LanePool]:
        """The pool that frame ``n`` invokes on, as a call made when it is about to invoke."""
        with self._lock:
            t = self._trial_of(n)
            if t is not None:
                pool = self._pools[self._trials[t].candidate.name]
                return lambda: pool
        return self._winner

    def _winner(self) -> LanePool:
        self._decided.wait()
        return self._pools[self.chosen.name]

    def emitted(self, n: int, ok: bool, prep_ms: float = 0.0, invoke_ms: float = 0.0) -> None:
        """Frame ``n`` was emitted now; ``ok`` False for an unreadable frame (no invoke: its interval is left out)."""
        with self._lock:
            t_now = self._clock()
            if self._decided.is_set():
                return
            t = n // max(1, self.limits.trial_frames)
            if ok and t < len(self._trials) and (self._end is None or n < self._end):
                trial = self._trials[t]
                self._stage_ms.append((prep_ms, invoke_ms, trial.candidate.threads))
                if self._last_ns is not None:
                    trial.frames += 1
                    trial.ns += t_now - self._last_ns
            self._last_ns = t_now
            self._emitted = n + 1
            self._decide_if_done()

    def close(self) -> None:
        """End the probe with what it measured (a short source, or the loop stopped)."""
        with self._lock:
            if self._end is None:
                self._end = self._emitted
            self._decide_if_done()

    def _decide_if_done(self) -> None:
        if self._decided.is_set() or self._end is None or self._emitted < self._end:
            return
        rates = self.rates()
        measured = [c for c in self.cands if rates[c.name] is not None]
        # Ties keep the earlier candidate; nothing measured (a very short run) keeps the first.
        self.chosen = max(measured, key=lambda c: rates[c.name]) if measured else self.cands[0]
        self._ms = ns_to_ms(self._clock() - self._t0) if self._t0 is not None else 0.0
        self._pools = {self.chosen.name: self._pools[self.chosen.name]}  # the others' copies can go
        self._decided.set()

    def rates(self) -> Dict[str, Optional[float]]:
        """Each candidate's best measured frames/s (None when none of its trials counted a frame)."""
        best: Dict[str, Optional[float]] = {c.name: None for c in self.cands}
        for tr in self._trials:
            fps = tr.fps
            if fps is not None and (best[tr.candidate.name] is None or fps > best[tr.candidate.name]):
                best[tr.candidate.name] = fps
        return best

    def report(self) -> Optional[dict]:
        """The report's ``settings.lane_probe``: the choice, what it cost and every candidate's measured rate."""
        if self.chosen is None:
            return None
        rates = self.rates()
        prep = [p for p, _, _ in self._stage_ms]
        single = [i for _, i, t in self._stage_ms if t == 1] or [i for _, i, _ in self._stage_ms]
        return {
            "lanes": self.chosen.lanes, "threads": self.chosen.threads, "chosen": self.chosen.name,
            "method": "measured", "frames": self._end, "ms": self._ms,
            "preprocess_ms": statistics.median(prep) if prep else None,
            "invoke_ms": statistics.median(single) if single else None,
            "candidates": [
                {"name": c.name, "lanes": c.lanes, "threads": c.threads, "fps": rates[c.name],
                 "frames": sum(t.frames for t in self._trials if t.candidate == c)}
                for c in self.cands],
        }


__all__ = ["Candidate", "LaneProbe", "ProbeLimits", "build_pools", "candidates", "copies_needed", "lanes_that_fit",
           "open_probe"]
