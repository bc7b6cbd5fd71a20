"""edgepipe.device.profiler / litert_c: per-op profiles from LiteRT's C profiler, and the no-profiler path."""
from __future__ import annotations

import numpy as np
import pytest

from edgepipe.device import litert_c
from edgepipe.device.bench import run_bench
from edgepipe.device.litert_c import Event
from edgepipe.device.profiler import (EVENT_DEFAULT, EVENT_DELEGATE_PROFILED_OPERATOR, EVENT_OPERATOR,
                                      format_profile, node_counts, profile_ops, summarize)
from edgepipe.device.report import Report
from edgepipe.device.runtime import load_model

from conftest import MODELS

needs_litert_c = pytest.mark.skipif(litert_c.library_path() is None,
                                    reason="no libLiteRt.so (ai-edge-litert) here: only the no-profiler path applies")
# Models whose ops take tens to hundreds of microseconds (scripts/make_profile_model.py): the profiler's clock
# counts whole microseconds, so on the few-KB test models the per-op times are mostly rounding.
MEDIUM = ["conv_stack_f32.tflite", "conv_stack_int8.tflite"]


def _zeros(loaded):
    return [np.zeros(s.shape, s.dtype) for s in loaded.inputs]


@needs_litert_c
@pytest.mark.timing
@pytest.mark.parametrize("name", MEDIUM)
def test_sum_of_ops_matches_the_runtimes_invoke_time(name):
    loaded = load_model(MODELS / name, threads=1)
    prof = profile_ops(loaded, _zeros(loaded), runs=15, warmup=2)
    assert prof.available, prof.reason
    assert prof.runs == 15
    assert prof.invoke_ms and prof.invoke_ms > 0.2  # a real, measurable model
    assert abs(prof.ops_ms - prof.invoke_ms) <= 0.10 * prof.invoke_ms, (prof.ops_ms, prof.invoke_ms)
    # the wall time around each run includes the invoke, so it cannot be shorter than the ops inside it
    assert prof.run_ms >= 0.95 * prof.ops_ms
    convs = [t for t in prof.op_types() if t["op"].startswith("Convolution")]
    assert convs and convs[0]["count"] == 5 and convs[0]["where"] == "xnnpack"
    assert sum(t["share"] for t in prof.op_types()) == pytest.approx(1.0)
    graph = node_counts(loaded)
    assert sum(graph.values()) == len([o for o in loaded.interpreter._get_ops_details() if o["op_name"] != "DELEGATE"])


@needs_litert_c
def test_cpu_kernels_are_named_and_placed(int8_io_model):
    """Ops XNNPACK does not take (int8 SOFTMAX) run as TFLite builtin kernels: where=cpu, named from the graph."""
    loaded = load_model(int8_io_model)
    prof = profile_ops(loaded, _zeros(loaded), runs=5, warmup=1)
    cpu = [n for n in prof.nodes if n.where == "cpu"]
    assert [n.op for n in cpu] == ["SOFTMAX"]
    assert cpu[0].name  # the node's output tensor name
    assert prof.node_counts == {"cpu": 1, "xnnpack": 4}


@needs_litert_c
def test_bench_profile_block_is_valid_and_prints(make_bundle):
    bundle = make_bundle(MODELS / "conv_stack_int8.tflite", name="convs", recipe="int8")
    r = run_bench(bundle, runs=10, warmup=1, min_secs=0.0, profile_ops=True)
    Report.from_dict(r)  # schema-valid, profile block included
    block = r["profile"]
    assert block["available"] and block["runs"] == 10
    assert 0.9 <= block["ops_vs_invoke"] <= 1.1
    assert block["nodes"] == sorted(block["nodes"], key=lambda n: -n["mean_ms"])
    text = format_profile(block)
    assert "top 10 nodes" in text and "by op type" in text and "Convolution (NHWC, QC8) IGEMM" in text
    assert "profile" not in run_bench(bundle, runs=3, warmup=0, min_secs=0.0)  # off by default


def test_no_profiler_says_so_and_still_counts_nodes(monkeypatch, int8_io_model):
    monkeypatch.setattr(litert_c, "_LIB", None)
    monkeypatch.setattr(litert_c, "library_path", lambda: None)
    loaded = load_model(int8_io_model)
    prof = profile_ops(loaded, _zeros(loaded), runs=3)
    assert not prof.available and not prof.nodes
    assert "no per-op profiler" in prof.reason and "\n" not in prof.reason
    # every original node is counted once, on the CPU kernels or inside XNNPACK (which ops XNNPACK takes
    # depends on the runtime build; ai-edge-litert 2.3 leaves the int8 SOFTMAX on the CPU)
    assert set(prof.node_counts) <= {"cpu", "xnnpack"} and sum(prof.node_counts.values()) == 5
    text = format_profile(prof.to_dict())
    assert text.splitlines()[0].startswith("per-op     no per-op profiler") and "\nnodes      " in text


@needs_litert_c
def test_a_refusing_runtime_is_a_reason_not_a_crash(custom_op_model, float_model):
    """A model the C API refuses (a custom op it has no kernel for) gives an unavailable profile, one line."""
    loaded = load_model(float_model)
    loaded.path = str(custom_op_model)  # same inputs, but the compiled model cannot run this graph
    prof = profile_ops(loaded, _zeros(loaded), runs=3)
    assert not prof.available and "\n" not in prof.reason


def _ev(tag, kind, us, node=0):
    return Event(tag, kind, 0, us, node, 0)


def test_summarize_does_not_count_a_delegate_node_twice():
    """When the delegate reports its inner ops, its own kernel node (which wraps them) is not added again."""
    events = []
    for _ in range(4):  # four inferences
        events += [_ev("Invoke", EVENT_DEFAULT, 110), _ev("TfLiteXNNPackDelegate", EVENT_OPERATOR, 100, 3),
                   _ev("Convolution (NHWC, F32) IGEMM", EVENT_DELEGATE_PROFILED_OPERATOR, 60, 0),
                   _ev("Convolution (NHWC, F32) IGEMM", EVENT_DELEGATE_PROFILED_OPERATOR, 40, 1),
                   _ev("SOFTMAX", EVENT_OPERATOR, 10, 4)]
    prof = summarize(events, [200_000] * 4, names={4: "probs"})
    assert prof.runs == 4
    assert prof.invoke_ms == pytest.approx(0.110)
    assert prof.ops_ms == pytest.approx(0.110)  # 60 + 40 + 10 us, not + 100 for the wrapper
    assert {(n.op, n.where, n.index) for n in prof.nodes} == {
        ("Convolution (NHWC, F32) IGEMM", "xnnpack", 0), ("Convolution (NHWC, F32) IGEMM", "xnnpack", 1),
        ("SOFTMAX", "cpu", 4)}
    assert [n.name for n in prof.nodes if n.where == "cpu"] == ["probs"]
    assert prof.by_where()[0] == {"where": "xnnpack", "count": 2, "mean_ms": pytest.approx(0.1),
                                  "share": pytest.approx(0.1 / 0.11)}
    # without inner events the delegate's node is the only record of its time, so it counts
    alone = summarize([_ev("Invoke", EVENT_DEFAULT, 110), _ev("TfLiteXNNPackDelegate", EVENT_OPERATOR, 100, 3)], [1])
    assert alone.ops_ms == pytest.approx(0.1)


def test_summarize_with_no_inference_is_unavailable():
    prof = summarize([], [])
    assert not prof.available and prof.reason
