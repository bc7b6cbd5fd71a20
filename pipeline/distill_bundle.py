"""``edgepipe convert --distill-steps``: re-make an int8 bundle with a distilled model when it agrees better.

The fine-tune itself is :func:`edgepipe.pipeline.distill.distill_int8`; this
module only takes its inputs from the bundle (the calibration images its
manifest records, the validation folder) and keeps the result the way
``--calib-method`` does: the model is replaced only when it agrees better
with the float model (higher top-1 agreement, or equal agreement and higher
SNR) on the validation images, and the manifest records what was tried
either way in ``extra.distill``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

from edgepipe.pipeline.distill import DistillProgress, DistillResult, distill_int8
from edgepipe.pipeline.modelio import load_keras


@dataclass(frozen=True)
class Distilled:
    """What ``apply_to_bundle`` did: the fine-tune's result and whether the bundle now holds it."""

    result: DistillResult
    kept: bool
    measured_on: str  # validation | held-back | calibration (selective.eval_inputs)

    @property
    def tflite(self) -> bytes:
        return self.result.tflite

    def to_dict(self) -> dict:
        return {**self.result.to_dict(), "kept": "distilled" if self.kept else "int8",
                "measured_on": self.measured_on}


def _say_progress(on_step: Callable[[str], None]) -> Callable[[DistillProgress], None]:
    def say(ev: DistillProgress) -> None:
        if ev.phase == "train" and ev.steps:
            loss = f", loss {ev.loss:.4g}" if ev.loss is not None else ""
            on_step(f"distill: step {ev.step}/{ev.steps}{loss}")
        elif ev.phase in ("prepare", "converting", "evaluate"):
            on_step(f"distill: {ev.phase}")
    return say


def apply_to_bundle(bundle_path, keras_model_path, steps: int, *, lr: float = 1e-5, eval_dir=None,
                    on_step: Callable[[str], None] = lambda msg: None) -> Distilled:
    """Fine-tune the ``int8`` bundle's model for ``steps`` steps; keep it when it agrees better with float."""
    from edgepipe.device.bundle import write_manifest
    from edgepipe.pipeline import selective

    bi = selective.bundle_inputs(bundle_path, eval_dir)
    b, m, calib, ex, where = bi.bundle, bi.bundle.manifest, bi.calib, bi.ex, bi.where
    keras = load_keras(keras_model_path)
    on_step(f"distill: {steps} steps on {len(calib)} calibration images, measured on {len(ex)} "
            f"{selective._WHERE[where]} images")
    res = distill_int8(keras, calib, ex, steps=steps, lr=lr, baseline=b.model_path.read_bytes(),
                       on_progress=_say_progress(on_step))
    before = res.before
    won = before is None or (res.after.agreement, res.after.snr_db) > (before.agreement, before.snr_db)
    out = Distilled(res, won, where)
    if won:
        selective._rewrite_bundle(b, out, key="distill")
    else:
        write_manifest(b.path, dataclasses.replace(m, extra={**m.extra, "distill": out.to_dict()}))
    return out


__all__ = ["Distilled", "apply_to_bundle"]
