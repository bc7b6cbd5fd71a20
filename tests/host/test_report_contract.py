"""edgepipe.pipeline.reporting reads reports through the typed Report of edgepipe.device.report."""
from __future__ import annotations

import json

import pytest

from edgepipe.device.report import Report, new_report
from edgepipe.pipeline.reporting import load_baseline, row

STATS = {"n": 2, "mean": 1.5, "std": 0.5, "min": 1.0, "p50": 1.5, "p90": 1.9, "p99": 2.0, "max": 2.0}


def bench(**blocks):
    return new_report("bench", device={"hostname": "pi-1", "governor": "performance"},
                      runtime={"backend": "ai_edge_litert", "delegate": "cpu", "threads": 2},
                      model={"name": "m-int8", "recipe": "int8", "sha256": "a" * 64, "size": 10},
                      latency_ms=dict(STATS), load_ms={"file_read": 1.0, "allocate": 2.0}, **blocks)


def test_row_reads_dicts_and_typed_reports_alike():
    doc = bench(throughput={"fps": 600.0}, accuracy={"top1": 0.5, "agreement": {"top1_agreement": 0.9}})
    flat = row(doc)
    assert flat == row(Report.from_dict(doc))
    assert (flat["device"], flat["family"], flat["recipe"], flat["threads"], flat["p50"]) == ("pi-1", "m", "int8", 2,
                                                                                             1.5)
    assert flat["load_ms"] == 3.0 and flat["fps"] == 600.0 and flat["agreement"] == 0.9 and flat["top1"] == 0.5


def test_a_baseline_file_with_a_broken_report_is_refused_in_one_line(tmp_path):
    good, bad = bench(), bench()
    bad["latency_ms"] = {"n": "many"}
    p = tmp_path / "base.json"
    p.write_text(json.dumps([good]))
    assert load_baseline(p)[0]["p50"] == 1.5
    p.write_text(json.dumps([good, bad]))
    with pytest.raises(ValueError, match=r"invalid report: latency_ms") as ei:
        load_baseline(p)
    assert "\n" not in str(ei.value)
