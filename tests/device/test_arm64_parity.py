"""Cross-architecture parity: preprocessing and inference on arm64 match x86.

The same committed models (tests/data/models) and the same inputs (real photos
from sample_data/images plus a seeded synthetic PNG and seeded random tensors)
go through ``edgepipe.device.preprocess.load_image``, ``load_model(...).predict`` and the
runner (``edgepipe.device.runner.run_source`` over a folder, pipelined and sequential).

* On x86, ``scripts/test-arm64.sh`` runs this file with
  ``EDGEPIPE_ARM64_REFERENCE=<path>`` set, which writes the observations there
  (``.cache/arm64/x86_reference.json``). Without the variable nothing is written;
  the x86 run still checks that the observations are deterministic.
* Under emulated arm64 (``platform.machine() == "aarch64"``, e.g. by
  ``scripts/test-arm64.sh`` on both runtime stacks) the same observations are
  compared with that reference within the tolerances below. On a real Pi with a
  copied reference file the test works the same way.

Tolerances (why they are what they are):
* preprocessing: 1e-4 in float-input units. libjpeg-turbo and Pillow's resize
  are integer/fixed-order code on both ISAs, so the inputs should be identical;
  the slack only absorbs float32 printing/rounding.
* float models: 1e-5 absolute + 1e-4 relative; XNNPACK's NEON and SSE/AVX
  kernels sum in different orders, nothing more.
* quantized outputs: one quantization step of the output tensor (rounding of a
  requantized value may land on either side on different kernels/versions).
* float-io models with int8 kernels: 1/64 absolute, i.e. a couple of steps of
  an int8 softmax's 1/256 output scale after the dequantize op inside the model.
* runner scores (top-k, rounded to 6 digits by the runner): 1e-5 for float
  models, 1/128 (two steps of the 1/256 softmax scale) for quantized ones.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
from pathlib import Path

import numpy as np
import pytest

from edgepipe.device.bundle import ColorOrder, Preprocess, ResizeMode
from edgepipe.device.preprocess import list_images, load_image
from edgepipe.device.runner import run_source
from edgepipe.device.runtime import load_model

ROOT = Path(__file__).resolve().parents[2]
MODELS_DIR = ROOT / "tests" / "data" / "models"
IMAGES_DIR = ROOT / "sample_data" / "images"
DEFAULT_REFERENCE = ROOT / ".cache" / "arm64" / "x86_reference.json"
SCHEMA = "edgepipe.arm64-parity/1"
IS_ARM64 = platform.machine().lower() in ("aarch64", "arm64")

# Models that load on a plain CPU runtime (the others are error-path fixtures).
MODELS = ("float.tflite", "int8_float_io.tflite", "int8_io.tflite", "uint8_io.tflite", "two_outputs.tflite")
N_PHOTOS = 3
N_RANDOM = 2
RUN_MODELS = ("float.tflite", "int8_io.tflite", "uint8_io.tflite")

# The model input spec of the tiny models and a few typical presets at a size
# where resampling filters, crops and colour orders all matter.
SPECS = {
    "model-mobilenet-8": Preprocess(height=8, width=8, mean=(127.5,) * 3, std=(127.5,) * 3),
    "imagenet-crop-bicubic-32": Preprocess(
        height=32, width=32, resize=ResizeMode.CENTER_CROP, crop_fraction=0.875, interpolation="bicubic",
        mean=(123.675, 116.28, 103.53), std=(58.395, 57.12, 57.375)),
    "caffe-bgr-area-24": Preprocess(height=24, width=24, color=ColorOrder.BGR, interpolation="area",
                                    mean=(103.939, 116.779, 123.68), std=(1.0, 1.0, 1.0)),
    "gray-unit-nearest-16x20": Preprocess(height=16, width=20, color=ColorOrder.GRAY, interpolation="nearest",
                                          mean=(0.0,), std=(255.0,)),
}
PREPROCESS_ATOL = 1e-4
FLOAT_ATOL, FLOAT_RTOL = 1e-5, 1e-4
INT8_KERNEL_FLOAT_IO_ATOL = 1.0 / 64
RUN_FLOAT_ATOL, RUN_QUANT_ATOL = 1e-5, 1.0 / 128


def reference_path() -> Path:
    return Path(os.environ.get("EDGEPIPE_ARM64_REFERENCE") or DEFAULT_REFERENCE)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def synthetic_png(path: Path) -> Path:
    """A seeded 45x61 RGB PNG with gradients and noise (exercises the non-JPEG path)."""
    from PIL import Image

    rng = np.random.default_rng(20261127)
    y, x = np.mgrid[0:45, 0:61]
    base = np.stack([x * 4, y * 5, (x + y) * 2], axis=-1).astype(np.int64)
    img = np.clip(base + rng.integers(-20, 21, size=base.shape), 0, 255).astype(np.uint8)
    Image.fromarray(img, "RGB").save(path)
    return path


def input_images(tmp_dir: Path) -> dict:
    """name -> path: the first photos of sample_data/images plus the synthetic PNG."""
    photos, _ = list_images(IMAGES_DIR) if IMAGES_DIR.is_dir() else ([], 0)
    images = {p.name: p for p in photos[:N_PHOTOS]}
    images["synthetic.png"] = synthetic_png(tmp_dir / "synthetic.png")
    return images


def observe(tmp_dir: Path) -> dict:
    """Everything compared across architectures, as JSON-ready data."""
    images = input_images(tmp_dir)
    pre = {}
    for spec_name, spec in SPECS.items():
        for img_name, path in images.items():
            a = load_image(path, spec)
            pre[f"{spec_name}/{img_name}"] = {"shape": list(a.shape), "values": a.ravel().tolist()}

    model_spec = SPECS["model-mobilenet-8"]
    preds = {}
    backend = None
    for model_name in MODELS:
        path = MODELS_DIR / model_name
        m = load_model(path)
        backend = {"name": m.backend, "version": m.backend_version}
        inputs = {f"image/{n}": load_image(p, model_spec)[None] for n, p in images.items()}
        rng = np.random.default_rng(7)
        for i in range(N_RANDOM):
            inputs[f"random/{i}"] = rng.uniform(-1.0, 1.0, size=m.inputs[0].shape).astype(np.float32)
        cases = {}
        for input_name, x in inputs.items():
            m.predict([x])
            raw = [m.get_output(k) for k in range(len(m.outputs))]
            cases[input_name] = [{"dtype": str(r.dtype), "shape": list(r.shape), "raw": r.ravel().tolist(),
                                  "scale": spec.scale if spec.quantized else None}
                                 for r, spec in zip(raw, m.outputs)]
        preds[model_name] = {"sha256": sha256(path),
                             "input_dtype": m.inputs[0].dtype,
                             "cases": cases}
    # The runner end to end: a folder of the same images, both execution modes.
    frames = tmp_dir / "frames"
    frames.mkdir(exist_ok=True)
    for name, path in images.items():
        (frames / name).write_bytes(Path(path).read_bytes())
    runs = {}
    for model_name in RUN_MODELS:
        for mode in ("pipelined", "sequential"):
            records = []
            run_source(MODELS_DIR / model_name, str(frames), pipeline=mode == "pipelined",
                       on_prediction=records.append)
            runs[f"{model_name}/{mode}"] = [
                {"source": r["source"], "scores": {str(t["index"]): t["score"] for t in r["top_k"]}}
                for r in records]
    return {
        "schema": SCHEMA,
        "machine": platform.machine(),
        "backend": backend,
        "numpy": np.__version__,
        "preprocess": pre,
        "predict": preds,
        "runs": runs,
    }


def compare_preprocess(ref: dict, got: dict) -> list:
    """Human-readable mismatches between two ``observe()['preprocess']`` dicts."""
    problems = []
    for key, r in ref.items():
        g = got.get(key)
        if g is None:
            problems.append(f"{key}: missing on this machine")
            continue
        if r["shape"] != g["shape"]:
            problems.append(f"{key}: shape {g['shape']} != x86 {r['shape']}")
            continue
        d = np.max(np.abs(np.asarray(r["values"]) - np.asarray(g["values"])), initial=0.0)
        if not d <= PREPROCESS_ATOL:
            problems.append(f"{key}: max |diff| {d:.3g} > {PREPROCESS_ATOL}")
    return problems


def compare_model(model_name: str, ref: dict, got: dict) -> list:
    """Mismatches between two ``observe()['predict'][model]`` entries."""
    if ref["sha256"] != got["sha256"]:
        return [f"{model_name}: the x86 reference is for another version of the model; rerun scripts/test-arm64.sh"]
    problems = []
    for input_name, r_outs in ref["cases"].items():
        g_outs = got["cases"].get(input_name)
        if g_outs is None or len(g_outs) != len(r_outs):
            problems.append(f"{model_name} {input_name}: outputs missing or a different count")
            continue
        for k, (r, g) in enumerate(zip(r_outs, g_outs)):
            where = f"{model_name} {input_name} output {k}"
            if (r["dtype"], r["shape"]) != (g["dtype"], g["shape"]):
                problems.append(f"{where}: {g['dtype']}{g['shape']} != x86 {r['dtype']}{r['shape']}")
                continue
            rv, gv = np.asarray(r["raw"], dtype=np.float64), np.asarray(g["raw"], dtype=np.float64)
            if r["scale"] is not None:  # quantized output: compare in quantization steps
                steps = np.max(np.abs(rv - gv), initial=0.0)
                if steps > 1:
                    problems.append(f"{where}: {steps:.0f} quantization steps apart (max 1)")
            else:
                atol = INT8_KERNEL_FLOAT_IO_ATOL if model_name.startswith("int8") else FLOAT_ATOL
                rtol = 0.0 if model_name.startswith("int8") else FLOAT_RTOL
                bad = np.abs(rv - gv) > atol + rtol * np.abs(rv)
                if bad.any():
                    problems.append(f"{where}: max |diff| {np.max(np.abs(rv - gv)):.3g} > {atol} + {rtol}*|x86|")
    return problems


def compare_runs(ref: dict, got: dict) -> list:
    """Mismatches between two ``observe()['runs']`` dicts (per-frame top-k scores)."""
    problems = []
    for key, r_frames in ref.items():
        g_frames = got.get(key)
        if g_frames is None:
            problems.append(f"run {key}: missing on this machine")
            continue
        if [f["source"] for f in r_frames] != [f["source"] for f in g_frames]:
            problems.append(f"run {key}: frames {[f['source'] for f in g_frames]} != x86 "
                            f"{[f['source'] for f in r_frames]}")
            continue
        atol = RUN_FLOAT_ATOL if key.startswith("float") else RUN_QUANT_ATOL
        for r, g in zip(r_frames, g_frames):
            if set(r["scores"]) != set(g["scores"]):
                problems.append(f"run {key} {r['source']}: classes {sorted(g['scores'])} != x86 {sorted(r['scores'])}")
                continue
            d = max(abs(r["scores"][k] - g["scores"][k]) for k in r["scores"])
            if d > atol:
                problems.append(f"run {key} {r['source']}: score differs by {d:.3g} > {atol:.3g}")
    return problems


@pytest.fixture(scope="module")
def observed(tmp_path_factory) -> dict:
    return observe(tmp_path_factory.mktemp("arm64-parity"))


@pytest.fixture(scope="module")
def reference() -> dict:
    path = reference_path()
    if not path.is_file():
        msg = (f"no x86 reference at {path}: scripts/test-arm64.sh writes it before the emulated run "
               "(or copy one from an x86 machine and set EDGEPIPE_ARM64_REFERENCE)")
        if os.environ.get("CI") == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    data = json.loads(path.read_text())
    assert data.get("schema") == SCHEMA, f"{path}: not an {SCHEMA} file"
    assert data.get("machine", "").lower() not in ("aarch64", "arm64"), f"{path} was written on arm64, not x86"
    return data


arm64_only = pytest.mark.skipif(not IS_ARM64, reason="compares with the x86 reference; runs on arm64 only")


def test_observations_are_deterministic_and_written(observed, tmp_path):
    """Two independent runs agree bit for bit (else cross-arch parity would mean nothing);
    on x86 with EDGEPIPE_ARM64_REFERENCE set the observations become the reference."""
    first = observed
    second = observe(tmp_path)
    assert compare_preprocess(first["preprocess"], second["preprocess"]) == []
    for name in MODELS:
        assert first["predict"][name] == second["predict"][name], f"{name}: two runs differ"
    assert first["runs"] == second["runs"]
    for key, frames in first["runs"].items():
        assert len(frames) == N_PHOTOS + 1 and all(f["scores"] for f in frames), key
    for name in MODELS:
        for outs in first["predict"][name]["cases"].values():
            assert all(np.isfinite(o["raw"]).all() for o in outs)
    target = os.environ.get("EDGEPIPE_ARM64_REFERENCE")
    if target and not IS_ARM64:
        path = Path(target)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(first))
        os.replace(tmp, path)
        assert json.loads(path.read_text())["predict"] == json.loads(json.dumps(first["predict"]))


def test_comparison_flags_real_differences(observed):
    """The comparators accept the observations themselves and reject a perturbed copy."""
    obs = observed
    assert compare_preprocess(obs["preprocess"], obs["preprocess"]) == []
    bad_pre = json.loads(json.dumps(obs["preprocess"]))
    key = next(iter(bad_pre))
    bad_pre[key]["values"][0] += 0.01
    assert len(compare_preprocess(obs["preprocess"], bad_pre)) == 1
    for name in ("float.tflite", "int8_io.tflite", "int8_float_io.tflite"):
        ref = obs["predict"][name]
        assert compare_model(name, ref, ref) == []
        bad = json.loads(json.dumps(ref))
        out = bad["cases"]["random/0"][0]
        out["raw"][0] += 2 if out["scale"] is not None else 0.05
        assert len(compare_model(name, ref, bad)) == 1, name
        stale = dict(bad, sha256="0" * 64)
        assert "another version" in compare_model(name, ref, stale)[0]
    assert compare_runs(obs["runs"], obs["runs"]) == []
    for key in ("float.tflite/pipelined", "int8_io.tflite/sequential"):
        bad_runs = json.loads(json.dumps(obs["runs"]))
        scores = bad_runs[key][-1]["scores"]
        first_class = next(iter(scores))
        scores[first_class] += 0.05
        assert len(compare_runs(obs["runs"], bad_runs)) == 1, key
        bad_runs[key].pop()
        assert "frames" in compare_runs(obs["runs"], bad_runs)[0]


@arm64_only
def test_preprocessing_matches_x86(observed, reference):
    problems = compare_preprocess(reference["preprocess"], observed["preprocess"])
    assert not problems, "arm64 preprocessing differs from x86:\n" + "\n".join(problems)


@arm64_only
@pytest.mark.parametrize("model_name", MODELS)
def test_predictions_match_x86(observed, reference, model_name):
    assert model_name in reference["predict"], f"{model_name} missing from the x86 reference"
    problems = compare_model(model_name, reference["predict"][model_name], observed["predict"][model_name])
    assert not problems, (f"arm64 ({observed['backend']}) differs from x86 ({reference['backend']}):\n"
                          + "\n".join(problems))


@arm64_only
def test_runner_matches_x86(observed, reference):
    assert "runs" in reference, "the x86 reference predates runner parity; rerun scripts/test-arm64.sh"
    problems = compare_runs(reference["runs"], observed["runs"])
    assert not problems, (f"arm64 runner ({observed['backend']}) differs from x86 ({reference['backend']}):\n"
                          + "\n".join(problems))


# Which runtime and numpy each emulated stack must really have exercised.
STACKS = {
    "tflite-runtime": ("tflite_runtime", 1),
    "ai-edge-litert": ("ai_edge_litert", 2),
}


@pytest.mark.skipif(os.environ.get("EDGEPIPE_ARM64_STACK") not in STACKS,
                    reason="only under scripts/test-arm64.sh (EDGEPIPE_ARM64_STACK names the stack)")
def test_stack_runs_its_own_runtime_and_numpy(observed):
    backend, numpy_major = STACKS[os.environ["EDGEPIPE_ARM64_STACK"]]
    assert IS_ARM64
    assert observed["backend"]["name"] == backend
    assert int(np.__version__.split(".")[0]) == numpy_major
