"""Ablation: spec validation, grid, Pareto fronts, a real small study and its resume."""
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgepipe.pipeline import pareto
from edgepipe.pipeline.ablate_spec import SpecError, load_spec, parse_spec

REPO = Path(__file__).resolve().parents[2]
FM_TEST = REPO / "sample_data" / "fashion_mnist" / "test"


# ------------------------------------------------------------------ Pareto


def test_pareto_front_on_crafted_points():
    pts = [
        {"lat": 10.0, "acc": 0.90},  # 0: front (fastest)
        {"lat": 12.0, "acc": 0.89},  # 1: dominated by 0
        {"lat": 20.0, "acc": 0.95},  # 2: front
        {"lat": 20.0, "acc": 0.93},  # 3: dominated by 2 (same cost, lower acc)
        {"lat": 30.0, "acc": 0.95},  # 4: dominated by 2 (slower, same acc)
        {"lat": 40.0, "acc": 0.99},  # 5: front (most accurate)
        {"lat": None, "acc": 1.00},  # 6: not measured -> never on the front
        {"lat": 40.0, "acc": 0.99},  # 7: exact duplicate of 5 -> kept too
    ]
    front = pareto.pareto_front(pts, lambda p: p["lat"], lambda p: p["acc"])
    assert front == [0, 2, 5, 7]
    for i in (1, 3, 4):  # every point off the front is beaten by a front point
        assert any(pts[j]["lat"] <= pts[i]["lat"] and pts[j]["acc"] >= pts[i]["acc"] for j in front)


def test_pareto_single_and_empty():
    assert pareto.pareto_front([], lambda p: p, lambda p: p) == []
    assert pareto.pareto_front([{"c": 1, "b": 0.5}], lambda p: p["c"], lambda p: p["b"]) == [0]


def test_table_marks_fronts_separately_for_latency_and_size():
    results = [
        {"label": "a", "size": 1000, "p50_ms": 5.0, "top1": 0.8, "agreement": 1.0, "snr_db": None},
        {"label": "b", "size": 4000, "p50_ms": 2.0, "top1": 0.8, "agreement": 0.9, "snr_db": 30.0},
        {"label": "c", "size": 4000, "p50_ms": 6.0, "top1": 0.7, "agreement": 0.9, "snr_db": 30.0},
        {"label": "d", "error": "convert: boom"},
    ]
    headers, rows = pareto.table_rows(results, "top1")
    marks = {r[0]: r[-1] for r in rows}
    assert marks["a"] == "size"      # smallest at 0.8
    assert marks["b"] == "latency"   # fastest at 0.8
    assert marks["c"] == ""
    assert marks["d"].startswith("error: convert: boom")
    md = pareto.markdown_table(headers, rows)
    assert md.count("\n") == len(rows) + 1


# ------------------------------------------------------------------ spec


def _spec(tmp_path, text: str) -> Path:
    p = tmp_path / "spec.toml"
    p.write_text(text, encoding="utf-8")
    return p


BASE = f"""
name = "t"
[model]
source = "sample:fashion_mnist"
preprocess = "unit"
[data]
dir = "{FM_TEST}"
"""


def test_valid_spec_grid(tmp_path):
    spec = load_spec(_spec(tmp_path, BASE + """
[axes]
recipe = ["fp32", "int8"]
threads = [1, 2]
"""))
    pts = spec.points()
    assert [p.label() for p in pts] == ["fp32 t1", "fp32 t2", "int8 t1", "int8 t2"]
    assert len({p.key() for p in pts}) == 4
    assert spec.calib_dir == FM_TEST


def test_factory_grid_has_arch_knobs(tmp_path):
    spec = load_spec(_spec(tmp_path, BASE.replace('"sample:fashion_mnist"',
                                                  '"factory:edgepipe.pipeline.factories:fashion_mnist_cnn"') + """
[axes]
width = [1.0, 0.5]
remove = [[], ["head"]]
recipe = ["int8"]
"""))
    pts = spec.points()
    assert len(pts) == 4
    assert {p.model_key() for p in pts} == {"width=1.0", "remove=['head'],width=1.0", "width=0.5",
                                           "remove=['head'],width=0.5"}


@pytest.mark.parametrize("axes, field", [
    ('colour = ["red"]', "axes.colour: unknown axis"),
    ('recipe = ["int4"]', 'axes.recipe: "int4" is not a recipe'),
    ('recipe = []', "axes.recipe: expected a non-empty list"),
    ('threads = [0]', "axes.threads: 0 is out of range"),
    ('threads = ["two"]', 'axes.threads: "two" is not an integer'),
    ('input_size = [2]', "axes.input_size: 2 is out of range"),
    ('delegate = ["tpu"]', 'axes.delegate: "tpu" is not a delegate'),
    ('width = [0.5]', "axes.width: architecture axes need a factory model"),
    ('recipe = ["fp32", "fp32"]', "axes.recipe: duplicate values"),
])
def test_bad_axes_name_the_field(tmp_path, axes, field):
    with pytest.raises(SpecError) as e:
        load_spec(_spec(tmp_path, BASE + "[axes]\n" + axes + "\n"))
    assert field in str(e.value)
    assert "\n" not in str(e.value)


def test_bad_spec_files(tmp_path):
    with pytest.raises(SpecError, match="spec: .* is not valid TOML"):
        load_spec(_spec(tmp_path, "name = [unclosed"))
    with pytest.raises(SpecError, match="spec: .* does not exist"):
        load_spec(tmp_path / "nope.toml")
    with pytest.raises(SpecError, match="model.source: required"):
        parse_spec({"data": {"dir": str(FM_TEST)}}, tmp_path)
    with pytest.raises(SpecError, match="data.dir: .* is not a folder"):
        parse_spec({"model": {"source": "sample:fashion_mnist"}, "data": {"dir": "missing"}}, tmp_path)
    with pytest.raises(SpecError, match="data.limit: expected a positive integer"):
        parse_spec({"model": {"source": "sample:fashion_mnist"},
                    "data": {"dir": str(FM_TEST), "limit": 0}}, tmp_path)
    with pytest.raises(SpecError, match="model.colour: unknown field"):
        parse_spec({"model": {"source": "sample:fashion_mnist", "colour": 1}}, tmp_path)
    with pytest.raises(SpecError, match="bench.runs: bad value"):
        parse_spec({"model": {"source": "sample:fashion_mnist"}, "data": {"dir": str(FM_TEST)},
                    "bench": {"runs": 0}}, tmp_path)


def test_cli_bad_spec_is_one_line_without_traceback(tmp_path):
    from edgepipe.pipeline.cli import main

    p = _spec(tmp_path, BASE + '[axes]\nrecipe = ["int4"]\n')
    r = CliRunner().invoke(main, ["ablate", str(p), "--out", str(tmp_path / "o")])
    assert r.exit_code == 1
    assert "Traceback" not in r.output
    assert 'axes.recipe: "int4" is not a recipe' in r.output
    r = CliRunner().invoke(main, ["ablate", str(p.with_name("missing.toml")), "--out", str(tmp_path)])
    assert r.exit_code == 1 and "does not exist" in r.output


def test_examples_are_valid_specs():
    for name in ("mobilenet_v2.toml", "fashion_mnist_arch.toml", "fashion_mnist_recipes.toml"):
        spec = load_spec(REPO / "examples" / "ablate" / name)
        assert spec.points()


def test_sample_source_not_built_yet_names_the_build_command(tmp_path, monkeypatch):
    from edgepipe.pipeline.cli import main

    monkeypatch.setenv("EDGEPIPE_CACHE", str(tmp_path / "cache"))
    p = _spec(tmp_path, BASE.replace("sample:fashion_mnist", "sample:mobilenet_v2") + '[axes]\nrecipe = ["fp32"]\n')
    r = CliRunner().invoke(main, ["ablate", str(p), "--out", str(tmp_path / "o")])
    assert r.exit_code == 1 and "Traceback" not in r.output
    last = r.output.strip().splitlines()[-1]
    assert last.startswith("Error: model.source: the sample mobilenet_v2 is not built yet"), last
    assert last.endswith("build it with: edgepipe samples build mobilenet_v2")
    assert not (tmp_path / "cache").exists()  # nothing fetched or built behind the user's back


# ------------------------------------------------------------------ a real small study


@pytest.mark.slow
@pytest.mark.host
def test_small_study_runs_and_resumes(tmp_path, monkeypatch):
    # A private conversion cache: the study really converts, and nothing lands in ~/.cache.
    monkeypatch.setenv("EDGEPIPE_CACHE", str(tmp_path / "cache"))
    from edgepipe.pipeline.ablate import CACHE_FILE, load_cache, run_ablation, spec_digest
    from edgepipe.pipeline.cli import main

    p = _spec(tmp_path, BASE + """
[data]
""".replace("[data]\n", "") + """
[axes]
recipe = ["fp32", "dynamic"]
threads = [1, 2]
[bench]
runs = 5
warmup = 1
""")
    text = p.read_text().replace(f'dir = "{FM_TEST}"', f'dir = "{FM_TEST}"\nlimit = 30\ncalib_limit = 10')
    p.write_text(text)
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["ablate", str(p), "--out", str(out), "--json"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.output[r.output.index("{"):])
    res = data["results"]
    assert [x["label"] for x in res] == ["fp32 t1", "fp32 t2", "dynamic t1", "dynamic t2"]
    for x in res:
        assert not x.get("error"), x
        assert x["p50_ms"] > 0 and x["images"] == 30
        assert 0.0 <= x["top1"] <= 1.0
    fp32 = res[0]
    assert fp32["agreement"] == 1.0  # the fp32 bundle vs its own Keras model
    assert res[2]["size"] < fp32["size"]  # dynamic range stores int8 weights
    assert data["quality"] == "top1"
    for f in ("index.html", "pareto.png", "table.md", "results.json"):
        assert (out / f).stat().st_size > 0
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Resume: an interrupted write leaves a cut line; everything is reused.
    lines_before = (out / CACHE_FILE).read_text().splitlines()
    with open(out / CACHE_FILE, "a") as f:
        f.write('{"digest": "cut')
    spec = load_spec(p)
    assert len(load_cache(out, spec_digest(spec))) == 4
    again = run_ablation(spec, out)
    assert all(x.get("cached") for x in again)
    assert [x["p50_ms"] for x in again] == [x["p50_ms"] for x in res]
    assert len((out / CACHE_FILE).read_text().splitlines()) == len(lines_before) + 1

    # A bigger grid measures only the new points.
    p.write_text(p.read_text().replace('threads = [1, 2]', 'threads = [1, 2, 3]'))
    more = run_ablation(load_spec(p), out)
    assert sum(1 for x in more if x.get("cached")) == 4 and len(more) == 6


def test_cli_data_folder_without_images(tmp_path):
    from edgepipe.pipeline.cli import main

    empty = tmp_path / "empty"
    empty.mkdir()
    p = _spec(tmp_path, BASE.replace(f'dir = "{FM_TEST}"', f'dir = "{empty}"') + '[axes]\nrecipe = ["fp32"]\n')
    r = CliRunner().invoke(main, ["ablate", str(p), "--out", str(tmp_path / "o")])
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert r.output.strip().splitlines()[-1] == f"Error: data.dir: no images found in {empty}"


@pytest.mark.slow
@pytest.mark.host
def test_study_timed_on_a_loopback_agent(tmp_path, monkeypatch):
    """`--device URL`: bundles are shipped to a real `edgerun agent` and timed there."""
    from edgepipe.device.agent import Agent, AgentServer
    from edgepipe.device.bundle_store import BundleStore
    from edgepipe.pipeline.cli import main

    monkeypatch.setenv("EDGEPIPE_CACHE", str(tmp_path / "cache"))
    worker = Agent(BundleStore(tmp_path / "store"))
    server = AgentServer(worker, "127.0.0.1", 0, token="t0ken")
    server.start_background()
    try:
        p = _spec(tmp_path, BASE.replace(f'dir = "{FM_TEST}"', f'dir = "{FM_TEST}"\nlimit = 10\n'
                                         'calib_limit = 10') + """
[axes]
recipe = ["int8"]
threads = [1, 2]
[bench]
runs = 5
warmup = 1
""")
        out = tmp_path / "out"
        r = CliRunner().invoke(main, ["ablate", str(p), "--out", str(out), "--json", "--device", server.url,
                                      "--token", "t0ken"])
        assert r.exit_code == 0, r.output
        res = json.loads(r.output[r.output.index("{"):])["results"]
        assert [x["label"] for x in res] == ["int8 t1", "int8 t2"]
        assert all(x["p50_ms"] > 0 and not x.get("error") for x in res)
        assert len(worker.store.list()) == 1  # one bundle, uploaded once for both thread counts
    finally:
        server.shutdown()
        server.server_close()
        worker.close()
