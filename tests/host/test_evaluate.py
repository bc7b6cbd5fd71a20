"""`edgepipe evaluate` on a tiny model whose outputs are known in closed form."""
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

pytestmark = pytest.mark.host

CLASSES = ["q0", "q1", "q2", "q3"]


def quadrant_image(c: int, level: int = 255) -> np.ndarray:
    """8x8 grey image, quadrant ``c`` (row-major 2x2) bright, the rest black."""
    a = np.zeros((8, 8), np.uint8)
    r, k = divmod(c, 2)
    a[r * 4:(r + 1) * 4, k * 4:(k + 1) * 4] = level
    return a


def expected_probs(c: int, level: int = 255) -> np.ndarray:
    # Dense weights average each quadrant: logit_c = level/255, others 0.
    logits = np.zeros(4)
    logits[c] = level / 255.0
    e = np.exp(logits)
    return e / e.sum()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from edgepipe.pipeline.tfenv import captured_output, import_tf
    from edgepipe.pipeline.convert import ConvertRequest, convert_model
    from edgepipe.pipeline.preprocessing import PreprocessRequest
    from edgepipe.pipeline.recipes import RECIPES

    tf = import_tf()
    keras = tf.keras
    root = tmp_path_factory.mktemp("eval")
    w = np.zeros((64, 4), np.float32)
    for c in range(4):
        mask = quadrant_image(c).reshape(-1) > 0
        w[mask, c] = 1.0 / 16.0
    inp = keras.Input((8, 8, 1))
    x = keras.layers.Flatten()(inp)
    x = keras.layers.Dense(4, use_bias=False, name="quadrants")(x)
    out = keras.layers.Softmax()(x)
    model = keras.Model(inp, out)
    model.get_layer("quadrants").set_weights([w])
    with captured_output():
        model.save(root / "tiny.keras")
    labels = root / "labels.txt"
    labels.write_text("\n".join(CLASSES) + "\n")

    data = root / "data"
    levels = (255, 200, 150)
    for c in range(4):
        (data / CLASSES[c]).mkdir(parents=True)
        for j, lvl in enumerate(levels):
            Image.fromarray(quadrant_image(c, lvl)).save(data / CLASSES[c] / f"img{c}{j}.png")
    # One deliberately mislabelled image: a class-0 picture filed under q1.
    Image.fromarray(quadrant_image(0)).save(data / "q1" / "wrong.png")
    calib = root / "calib"
    calib.mkdir()
    for c in range(4):
        Image.fromarray(quadrant_image(c)).save(calib / f"c{c}.png")

    req = ConvertRequest(model=root / "tiny.keras", recipes=(RECIPES["fp32"], RECIPES["int8"]),
                         out_dir=root / "bundles", calib_dir=calib,
                         preprocess=PreprocessRequest(preset="unit"), labels=labels)
    results = convert_model(req)
    assert all(r.error is None for r in results), results
    return {"root": root, "data": data, "bundles": {r.recipe: r.bundle for r in results},
            "levels": levels}


def test_known_outputs_accuracy_and_agreement(world):
    from edgepipe.pipeline.evaluate import evaluate_bundles, load_inputs, open_bundle, run_bundle, load_dataset

    fp32, int8 = world["bundles"]["fp32"], world["bundles"]["int8"]
    res = evaluate_bundles([fp32, int8], world["data"])
    assert [r.recipe for r in res] == ["fp32", "int8"]
    for r in res:
        assert r.images == 13
        assert r.accuracy == {"top1": pytest.approx(12 / 13)}  # 4 classes: no top-5
        assert r.reference.endswith("tiny.keras")
    a32 = res[0].agreement
    assert a32["top1_agreement"] == 1.0 and a32["max_abs"] < 1e-5 and a32["cosine"] > 0.999999
    a8 = res[1].agreement
    assert a8["top1_agreement"] == 1.0
    assert 0 < a8["mean_abs"] < 0.02 and a8["snr_db"] > 20

    # The outputs themselves match the closed form, through the bundle's own preprocessing.
    b = open_bundle(fp32)
    ds = load_dataset(world["data"], class_names=b.labels)
    out = run_bundle(b, load_inputs(ds.paths, b.manifest.preprocess))
    for path, row in zip(ds.paths, out):
        c = int(path.name[3]) if path.name.startswith("img") else 0
        lvl = world["levels"][int(path.name[4])] if path.name.startswith("img") else 255
        np.testing.assert_allclose(row, expected_probs(c, lvl), atol=1e-5)


def test_cli_table_json_and_db(world, tmp_path):
    import jsonschema

    from edgepipe.pipeline.cli import main

    fp32, int8 = world["bundles"]["fp32"], world["bundles"]["int8"]
    r = CliRunner().invoke(main, ["evaluate", str(fp32), str(int8), "--data", str(world["data"]),
                                  "--quiet"])
    assert r.exit_code == 0, r.output
    assert "top1" in r.output and "0.9231" in r.output
    db = tmp_path / "results.db"
    r = CliRunner().invoke(main, ["evaluate", str(int8), "--data", str(world["data"]), "--json",
                                  "--limit", "5", "--db", str(db)])
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert d["stored"] == 1 and d["results"][0]["images"] == 5
    from edgepipe.pipeline.store import Store

    schema = json.loads((Path(__file__).resolve().parents[2] / "device" / "schemas" /
                         "report.schema.json").read_text())
    with Store(db) as store:
        reports = store.query()
    assert len(reports) == 1 and reports[0]["kind"] == "eval"
    jsonschema.validate(reports[0], schema)
    assert reports[0]["accuracy"]["agreement"]["top1_agreement"] == 1.0


def _run(args):
    from edgepipe.pipeline.cli import main

    r = CliRunner().invoke(main, ["evaluate", *map(str, args), "--quiet"])
    assert r.exit_code == 1, r.output
    assert "Traceback" not in r.output
    assert len(r.output.strip().splitlines()) == 1, r.output
    return r.output


def test_bad_inputs(world, tmp_path):
    from edgepipe.pipeline.tfenv import captured_output, import_tf

    fp32 = world["bundles"]["fp32"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no images found" in _run([fp32, "--data", empty])

    odd = tmp_path / "odd" / "q9"
    odd.mkdir(parents=True)
    Image.fromarray(quadrant_image(0)).save(odd / "a.png")
    assert "class folder 'q9' is not one of the model's 4 labels" in _run([fp32, "--data", odd.parent])

    flat = tmp_path / "flat"
    flat.mkdir()
    Image.fromarray(quadrant_image(0)).save(flat / "a.png")
    lab = tmp_path / "per_image.txt"
    lab.write_text("a.png 7\n")
    assert "class index 7 but bundle" in _run([fp32, "--data", flat, "--labels", lab])

    tf = import_tf()
    keras = tf.keras
    inp = keras.Input((4, 4, 1))
    other = keras.Model(inp, keras.layers.Dense(4)(keras.layers.Flatten()(inp)))
    with captured_output():
        other.save(tmp_path / "other.keras")
    msg = _run([fp32, "--data", world["data"], "--reference", tmp_path / "other.keras"])
    assert "--reference: other.keras takes input (4, 4, 1)" in msg and "(8, 8, 1)" in msg

    assert "no such file" in _run([tmp_path / "nope", "--data", world["data"]])
    assert "manifest records its preprocessing" in _run([Path(fp32) / "model.tflite", "--data", flat])


def test_layers_lists_int8_error_per_layer(world):
    from edgepipe.pipeline.cli import main

    r = CliRunner().invoke(main, ["evaluate", str(world["bundles"]["int8"]), str(world["bundles"]["fp32"]),
                                  "--data", str(world["data"]), "--layers", "5", "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    rows = d["layers"]["tiny-int8"]
    assert "tiny-fp32" not in d["layers"]  # only int8 bundles have int8 layers
    assert {x["layer"] for x in rows} >= {"quadrants"}
    assert rows == sorted(rows, key=lambda x: -x["rmse_steps"])
    assert all(x["scale"] > 0 and x["rmse_steps"] >= 0 for x in rows)


def test_reference_that_is_a_sample_not_built_yet_names_the_build_command(world, tmp_path, monkeypatch):
    """A bundle made from the sample MobileNetV2, evaluated before the sample is built in this cache."""
    import shutil

    monkeypatch.setenv("EDGEPIPE_CACHE", str(tmp_path / "cache"))
    int8 = tmp_path / "bundles" / "mnv2-int8"  # alone: no fp32 bundle to fall back on
    shutil.copytree(world["bundles"]["int8"], int8)
    manifest = json.loads((int8 / "manifest.json").read_text())
    manifest["source_model"]["name"] = "mobilenet_v2.keras"
    (int8 / "manifest.json").write_text(json.dumps(manifest))
    msg = _run([int8, "--data", world["data"]])
    assert msg.startswith("Error: --reference: the sample mobilenet_v2 is not built yet")
    assert "build it with: edgepipe samples build mobilenet_v2" in msg
