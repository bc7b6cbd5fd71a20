"""Pick how the pipelined runner spends the cores on inference by measuring it on the run's own first frames.

The candidates differ only in the interpreters that invoke: one single-thread
copy per core side by side ("lanes"), one copy using every core ("threads"),
one single-thread copy that leaves the other cores to preprocessing
("single"), and on four or more cores half as many two-thread copies
("split"). Which is fastest depends on the model, the preprocessing, the
runtime's thread pool and the board; a formula over two timings got it wrong
(issue 15). So the first frames of a file or video run go through the
candidates in trials of a few frames each, without stopping the pipeline:
each candidate once, then again only those within ``margin`` of the best
(their best trial counts: other load only ever slows a run down), and the
rest of the run uses the fastest. Every probe frame is a frame of the run,
emitted once and in order; the candidates' interpreters are copies of one
model and XNNPACK's results do not depend on the thread count, so the
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
    """How long the probe may run: ``trial_frames`` per trial, at most ``rounds`` trials per candidate (a second
    one only while it is within ``margin`` of the best), and no new trial after ``max_ms``."""

    trial_frames: int = 6
    rounds: int = 2
    max_ms: float = 1500.0
    margin: float = 0.1


DEFAULT_LIMITS = ProbeLimits()


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
    """Frames [t*k, (t+1)*k): the candidate is picked when the first of them is about to invoke."""

    candidate: Optional[Candidate] = None
    routed: int = 0
    done: int = 0
    first_ns: Optional[int] = None  # when its first frame finished invoking
    last_ns: Optional[int] = None  # ... and its last
    fps: Optional[float] = None
    frames: int = 0


@dataclass(frozen=True)
class _Span:
    """One stage of one frame: its wall-clock span and which stage it was (credit is spread over the span)."""

    start: int
    end: int
    prep: bool


class _Ticket:
    """Frame n's way to its lanes: ``pool()`` when it is about to invoke, ``done(ms)`` after (None: no invoke)."""

    __slots__ = ("probe", "trial")

    def __init__(self, probe: "LaneProbe", trial: Optional[int]):
        self.probe, self.trial = probe, trial

    def pool(self) -> LanePool:
        return self.probe._pool_for(self.trial)

    def done(self, invoke_ms: Optional[float]) -> None:
        if self.trial is not None:
            self.probe._done(self.trial, invoke_ms)


class LaneProbe:
    """Routes frames to candidates' pools in trials while probing, then to the fastest.

    ``route`` is called by the loop's reader in frame order, ``prepped`` by its preprocessing workers, the
    tickets by its invoke threads, and ``close`` when the loop ends (a choice is then made from what was
    measured, so no frame waits for ever).

    A trial's frames start invoking once the previous trial's have all finished, so each trial has a window
    of its own (from the previous trial's last invoke to its own last); preprocessing never waits. Counting
    the frames of a window would credit a candidate with frames the previous one had prepared (an
    invoke-bound candidate leaves a queue of them behind), so a window is credited with the work done in it:
    each preprocessing and each invoke counts as its share of a frame (by the medians of their single-thread
    times), spread over its own span.
    """

    def __init__(self, cands: Sequence[Candidate], pools: Dict[str, LanePool], limits: Optional[ProbeLimits] = None,
                 clock: Callable[[], int] = now_ns):
        self.cands = tuple(c for c in cands if c.name in pools)
        if not self.cands:
            raise ValueError("a lane probe needs at least one candidate with interpreters")
        self.limits = limits = limits or DEFAULT_LIMITS
        self._k = max(1, limits.trial_frames)
        self._max_trials = len(self.cands) * max(1, limits.rounds)
        self._pools = dict(pools)
        self._clock = clock
        self._trials: List[_Trial] = []
        self._cond = threading.Condition()
        self._decided = False
        self._closed = False
        self._t0: Optional[int] = None
        self._ms: Optional[float] = None
        self._spans: List[_Span] = []
        self._samples: List[Tuple[bool, float, int]] = []  # (preprocessing?, ms, threads)
        self.chosen: Optional[Candidate] = None

    @property
    def width(self) -> int:
        """Invoke threads the loop needs: the widest candidate."""
        return max(c.lanes for c in self.cands)

    def route(self, n: int) -> _Ticket:
        """Frame ``n``'s ticket to the lanes it will invoke on (frames come in order, from one thread)."""
        t = n // self._k
        with self._cond:
            if self._t0 is None:
                self._t0 = self._clock()
            if self._decided or self._closed or t >= self._max_trials:
                return _Ticket(self, None)
            while len(self._trials) <= t:
                self._trials.append(_Trial())
            self._trials[t].routed += 1
            return _Ticket(self, t)

    def _pool_for(self, t: Optional[int]) -> LanePool:
        with self._cond:
            if t is not None and not self._decided:
                trial = self._trials[t]
                if trial.candidate is None and t > 0:  # the previous trial's invokes first
                    prev = self._trials[t - 1]
                    self._cond.wait_for(lambda: self._closed or self._decided or prev.done >= prev.routed)
                if not self._decided and trial.candidate is None:
                    self._start(t)
                if not self._decided:
                    return self._pools[trial.candidate.name]
            self._cond.wait_for(lambda: self._decided)
            return self._pools[self.chosen.name]

    def _start(self, t: int) -> None:
        """Pick trial t's candidate from the trials so far, or decide: each candidate once, then only those
        within the margin of the best that have trials left; none left, or out of time, decides."""
        self._measure()
        late = ns_to_ms(self._clock() - self._t0) >= self.limits.max_ms
        tried = [tr.candidate for tr in self._trials[:t]]
        fresh = [c for c in self.cands if c not in tried]
        if fresh and not late:
            self._trials[t].candidate = fresh[0]
            return
        rates = self.rates()
        best = max((r for r in rates.values() if r is not None), default=None)
        close = [c for c in self.cands
                 if best is None or rates[c.name] is None or rates[c.name] >= (1 - self.limits.margin) * best]
        again = [c for c in close if tried.count(c) < self.limits.rounds]
        if late or len(close) < 2 or not again:
            self._decide()
        else:
            self._trials[t].candidate = min(again, key=tried.count)

    def _done(self, t: int, invoke_ms: Optional[float]) -> None:
        with self._cond:
            tr = self._trials[t]
            tr.done += 1
            self._cond.notify_all()  # the next trial may be waiting for this one
            if self._decided:
                return
            if tr.candidate is not None:  # else an unreadable frame before its trial began
                now = self._clock()
                tr.first_ns = now if tr.first_ns is None else tr.first_ns
                tr.last_ns = now
                if invoke_ms is not None:
                    self._spans.append(_Span(now - int(invoke_ms * 1e6), now, False))
                    self._samples.append((False, invoke_ms, tr.candidate.threads))
            if t == self._max_trials - 1 and tr.done >= self._k:
                self._decide()  # the last trial there can be (even one of unreadable frames only)

    def prepped(self, ms: float) -> None:
        """A frame's preprocessing of ``ms`` ended now (any frame, any worker)."""
        with self._cond:
            if not self._decided:
                now = self._clock()
                self._spans.append(_Span(now - int(ms * 1e6), now, True))
                self._samples.append((True, ms, 1))

    def close(self) -> None:
        """End the probe with what it measured (a short source, or the loop stopped)."""
        with self._cond:
            self._closed = True
            if not self._decided:
                self._decide()
            self._cond.notify_all()

    def _decide(self) -> None:
        self._measure()
        rates = self.rates()
        measured = [c for c in self.cands if rates[c.name] is not None]
        # Ties keep the earlier candidate; nothing measured (a very short run) keeps the first.
        self.chosen = max(measured, key=lambda c: rates[c.name]) if measured else self.cands[0]
        self._ms = ns_to_ms(self._clock() - self._t0) if self._t0 is not None else 0.0
        self._pools = {self.chosen.name: self._pools[self.chosen.name]}  # the others' copies can go
        self._decided = True
        self._cond.notify_all()

    def _medians(self) -> Tuple[Optional[float], Optional[float]]:
        """Median preprocessing ms and single-thread invoke ms of the probe's frames."""
        prep = [ms for is_prep, ms, _ in self._samples if is_prep]
        inv = [ms for is_prep, ms, t in self._samples if not is_prep and t == 1]
        inv = inv or [ms * t for is_prep, ms, t in self._samples if not is_prep]  # core time, roughly
        return (statistics.median(prep) if prep else None), (statistics.median(inv) if inv else None)

    def _measure(self) -> None:
        """Each trial's frames/s: the work credited to its window over the window's length."""
        p, i = (m or 0.0 for m in self._medians())
        w_prep, w_inv = (p / (p + i), i / (p + i)) if p + i > 0 else (0.5, 0.5)
        for j, trial in enumerate(self._trials):
            # Trial 0's window opens when its first frame is out: the pipeline's fill is not counted.
            a = self._trials[j - 1].last_ns if j else trial.first_ns
            b, frames = trial.last_ns, trial.done - (0 if j else 1)
            if trial.candidate is None or a is None or b is None or b <= a or frames < 1:
                continue
            work = sum((w_prep if s.prep else w_inv) * _overlap(s, a, b) for s in self._spans)
            trial.fps, trial.frames = work / ((b - a) / 1e9), frames

    def rates(self) -> Dict[str, Optional[float]]:
        """Each candidate's best measured frames/s (None when none of its trials was measured)."""
        best: Dict[str, Optional[float]] = {c.name: None for c in self.cands}
        for tr in self._trials:
            if tr.fps is not None and (best[tr.candidate.name] is None or tr.fps > best[tr.candidate.name]):
                best[tr.candidate.name] = tr.fps
        return best

    def report(self) -> Optional[dict]:
        """The report's ``settings.lane_probe``: the choice, what it cost and every candidate's measured rate."""
        if self.chosen is None:
            return None
        rates = self.rates()
        prep_ms, invoke_ms = self._medians()
        tried = [tr for tr in self._trials if tr.candidate is not None]
        return {
            "lanes": self.chosen.lanes, "threads": self.chosen.threads, "chosen": self.chosen.name,
            "method": "measured", "frames": sum(tr.routed for tr in tried), "ms": self._ms,
            "preprocess_ms": prep_ms, "invoke_ms": invoke_ms,
            "candidates": [
                {"name": c.name, "lanes": c.lanes, "threads": c.threads, "fps": rates[c.name],
                 "frames": sum(tr.frames for tr in tried if tr.candidate == c),
                 "trials": sum(1 for tr in tried if tr.candidate == c)}
                for c in self.cands],
        }


def _overlap(s: _Span, a: int, b: int) -> float:
    """The share of span ``s`` inside (a, b]; a span of no length counts whole where it ends."""
    if s.end <= s.start:
        return 1.0 if a < s.end <= b else 0.0
    return max(0, min(s.end, b) - max(s.start, a)) / (s.end - s.start)


__all__ = ["Candidate", "LaneProbe", "ProbeLimits", "build_pools", "candidates", "copies_needed", "lanes_that_fit",
           "open_probe"]
