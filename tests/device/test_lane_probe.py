"""The lane probe: its candidates, a choice that follows the measured rates, and probe frames that are ordinary
frames of the run (emitted once, in order, with the predictions of any other setting)."""
from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
from sample_photos import copy_photos

from edgepipe.device import lane_probe as lane_probe_mod
from edgepipe.device import runner as runner_mod
from edgepipe.device.lane_probe import (Candidate, LaneProbe, ProbeLimits, build_pools, candidates,
                                        copies_needed, open_probe)
from edgepipe.device.runloop import FrameLoop, LanePool, _Prepared
from edgepipe.device.runner import run_source
from edgepipe.device.sources import Frame

ROOT = Path(__file__).resolve().parents[2]
IMAGES = ROOT / "sample_data" / "images"


def test_candidates_cover_lanes_threads_and_one_lane_within_memory():
    assert candidates(2, 8) == (Candidate("lanes", 2, 1), Candidate("threads", 1, 2), Candidate("single", 1, 1))
    assert candidates(4, 8)[-1] == Candidate("split", 2, 2)  # 4 + 1 copies, then two 2-thread ones
    assert [c.name for c in candidates(4, 6)] == ["lanes", "threads", "single"]  # no room for the split
    assert candidates(4, 3)[0] == Candidate("lanes", 2, 1)  # lanes narrowed to what fits beside the 4-thread copy
    assert candidates(2, 2) == (Candidate("threads", 1, 2), Candidate("single", 1, 1))
    assert candidates(1, 8) == () and candidates(2, 1) == ()
    assert copies_needed(candidates(4, 8)) == {1: 4, 4: 1, 2: 2}


class FakeClock:
    """A clock the test moves by hand (ns)."""

    def __init__(self):
        self.t = 0

    def __call__(self) -> int:
        return self.t


def _pools(cands):
    return build_pools(cands, {t: [object() for _ in range(n)] for t, n in copies_needed(cands).items()})


def _frame(probe: LaneProbe, clock: FakeClock, ticket, ms_per_frame, pools: dict):
    """One frame alone, on the pool its ticket gets: preprocessing for the first 60% of its candidate's time,
    invoke for the rest. Returns the pool."""
    pool = ticket.pool()
    name = next(n for n, p in pools.items() if p is pool)
    ms = ms_per_frame(name) if callable(ms_per_frame) else ms_per_frame.get(name, 1.0)
    clock.t += int(ms * 0.6e6)
    probe.prepped(ms * 0.6)
    clock.t += int(ms * 0.4e6)
    ticket.done(ms * 0.4)
    return pool


def _drive(probe: LaneProbe, clock: FakeClock, pools: dict, ms_per_frame, n_frames: int) -> list:
    """Route and run frames one by one; the pools they were routed to."""
    return [_frame(probe, clock, probe.route(n), ms_per_frame, pools) for n in range(n_frames)]


def _probe(cands, clock, **limits):
    pools = _pools(cands)
    return LaneProbe(cands, pools, ProbeLimits(**limits), clock), pools


def test_the_fastest_measured_candidate_wins_whatever_its_place():
    cands = candidates(2, 8)
    for fast in ("lanes", "threads", "single"):
        clock = FakeClock()
        probe, pools = _probe(cands, clock, trial_frames=4, rounds=2, max_ms=10_000)
        ms = {c.name: 20.0 for c in cands}
        ms[fast] = 10.0
        routed = _drive(probe, clock, pools, ms, 40)
        assert probe.chosen.name == fast and all(p is pools[fast] for p in routed[12:])
        rep = probe.report()
        # Round one only: the others are at half the rate, far outside the margin.
        assert rep["chosen"] == fast and rep["method"] == "measured" and rep["frames"] == 12
        rates = {c["name"]: c["fps"] for c in rep["candidates"]}
        assert rates[fast] == pytest.approx(100.0) and all(rates[n] == pytest.approx(50.0) for n in rates if n != fast)
        assert (rep["lanes"], rep["threads"]) == (probe.chosen.lanes, probe.chosen.threads)
        assert rep["preprocess_ms"] == pytest.approx(12.0) and 4.0 <= rep["invoke_ms"] <= 8.0  # medians


def test_close_candidates_get_a_second_trial_and_their_best_counts():
    """threads, slowed down in its first trial (other load), is within the margin of single: both may run
    again, threads first; its better trial wins, and single's is not needed once it is out of the margin."""
    cands = candidates(2, 2)  # threads, single
    clock = FakeClock()
    probe, pools = _probe(cands, clock, trial_frames=3, rounds=2, max_ms=10_000)
    times = iter([100, 21, 21, 20, 20, 20, 10, 10, 10, 10, 10, 10])
    _drive(probe, clock, pools, lambda name: next(times), 12)
    rates = probe.rates()
    assert rates["threads"] == pytest.approx(100.0) and rates["single"] == pytest.approx(50.0)
    assert probe.chosen.name == "threads"
    rep = probe.report()
    assert [(c["frames"], c["trials"]) for c in rep["candidates"]] == [(5, 2), (3, 1)]  # frame 0 only starts
    assert rep["frames"] == 9


def test_time_budget_ends_the_probe_at_a_trial_boundary():
    cands = candidates(2, 8)
    clock = FakeClock()
    probe, pools = _probe(cands, clock, trial_frames=4, rounds=2, max_ms=50)
    routed = _drive(probe, clock, pools, {"lanes": 20.0, "threads": 5.0, "single": 5.0}, 12)
    rep = probe.report()
    assert rep["frames"] == 4  # the first trial alone took 80 ms: no second one
    assert probe.chosen.name == "lanes" and all(p is pools["lanes"] for p in routed)
    assert [c["fps"] is None for c in rep["candidates"]] == [False, True, True]


def test_a_short_source_or_a_stopped_loop_still_chooses():
    cands = candidates(2, 8)
    clock = FakeClock()
    probe, pools = _probe(cands, clock, trial_frames=4, rounds=2)
    _drive(probe, clock, pools, {"lanes": 30.0, "threads": 10.0}, 7)  # the source ends inside the second trial
    assert probe.chosen is None
    probe.close()
    assert probe.chosen.name == "threads" and probe.report()["frames"] == 7
    empty = LaneProbe(cands, _pools(cands))
    empty.close()
    assert empty.chosen == cands[0] and all(c["fps"] is None for c in empty.report()["candidates"])


def test_a_frame_after_the_probe_waits_for_the_choice():
    cands = candidates(2, 2)
    clock = FakeClock()
    probe, pools = _probe(cands, clock, trial_frames=2, rounds=1)
    tickets = [probe.route(n) for n in range(4)]
    after = probe.route(4)  # routed while frames 0-3 are still in flight
    got = []
    t = threading.Thread(target=lambda: got.append(after.pool()))
    t.start()
    t.join(0.05)
    assert not got  # no choice yet
    for ticket in tickets:
        _frame(probe, clock, ticket, {"threads": 5.0, "single": 1.0}, pools)
    t.join(10)
    assert got == [pools["single"]] and probe.chosen.name == "single"


def test_a_trial_invokes_only_after_the_previous_one_is_done():
    cands = candidates(2, 8)
    probe, pools = _probe(cands, FakeClock(), trial_frames=2, rounds=1)
    tickets = [probe.route(n) for n in range(4)]
    assert tickets[0].pool() is pools["lanes"]
    got = []
    t = threading.Thread(target=lambda: got.append(tickets[2].pool()))
    t.start()
    tickets[0].done(1.0)
    t.join(0.05)
    assert not got  # frame 1 (trial 0) has not invoked yet
    tickets[1].done(None)  # an unreadable frame counts as done too
    t.join(10)
    assert got == [pools["threads"]]


def test_work_is_credited_to_the_window_it_is_done_in_not_to_the_frames_emitted():
    """An invoke-bound candidate leaves prepared frames behind: the next one gets through them faster without
    being faster. A window is credited with the work done in it (invokes only, here), and the first one with
    the preprocessing it did ahead."""
    cands = candidates(2, 2)  # threads, single
    clock = FakeClock()
    probe, pools = _probe(cands, clock, trial_frames=2, rounds=1)
    tickets = [probe.route(n) for n in range(4)]

    def at(ms, call):
        clock.t = int(ms * 1e6)
        return call()

    at(5, lambda: probe.prepped(5.0))  # frames 0 and 1 on two workers
    at(5, lambda: probe.prepped(5.0))
    assert at(5, tickets[0].pool) is pools["threads"]
    at(10, lambda: tickets[0].done(5.0))  # trial 0's window opens (the fill is not counted)
    at(10, tickets[1].pool)
    at(15, lambda: probe.prepped(5.0))  # frames 2 and 3 prepared while frame 1 invokes
    at(20, lambda: probe.prepped(5.0))
    at(20, lambda: tickets[1].done(10.0))
    assert at(20, tickets[2].pool) is pools["single"]
    at(30, lambda: tickets[2].done(10.0))  # frames 2, 3: invokes only
    at(30, tickets[3].pool)
    at(40, lambda: tickets[3].done(10.0))
    rates = probe.rates()
    # Medians 5 ms preprocessing, 10 ms single-thread invoke: a third and two thirds of a frame.
    # threads: 1 invoke + 2 preprocessings in 10 ms; single: 2 invokes in 20 ms (it emitted more frames).
    assert rates["threads"] == pytest.approx(1000 * 4 / 3 / 10) and rates["single"] == pytest.approx(1000 * 4 / 3 / 20)
    assert probe.chosen.name == "threads"


class FakeModel:
    """An interpreter whose invoke sleeps ``ms`` and whose output is a function of the input alone; it fails
    loudly if two frames use it at once."""

    outputs = (object(),)

    def __init__(self, ms: float):
        self.ms = ms
        self.busy = threading.Lock()
        self.x = None

    def set_input(self, i, x):
        assert self.busy.acquire(blocking=False), "one interpreter used by two frames at once"
        self.x = x

    def invoke(self):
        time.sleep(self.ms / 1000.0)

    def get_output(self, i):
        y = self.x * 3.0 + 1.0
        self.busy.release()
        return y


def _frames(n: int):
    for i in range(n):
        yield Frame(index=i, name=f"f{i}", data=None, t0_ns=time.perf_counter_ns(), capture_ms=0.0)


def _prep_but(bad):
    def prep(frame: Frame) -> _Prepared:
        if frame.index in bad:
            return _Prepared(None, 0.0, f"f{frame.index}: unreadable")
        return _Prepared(np.full((1, 2), float(frame.index), np.float32), 0.1)
    return prep


def _loop(probe, n_frames: int, depth: int = 4, bad=(5,)):
    recs = []
    loop = FrameLoop(LanePool([FakeModel(0.0)]), _prep_but(set(bad)), lambda raw: {"y": raw[0].tolist()},
                     recs.append)
    loop.pipelined(_frames(n_frames), 2, probe.width if probe else 1, depth, probe)
    return recs


def test_probe_frames_are_emitted_once_in_order_and_the_fast_candidate_keeps_the_run():
    """Real threads, sleeping fake interpreters: 'threads' invokes in 1 ms, the others in 60 ms (a gap no busy
    machine closes); every frame comes out once, in order, with the output of an unprobed run."""
    cands = candidates(2, 8)
    speed = {1: 60.0, 2: 1.0}
    models = {t: [FakeModel(speed[t]) for _ in range(n)] for t, n in copies_needed(cands).items()}
    probe = LaneProbe(cands, build_pools(cands, models), ProbeLimits(trial_frames=3, rounds=1, max_ms=10_000))
    recs = _loop(probe, 30)
    plain = _loop(None, 30)
    assert recs == plain and [r["frame"] for r in recs] == list(range(30))
    assert recs[5] == {"frame": 5, "source": "f5", "error": "f5: unreadable"}
    assert recs[7]["y"] == [[22.0, 22.0]]
    assert probe.chosen.name == "threads"
    rates = probe.rates()
    assert rates["threads"] > 3 * max(rates["lanes"], rates["single"])


def test_unreadable_frames_anywhere_in_the_probe_do_not_stall_the_run():
    """A whole trial of unreadable frames (the first, a middle or the last one) never invokes: the probe still
    moves on and chooses, and every frame comes out."""
    cands = candidates(2, 8)
    for bad in ((0, 1), (2, 3), (4, 5), tuple(range(6))):
        probe = LaneProbe(cands, _pools_of_fakes(cands), ProbeLimits(trial_frames=2, rounds=1))
        out = []
        t = threading.Thread(target=lambda: out.append(_loop(probe, 10, bad=bad)), daemon=True)
        t.start()
        t.join(60)  # a stall fails here instead of hanging the suite
        assert out, f"the run stalled with frames {bad} unreadable"
        recs = out[0]
        assert [r["frame"] for r in recs] == list(range(10)) and probe.chosen is not None, bad
        assert all(("error" in r) == (r["frame"] in bad) for r in recs)


def _pools_of_fakes(cands, ms=None):
    ms = ms or {}
    return build_pools(cands, {t: [FakeModel(ms.get(t, 0.0)) for _ in range(n)]
                               for t, n in copies_needed(cands).items()})


def test_open_probe_loads_the_missing_copies_and_reuses_the_run_interpreter():
    loaded = FakeModel(0.0)
    loaded.threads = 1
    asked = []

    def load(n, threads):
        asked.append((n, threads))
        return [FakeModel(0.0) for _ in range(n)]

    probe = open_probe(loaded, 2, lambda n: n, load)
    assert sorted(asked) == [(1, 1), (1, 2)] and [c.name for c in probe.cands] == ["lanes", "threads", "single"]
    asked.clear()
    assert open_probe(loaded, 2, lambda n: 1, load) is None and asked == []  # one copy fits: nothing to measure
    failing = open_probe(loaded, 2, lambda n: n, lambda n, t: [] if t == 2 else [FakeModel(0.0)] * n)
    assert [c.name for c in failing.cands] == ["lanes", "single"]  # the 2-thread copy failed to load


# --------------------------------------------------------------------------- run_source with a real model


@pytest.fixture
def folder(tmp_path, monkeypatch):
    """20 photos and a corrupt file; the probe's time budget lifted, so the frame counts below do not depend
    on how fast this machine is (under emulation 1.5 s ends the probe after its first trial)."""
    monkeypatch.setattr(lane_probe_mod, "DEFAULT_LIMITS", ProbeLimits(max_ms=600_000.0))
    d = copy_photos(tmp_path / "frames", 20)
    (d / "z_corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a JPEG")
    return d


@pytest.fixture
def conv_bundle(make_bundle, models_dir):
    return make_bundle(models_dir / "conv_stack_f32.tflite", name="convf", labels=["a", "b", "c", "d"])


def test_probed_run_predicts_like_a_sequential_one(conv_bundle, folder, monkeypatch, assert_valid_report):
    monkeypatch.setattr(runner_mod, "usable_cores", lambda: 2)  # probe on a one-core CI runner too
    probed, seq = [], []
    r = run_source(conv_bundle, str(folder), on_prediction=probed.append)
    run_source(conv_bundle, str(folder), pipeline=False, on_prediction=seq.append)
    assert probed == seq and [x["frame"] for x in probed] == list(range(21))
    assert_valid_report(r)
    probe = r["settings"]["lane_probe"]
    # Each candidate once (3 x 6 frames); the close ones again until the folder ends.
    assert probe["method"] == "measured" and 18 <= probe["frames"] <= 21
    assert [c["name"] for c in probe["candidates"]] == ["lanes", "threads", "single"]
    measured = [c for c in probe["candidates"] if c["fps"] is not None]
    assert max(measured, key=lambda c: c["fps"])["name"] == probe["chosen"]
    assert (r["settings"]["lanes"], r["runtime"]["threads"]) == (probe["lanes"], probe["threads"])
    assert r["throughput"]["frames"] == 20 and r["settings"]["predictions"] == 21 and r["errors"] == []
    assert r["settings"]["threads"] is None  # what the user asked stays as asked


def test_no_probe_when_told_or_live(conv_bundle, folder, monkeypatch):
    from edgepipe.device.runner import StopRun

    monkeypatch.setattr(runner_mod, "usable_cores", lambda: 2)
    for kw in (dict(lanes=2), dict(threads=1), dict(workers=2), dict(pipeline=False)):
        r = run_source(conv_bundle, str(folder), max_frames=3, **kw)
        assert r["settings"]["lane_probe"] is None, kw
    assert run_source(conv_bundle, str(folder), max_frames=3, threads=1)["settings"]["lanes"] == 2

    seen = []

    def stop_at_4(rec):  # a consumer that leaves inside the probe: the run ends cleanly, nothing waits for ever
        if len(seen) == 4:
            raise StopRun("reader left")
        seen.append(rec)

    r = run_source(conv_bundle, str(folder), on_prediction=stop_at_4)
    assert r["throughput"]["frames"] == 4 and "stopped after 4 frame(s): reader left" in r["warnings"]
    assert 4 <= r["settings"]["lane_probe"]["frames"] <= 36  # the ones routed before the loop ended


def test_report_contract_takes_old_and_new_lane_probe_blocks(conv_bundle, folder, monkeypatch):
    """settings.lane_probe is optional and open: reports from the formula probe stay valid, new fields are checked."""
    import copy

    from edgepipe.device.contracts import report_problem

    monkeypatch.setattr(runner_mod, "usable_cores", lambda: 2)
    r = run_source(conv_bundle, str(folder), max_frames=8)
    assert report_problem(r) is None and r["settings"]["lane_probe"]["frames"] == 8
    old = copy.deepcopy(r)
    old["settings"]["lane_probe"] = {"invoke_ms": 0.1, "preprocess_ms": 2.0, "lanes": 1}
    assert report_problem(old) is None
    bad = copy.deepcopy(r)
    del bad["settings"]["lane_probe"]["candidates"][0]["name"]
    assert "name" in report_problem(bad)
    bad = copy.deepcopy(r)
    bad["settings"]["lane_probe"]["lanes"] = 0
    assert "lanes" in report_problem(bad)
