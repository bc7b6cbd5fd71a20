"""edgepipe.device.timing: statistics on known inputs, agreement with numpy, stopwatch bookkeeping."""
from __future__ import annotations

import math

import numpy as np
import pytest

from edgepipe.device.timing import STAT_KEYS, Stopwatch, ns_to_ms, percentile, stats


def test_stats_on_known_values():
    s = stats(range(1, 101))  # 1..100
    assert list(s) == list(STAT_KEYS)
    assert s["n"] == 100
    assert s["mean"] == 50.5
    assert s["min"] == 1.0 and s["max"] == 100.0
    assert s["p50"] == pytest.approx(50.5)
    assert s["p90"] == pytest.approx(90.1)
    assert s["p99"] == pytest.approx(99.01)
    assert s["std"] == pytest.approx(math.sqrt((100 ** 2 - 1) / 12))  # population std of 1..n


def test_stats_agree_with_numpy_on_random_samples():
    rng = np.random.default_rng(0)
    for n in (1, 2, 3, 7, 50, 1001):
        x = rng.lognormal(1.0, 0.5, n)
        s = stats(x.tolist())
        assert s["n"] == n
        assert s["mean"] == pytest.approx(np.mean(x), rel=1e-12)
        assert s["std"] == pytest.approx(np.std(x), rel=1e-9, abs=1e-12)
        for q in (50, 90, 99):
            assert s[f"p{q}"] == pytest.approx(np.percentile(x, q), rel=1e-12)
        assert (s["min"], s["max"]) == (x.min(), x.max())


def test_stats_order_independent_and_single_and_empty():
    assert stats([3.0, 1.0, 2.0]) == stats([1.0, 2.0, 3.0])
    one = stats([4.2])
    assert one["n"] == 1 and one["std"] == 0.0
    assert {one[k] for k in ("mean", "min", "p50", "p90", "p99", "max")} == {4.2}
    empty = stats([])
    assert empty["n"] == 0 and all(empty[k] is None for k in STAT_KEYS[1:])
    assert stats(iter([1, 2])) == stats([1, 2])  # generators work


def test_percentile_bounds():
    assert percentile([], 50) is None
    assert percentile([1.0, 3.0], 0) == 1.0 and percentile([1.0, 3.0], 100) == 3.0
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_stopwatch_laps_accumulate_and_elapsed_grows():
    sw = Stopwatch()
    with sw.lap("a"):
        sum(range(1000))
    first = sw.laps["a"]
    with sw.lap("a"):
        sum(range(1000))
    assert sw.laps["a"] > first > 0
    e1 = sw.elapsed_ms()
    assert sw.elapsed_ms() >= e1 >= sw.laps["a"]
    with pytest.raises(RuntimeError):
        Stopwatch(start=False).elapsed_ms()
    # a failing block is still timed
    with pytest.raises(KeyError):
        with sw.lap("b"):
            raise KeyError
    assert "b" in sw.laps


def test_ns_to_ms():
    assert ns_to_ms(1_500_000) == 1.5
