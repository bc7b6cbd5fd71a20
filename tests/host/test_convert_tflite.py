"""`edgepipe convert MODEL.tflite`: a float .tflite quantized by the LiteRT quantizer into the usual bundles."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

pytest.importorskip("ai_edge_quantizer")

from edgepipe.device.bundle import load_bundle  # noqa: E402
from edgepipe.device.runtime import load_model  # noqa: E402
from edgepipe.pipeline.cli import main  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
MODELS = ROOT / "tests" / "data" / "models"
PHOTOS = ROOT / "sample_data" / "detector"


def convert(*args):
    return CliRunner().invoke(main, ["convert", *map(str, args)], catch_exceptions=False)


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    out = tmp_path_factory.mktemp("tflite-bundles")
    res = convert(MODELS / "conv_stack_f32.tflite", "--recipes", "fp32,fp16,dynamic,int8,int8-io,int16x8",
                  "--calib", PHOTOS, "--preprocess", "mobilenet", "--out", out, "--no-cache", "--json")
    assert res.exit_code == 0, res.output
    return {r["recipe"]: r for r in json.loads(res.stdout[res.stdout.index("{"):])["results"]}


def test_every_recipe_makes_a_bundle_and_says_which_tool(bundles):
    assert set(bundles) == {"fp32", "fp16", "dynamic", "int8", "int8-io", "int16x8"}
    assert all(r["error"] is None for r in bundles.values())
    fp32 = load_bundle(bundles["fp32"]["bundle"])
    assert fp32.manifest.converter["tool"] == "copy"
    assert (Path(bundles["fp32"]["bundle"]) / "model.tflite").read_bytes() == \
        (MODELS / "conv_stack_f32.tflite").read_bytes()
    for name in ("fp16", "dynamic", "int8", "int8-io", "int16x8"):
        m = load_bundle(bundles[name]["bundle"]).manifest
        assert m.converter["tool"] == "ai-edge-quantizer" and m.converter["version"], name
        assert m.preprocess.mean == (127.5,) * 3
    assert load_bundle(bundles["int8"]["bundle"]).manifest.calibration.count == 3
    assert bundles["dynamic"]["size"] < bundles["fp32"]["size"] / 2


def test_io_types_follow_the_recipe(bundles):
    def io(name):
        m = load_model(Path(bundles[name]["bundle"]) / "model.tflite")
        return m.inputs[0], m.outputs[0]

    i, o = io("int8")
    assert (i.dtype, o.dtype) == ("float32", "float32")
    i, o = io("int8-io")  # uint8 by default (--io-type), the Edge TPU's classic choice
    assert (i.dtype, o.dtype) == ("uint8", "uint8") and i.scale > 0
    i, o = io("int16x8")
    assert (i.dtype, o.dtype) == ("float32", "float32")


def test_quantized_variants_agree_with_the_float_model(bundles):
    from edgepipe.device.preprocess import load_image, to_model_input

    def scores(name, image):
        b = load_bundle(bundles[name]["bundle"])
        m = load_model(b.model_path)
        m.set_input(0, to_model_input(load_image(image, b.manifest.preprocess), b.manifest.preprocess, m.inputs[0]))
        m.invoke()
        return m.outputs[0].dequantize(m.get_output(0)).reshape(-1)

    for image in sorted(PHOTOS.glob("*.jpg")):
        ref = scores("fp32", image)
        span = float(ref.max() - ref.min()) or 1.0
        for name in ("fp16", "dynamic", "int8", "int8-io", "int16x8"):
            err = float(np.max(np.abs(scores(name, image) - ref))) / span
            assert err < 0.25, (name, image.name, err)


def test_int8_io_int8_variant(tmp_path):
    res = convert(MODELS / "conv_stack_f32.tflite", "--recipes", "int8-io", "--io-type", "int8", "--calib", PHOTOS,
                  "--out", tmp_path, "--no-cache")
    assert res.exit_code == 0, res.output
    m = load_model(tmp_path / "conv_stack_f32-int8-io" / "model.tflite")
    assert (m.inputs[0].dtype, m.outputs[0].dtype) == ("int8", "int8")


def test_quantized_tflite_is_refused_in_one_line(tmp_path):
    res = convert(MODELS / "int8_io.tflite", "--recipes", "fp16", "--out", tmp_path, "--no-cache")
    assert res.exit_code != 0
    assert "quantizes float .tflite models" in res.output and "Traceback" not in res.output
    assert len(res.output.strip().splitlines()[-1]) < 300


def test_bad_decoder_file_is_one_line(tmp_path):
    dec = tmp_path / "decoder.json"
    dec.write_text(json.dumps({"kind": "ssd", "score_threshold": 0.5}))  # ssd without anchors
    res = convert(MODELS / "conv_stack_f32.tflite", "--recipes", "fp32", "--decoder", dec, "--out", tmp_path / "o")
    assert res.exit_code != 0 and "needs anchors" in res.output and "Traceback" not in res.output


def test_decoder_file_keyed_by_model_name_lands_in_the_manifest(tmp_path):
    model = tmp_path / "det.tflite"
    shutil.copyfile(MODELS / "conv_stack_f32.tflite", model)
    dec = tmp_path / "decoder.json"
    dec.write_text(json.dumps({"det.tflite": {"kind": "postprocessed", "score_threshold": 0.3}}))
    res = convert(model, "--recipes", "fp32", "--decoder", dec, "--out", tmp_path / "o", "--no-cache")
    assert res.exit_code == 0, res.output
    m = load_bundle(tmp_path / "o" / "det-fp32").manifest
    assert m.task.value == "detection" and m.decoder["kind"] == "postprocessed" and m.decoder["score_threshold"] == 0.3
