"""edgepipe.device.contracts (the one schema validator) and the typed Report of edgepipe.device.report."""
from __future__ import annotations

import copy
import json
import random

import pytest

from edgepipe.device import contracts
from edgepipe.device.bench import run_bench
from edgepipe.device.bundle import MANIFEST
from edgepipe.device.contracts import ContractError, report_problem, validate_manifest, validate_report
from edgepipe.device.errors import EdgepipeError
from edgepipe.device.report import (Device, Failure, Kind, LatencyStats, Report, check_reports, dumps,
                                    new_report)
from edgepipe.device.send import Spool

STATS = {"n": 0, "mean": None, "std": None, "min": None, "p50": None, "p90": None, "p99": None, "max": None}


@pytest.fixture
def real_report(make_bundle, uint8_io_model):
    """A bench report from a real run, as it travels (through JSON)."""
    b = make_bundle(uint8_io_model, name="tiny", recipe="int8-io", labels=["a", "b", "c", "d"])
    return json.loads(dumps(run_bench(b, threads=1, runs=3, warmup=1, min_secs=0.0)))


def skeleton(**blocks):
    r = new_report("bench", device={"hostname": "h"}, latency_ms=dict(STATS))
    r.update(blocks)
    return r


def test_real_reports_and_skeletons_are_valid(real_report):
    assert validate_report(real_report) is real_report and report_problem(real_report) is None
    for kind in ("bench", "run", "eval"):
        r = new_report(kind, device={"hostname": "h"})
        assert validate_report(r) is r


BAD = [
    ({"schema": "edgepipe.report/2"}, "schema"),
    ({"id": "not-a-uuid"}, "id"),
    ({"kind": "benchmark"}, "kind"),
    ({"latency_ms": {"n": 3}}, "latency_ms"),
    ({"latency_ms": {**STATS, "n": -1}}, "latency_ms.n"),
    ({"model": {"name": "m", "sha256": "", "size": "big"}}, "model.size"),
    ({"warnings": ["ok", 3]}, r"warnings\[1\]"),
    ({"stages_ms": {"invoke": {**STATS, "n": True}}}, "stages_ms.invoke.n"),
    ({"runtime": {"backend": "b", "delegate": "cpu", "threads": 1.5}}, "runtime.threads"),
    ({"device": {"hostname": "h", "tags": ["lab", 3]}}, r"device.tags\[1\]"),
    ({"failure": {"stage": "allocate", "signal": "SIGSEGV"}}, "failure"),
]


@pytest.mark.parametrize("change, where", BAD)
def test_broken_reports_name_the_path(change, where):
    bad = skeleton(**change)
    with pytest.raises(ContractError, match=r"^invalid report: " + where) as ei:
        validate_report(bad)
    e = ei.value
    assert isinstance(e, EdgepipeError) and isinstance(e, ValueError) and "\n" not in str(e)
    assert report_problem(bad) == e.detail and e.detail.startswith(e.where)


def test_messages_stay_one_bounded_line_with_hostile_keys():
    key = "line\nbreak " * 500
    bad = skeleton(stages_ms={key: {"n": "x"}})
    msg = report_problem(bad)
    assert msg and "\n" not in msg and len(msg) <= contracts.MAX_MESSAGE and msg.endswith("properties")
    assert report_problem([]) == "(root): must be object"


def test_new_optional_fields_are_accepted():
    r = skeleton(failure={"stage": "allocate", "signal": "SIGSEGV", "reason": "crashed with SIGSEGV"},
                 device={"hostname": "h", "id": "ep-1", "name": "pi-lab", "tags": ["lab", "pi5"]})
    assert report_problem(r) is None


@pytest.mark.slow  # 10-45 s under arm64 emulation (process start-ups); nothing here depends on the CPU or runtime
def test_validator_agrees_with_jsonschema_on_seeded_mutations(real_report):
    """The product validator (fastjsonschema) against the reference implementation, both ways."""
    import jsonschema

    slow = jsonschema.Draft202012Validator(contracts.schema("report"))
    base = copy.deepcopy(real_report)
    base.update(stages_ms={"invoke": base["latency_ms"]}, warnings=["w"],
                failure={"stage": "invoke", "signal": None, "reason": "r"})
    assert slow.is_valid(base) and report_problem(base) is None

    def paths(d, pre=()):
        if isinstance(d, dict):
            for k, v in d.items():
                yield pre + (k,)
                yield from paths(v, pre + (k,))
    all_paths = list(paths(base))
    values = [None, 0, -1, 1.5, 2.0, True, "", "x", "bench", "fp32", [], ["x"], [1], {}, {"n": 1}]
    rng = random.Random(0)
    refused = 0
    for _ in range(1500):
        r = copy.deepcopy(base)
        path = rng.choice(all_paths)
        node = r
        for k in path[:-1]:
            node = node[k]
        if rng.random() < 0.2:
            del node[path[-1]]
        else:
            node[path[-1]] = rng.choice(values)
        ok = slow.is_valid(r)
        refused += not ok
        assert (report_problem(r) is None) == ok, (path, node.get(path[-1]))
    assert refused > 300  # the mutations did exercise refusals


def test_manifest_contract(make_bundle, uint8_io_model):
    d = make_bundle(uint8_io_model, labels=["a"])
    m = json.loads((d / MANIFEST).read_text())
    assert validate_manifest(m) is m
    with pytest.raises(ContractError, match=r"invalid manifest: inputs\[0\]: must contain \['dtype'\]"):
        validate_manifest({**m, "inputs": [{"name": "x", "shape": [1]}]})


def test_schemas_come_from_the_package_and_unknown_contracts_are_refused():
    assert contracts.schema("report")["$id"] == "edgepipe.report/1"
    assert contracts.schema("manifest")["$id"] == "edgepipe.bundle/1"
    with pytest.raises(ValueError, match="unknown contract"):
        contracts.validate("nope", {})


# --------------------------------------------------------------------------- typed Report


def test_report_from_real_run_is_typed_and_round_trips(real_report):
    r = Report.from_dict(real_report)
    assert r.kind is Kind.BENCH and r.device.hostname and r.runtime.threads == 1
    assert isinstance(r.latency_ms, LatencyStats) and r.latency_ms.n >= 3 and r.latency_ms.p50 > 0
    assert r.load_ms.total > 0 and r.throughput.fps > 0 and r.model.recipe == "int8-io"
    doc = r.to_dict()
    assert validate_report(doc) is doc and next(iter(doc)) == "schema"
    assert Report.from_dict(doc) == r and Report.from_dict(doc).to_dict() == doc
    # Canonical form: only optional nulls are left out, every value survives.
    nulls = {k for k, v in real_report["runtime"].items() if v is None and k != "threads"}
    assert {**doc["runtime"], **{k: None for k in nulls}} == real_report["runtime"]
    with pytest.raises(AttributeError):
        r.kind = Kind.RUN  # frozen


def test_unknown_optional_blocks_are_kept_in_extra():
    doc = skeleton(power={"watts": [{"rail": "core", "w": 1.0}]},
                   device={"hostname": "h", "soc": "bcm2712", "tags": ["a"]},
                   stages_ms={"invoke": dict(STATS, n=1, mean=1.0), "decode": None},
                   failure={"reason": "crashed", "signal": "SIGSEGV", "stage": "allocate", "pid": 7})
    r = Report.from_dict(doc)
    assert r.extra == {"power": doc["power"]} and r.device.extra == {"soc": "bcm2712"}
    assert r.device == Device(hostname="h", tags=("a",), extra={"soc": "bcm2712"})
    assert r.failure == Failure(reason="crashed", signal="SIGSEGV", stage="allocate", extra={"pid": 7})
    assert r.stages_ms["invoke"].mean == 1.0 and r.stages_ms["decode"] is None
    back = r.to_dict()
    assert back["power"] == doc["power"] and back["device"]["soc"] == "bcm2712"
    assert back["failure"]["pid"] == 7 and back["stages_ms"]["decode"] is None


def test_report_from_dict_validates():
    with pytest.raises(ContractError, match="invalid report: kind"):
        Report.from_dict({**skeleton(), "kind": "party"})
    with pytest.raises(ContractError, match="kind"):
        new_report("party", device={"hostname": "h"})


# --------------------------------------------------------------------------- the device validates before writing


def test_spool_refuses_an_invalid_report(tmp_path):
    spool = Spool(tmp_path)
    with pytest.raises(ContractError, match="latency_ms"):
        spool.put(skeleton(latency_ms={"n": 1}))
    assert spool.pending() == []
    spool.put(skeleton())
    assert len(spool.pending()) == 1


def test_check_reports_covers_lists():
    good = skeleton()
    assert check_reports([good, good]) and check_reports(good) is good
    with pytest.raises(ContractError, match=r"^invalid report: id"):
        check_reports([good, {**good, "id": "x"}])
