"""edgepipe convert at the command line: bad input gives one line and a non-zero exit; nothing is lost."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgepipe.pipeline.bundle_writer import write_bundle
from edgepipe.pipeline.cli import main

pytestmark = pytest.mark.host
REPO = Path(__file__).resolve().parents[2]


def run(*args):
    result = CliRunner().invoke(main, ["convert", *map(str, args)])
    return result


def one_line_error(result, *needles):
    assert result.exit_code != 0, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    err = result.output.strip().splitlines()[-1]
    assert err.startswith("Error: "), result.output
    for n in needles:
        assert n in err, err
    assert "Traceback" not in result.output


def test_missing_model(tmp_path):
    one_line_error(run(tmp_path / "nope.keras", "--out", tmp_path / "o"), "no such file")


def test_unreadable_model(tmp_path):
    bad = tmp_path / "broken.keras"
    bad.write_bytes(b"this is not a zip archive")
    one_line_error(run(bad, "--recipes", "fp32", "--out", tmp_path / "o", "--no-cache"), "cannot load model")


def test_unsupported_model_format(tmp_path):
    p = tmp_path / "model.onnx"
    p.write_bytes(b"x")
    one_line_error(run(p, "--out", tmp_path / "o"), "unsupported model format")


def test_unknown_recipe(cnn_keras, tmp_path):
    one_line_error(run(cnn_keras, "--recipes", "fp32,int4", "--out", tmp_path / "o"), "unknown recipe 'int4'")


def test_calibration_needed_but_missing(cnn_keras, tmp_path):
    one_line_error(run(cnn_keras, "--recipes", "int8", "--out", tmp_path / "o"), "--calib")


def test_empty_calibration_folder(cnn_keras, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not an image")
    one_line_error(run(cnn_keras, "--recipes", "int8", "--calib", tmp_path / "empty", "--out", tmp_path / "o"),
                   "no images found")


def test_missing_calibration_folder(cnn_keras, tmp_path):
    one_line_error(run(cnn_keras, "--recipes", "int8", "--calib", tmp_path / "nope", "--out", tmp_path / "o"),
                   "no such directory")


def test_undecodable_calibration_images(cnn_keras, tmp_path):
    d = tmp_path / "bad"
    d.mkdir()
    for i in range(3):
        (d / f"img{i}.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")
    one_line_error(run(cnn_keras, "--recipes", "int8", "--calib", d, "--out", tmp_path / "o", "--no-cache"),
                   "could be decoded")


def test_model_that_is_not_image_shaped_for_calibration(dense_keras, photos, tmp_path):
    one_line_error(run(dense_keras, "--recipes", "int8", "--calib", photos, "--out", tmp_path / "o", "--no-cache"),
                   "not image-shaped")


def test_non_image_model_still_converts_without_calibration(dense_keras, tmp_path):
    r = run(dense_keras, "--recipes", "fp32,dynamic", "--out", tmp_path / "o", "--no-cache", "--json")
    assert r.exit_code == 0, r.output
    manifest = json.loads((tmp_path / "o" / "dense-fp32" / "manifest.json").read_text())
    assert manifest["preprocess"] is None and manifest["inputs"][0]["shape"] == [1, 10]


def test_unwritable_output(cnn_keras, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where a directory should be")
    one_line_error(run(cnn_keras, "--recipes", "fp32", "--out", blocker / "sub"), "cannot create")
    one_line_error(run(cnn_keras, "--recipes", "fp32", "--out", blocker), "not a directory")


def test_existing_foreign_directory_is_never_replaced(cnn_keras, tmp_path):
    out = tmp_path / "o"
    (out / "small_cnn-fp32").mkdir(parents=True)
    (out / "small_cnn-fp32" / "precious.txt").write_text("user data")
    r = run(cnn_keras, "--recipes", "fp32", "--out", out, "--no-cache")
    assert r.exit_code != 0 and "not an edgepipe bundle" in r.output
    assert (out / "small_cnn-fp32" / "precious.txt").read_text() == "user data"


def test_failed_run_keeps_the_previous_bundle(cnn_keras, photos, tmp_path):
    out = tmp_path / "o"
    assert run(cnn_keras, "--recipes", "fp32", "--out", out, "--no-cache").exit_code == 0
    before = (out / "small_cnn-fp32" / "model.tflite").read_bytes()
    r = run(cnn_keras, "--recipes", "fp32", "--out", out, "--calib", tmp_path / "missing", "--recipes", "int8")
    assert r.exit_code != 0
    assert (out / "small_cnn-fp32" / "model.tflite").read_bytes() == before


def test_interrupted_write_leaves_no_half_bundle(tmp_path):
    out = tmp_path / "o"
    out.mkdir()

    def boom(model_path, tpu):
        assert model_path.exists()  # the model was already written into the temp dir
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_bundle(out, "m-fp32", b"TFL3-bytes", manifest_for=boom)
    assert list(out.iterdir()) == []


def test_json_output_and_table(cnn_keras, tmp_path):
    r = run(cnn_keras, "--recipes", "fp32,fp16", "--out", tmp_path / "o", "--cache-dir", tmp_path / "c", "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert [x["recipe"] for x in doc["results"]] == ["fp32", "fp16"]
    assert doc["results"][1]["ratio_to_fp32"] < 0.6
    r2 = run(cnn_keras, "--recipes", "fp32,fp16", "--out", tmp_path / "o", "--cache-dir", tmp_path / "c")
    assert r2.exit_code == 0
    assert "hit" in r2.stdout and "vs fp32" in r2.stdout


def test_list_recipes_needs_no_model():
    r = CliRunner().invoke(main, ["convert", "--list-recipes"])
    assert r.exit_code == 0 and "int16x8" in r.output and "Edge TPU" in r.output


@pytest.mark.slow
def test_tensorflow_noise_stays_out_of_user_output(cnn_keras, photos, tmp_path):
    """A real process: TF writes to fds 1/2 from C++, which CliRunner cannot see."""
    env = dict(os.environ)
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)
    proc = subprocess.run(
        [sys.executable, "-m", "edgepipe.pipeline.cli", "convert", str(cnn_keras), "--recipes", "fp32,int8",
         "--calib", str(photos), "--calib-count", "4", "--out", str(tmp_path / "o"), "--no-cache"],
        capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert all(line.startswith("edgepipe: ") for line in proc.stderr.splitlines()), proc.stderr
    assert "recipe" in proc.stdout.splitlines()[0]
    assert "Saved artifact" not in proc.stdout and "WARNING" not in proc.stderr
