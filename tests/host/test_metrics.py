"""Agreement and accuracy math on crafted outputs (no runtime, no TensorFlow)."""
import math

import numpy as np
import pytest

from edgepipe.pipeline import metrics
from edgepipe.pipeline.metrics import MetricsError


def test_topk_accuracy_known_values():
    out = np.array([
        [0.9, 0.05, 0.03, 0.02, 0.0, 0.0, 0.0],   # top1 = 0
        [0.1, 0.2, 0.3, 0.4, 0.0, 0.0, 0.0],      # top1 = 3, ranks 3,2,1,0,...
        [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0],      # top1 = 6
        [0.5, 0.5, 0.0, 0.0, 0.0, 0.0, 0.0],      # tie -> lower index 0 wins
    ])
    labels = [0, 1, 5, 1]
    assert metrics.topk_accuracy(out, labels, 1) == pytest.approx(0.25)
    # row 1: label 1 is the 3rd best -> in top-3; row 3: label 1 is 2nd -> in top-2
    assert metrics.topk_accuracy(out, labels, 2) == pytest.approx(0.5)
    assert metrics.topk_accuracy(out, labels, 3) == pytest.approx(0.75)
    # row 2: label 5 ties with 0..4 at 0.0 after class 6; stable order puts 5 last of them
    assert metrics.topk_accuracy(out, labels, 6) == pytest.approx(0.75)
    assert metrics.topk_accuracy(out, labels, 7) == pytest.approx(1.0)
    # k larger than the class count is clamped
    assert metrics.topk_accuracy(out, labels, 50) == pytest.approx(1.0)


def test_accuracy_block_skips_trivial_top5():
    out = np.eye(3)
    assert metrics.accuracy_block(out, [0, 1, 2]) == {"top1": 1.0}
    assert metrics.accuracy_block(out, None) == {}
    big = np.eye(10)
    blk = metrics.accuracy_block(big, list(range(10)))
    assert blk == {"top1": 1.0, "top5": 1.0}


def test_agreement_and_errors_on_crafted_outputs():
    ref = np.array([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 3.0], [1.0, 1.0, 0.0]])
    out = ref.copy()
    out[1] = [0.0, 2.0, 1.5]      # still class 1
    out[2] = [4.0, 0.0, 3.0]      # flips to class 0
    a = metrics.compare_outputs(out, ref)
    assert a.n == 4
    assert a.top1_agreement == pytest.approx(0.75)
    diff = np.abs(out - ref)
    assert a.mean_abs == pytest.approx(diff.mean())
    assert a.max_abs == pytest.approx(4.0)
    noise = (1.5 ** 2 + 4.0 ** 2)
    signal = 1 + 4 + 9 + 2
    assert a.snr_db == pytest.approx(10 * math.log10(signal / noise))
    cos_rows = [1.0, 2.0 / math.sqrt(4 + 2.25), 3.0 * 3.0 / (3.0 * 5.0), 1.0]
    assert a.cosine == pytest.approx(np.mean(cos_rows))


def test_identical_outputs_are_perfect_and_json_safe():
    ref = np.random.default_rng(0).normal(size=(5, 4))
    a = metrics.compare_outputs(ref, ref)
    assert a.top1_agreement == 1.0 and a.max_abs == 0.0
    assert a.cosine == pytest.approx(1.0)
    assert math.isinf(a.snr_db)
    d = a.to_dict()
    assert d["snr_db"] is None  # JSON has no infinity
    assert metrics.fmt_snr(a.snr_db) == "inf"


def test_snr_scales_with_noise():
    rng = np.random.default_rng(1)
    ref = rng.normal(size=(100, 10))
    noise = rng.normal(size=ref.shape)
    s1 = metrics.snr_db(ref + 0.1 * noise, ref)
    s2 = metrics.snr_db(ref + 0.01 * noise, ref)
    assert s2 - s1 == pytest.approx(20.0, abs=1e-6)  # 10x less noise amplitude = +20 dB


def test_mismatches_are_one_line_errors():
    with pytest.raises(MetricsError, match="labels: 2 labels for 3 outputs"):
        metrics.topk_accuracy(np.eye(3), [0, 1])
    with pytest.raises(MetricsError, match="out of range"):
        metrics.topk_accuracy(np.eye(3), [0, 1, 7])
    with pytest.raises(MetricsError, match="reference: output shape"):
        metrics.compare_outputs(np.zeros((2, 3)), np.zeros((2, 4)))
    with pytest.raises(MetricsError, match="no outputs"):
        metrics.compare_outputs(np.zeros((0, 3)), np.zeros((0, 3)))
