"""Real bundle directories around the committed tiny models (no TensorFlow needed)."""
from __future__ import annotations

import shutil
from pathlib import Path

from edgepipe.device.bundle import Manifest, sha256_file, write_manifest

MODELS = Path(__file__).resolve().parent / "data" / "models"


def make_bundle(root: Path, model: str, name: str, recipe: str) -> Path:
    """``root/name`` holding ``tests/data/models/<model>`` and a manifest describing it."""
    from edgepipe.device.runtime import load_model

    d = root / name
    d.mkdir(parents=True)
    shutil.copy(MODELS / model, d / "model.tflite")
    inputs, outputs = load_model(d / "model.tflite").tensor_infos()
    write_manifest(d, Manifest(
        name=name, recipe=recipe, model_sha256=sha256_file(d / "model.tflite"),
        model_size=(d / "model.tflite").stat().st_size, inputs=inputs, outputs=outputs))
    return d
