"""`edgepipe convert`: one source model -> one bundle per recipe.

Stages: validate everything the user gave (before any slow work), digest the
model and calibration set, then per recipe: serve from the cache or convert
(loading TensorFlow, the model and the calibration images once, lazily), and
write the bundle atomically. A failing recipe is reported and the others still
complete.
"""
from __future__ import annotations

import datetime as _dt
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from edgepipe.device import __version__
from edgepipe.device.bundle import Manifest, Preprocess, Task
from edgepipe.pipeline import cache as _cache
from edgepipe.pipeline import calibration, edgetpu, modelio
from edgepipe.pipeline.bundle_writer import BundleWriteError, check_writable, write_bundle
from edgepipe.pipeline.preprocessing import PreprocessRequest, resolve
from edgepipe.pipeline.recipes import Recipe
from edgepipe.pipeline.tfenv import captured_output, import_tf, last_error_line, tensorflow_version
from edgepipe.device.errors import EdgepipeError


class ConvertError(EdgepipeError, RuntimeError):
    """A conversion that cannot proceed; message is user-facing."""


@dataclass(frozen=True)
class ConvertRequest:
    model: Path
    recipes: tuple
    out_dir: Path
    calib_dir: Optional[Path] = None
    calib_count: int = calibration.DEFAULT_COUNT
    calib_seed: int = calibration.DEFAULT_SEED
    preprocess: PreprocessRequest = field(default_factory=PreprocessRequest)
    input_size: Optional[tuple] = None
    labels: Optional[Path] = None
    task: Optional[str] = None
    name: Optional[str] = None
    cache_dir: Optional[Path] = None  # None: no cache
    edgetpu: bool = True  # compile int8-io when edgetpu_compiler is on PATH
    decoder: Optional[dict] = None  # detection/segmentation decoder parameters for the manifest


@dataclass(frozen=True)
class RecipeResult:
    recipe: str
    bundle: Optional[Path]
    size: int = 0
    seconds: float = 0.0
    cache_hit: bool = False
    ratio_to_fp32: Optional[float] = None
    edgetpu: Optional[dict] = None
    error: Optional[str] = None

    def to_dict(self) -> dict:
        return {"recipe": self.recipe, "bundle": str(self.bundle) if self.bundle else None, "size": self.size,
                "ratio_to_fp32": self.ratio_to_fp32, "seconds": round(self.seconds, 3),
                "cache_hit": self.cache_hit, "edgetpu": self.edgetpu, "error": self.error}


Progress = Callable[[str], None]


def _configure(tf, converter, recipe: Recipe, arrays) -> None:
    """Apply a recipe (data from edgepipe.pipeline.recipes) to a fresh converter."""
    if recipe.optimize:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if recipe.supported_types:
        converter.target_spec.supported_types = [getattr(tf, t) for t in recipe.supported_types]
    if recipe.needs_calibration:
        converter.representative_dataset = calibration.representative_dataset(arrays)
    if recipe.ops:
        converter.target_spec.supported_ops = [getattr(tf.lite.OpsSet, o.value) for o in recipe.ops]
    if recipe.io_type:
        converter.inference_input_type = getattr(tf, recipe.io_type)
        converter.inference_output_type = getattr(tf, recipe.io_type)


class _Session:
    """Expensive state shared by the recipes of one run, created on first need."""

    def __init__(self, req: ConvertRequest, cset: Optional[calibration.CalibrationSet], progress: Progress):
        self.req, self.cset, self.progress = req, cset, progress
        self._tf = self._source = self._spec = self._arrays = None

    @property
    def tf(self):
        if self._tf is None:
            self.progress("loading TensorFlow")
            self._tf = import_tf()
        return self._tf

    @property
    def source(self) -> modelio.LoadedSource:
        if self._source is None:
            self.progress(f"loading {self.req.model.name}")
            if modelio.model_kind(self.req.model) == modelio.ModelKind.TFLITE:
                from edgepipe.pipeline.convert_tflite import load_tflite  # no TensorFlow needed

                self._source = load_tflite(self.req.model)
                return self._source
            tf = self.tf
            with captured_output():
                self._source = modelio.load_source(tf, self.req.model)
        return self._source

    @property
    def spec(self) -> Optional[Preprocess]:
        """The manifest's preprocessing; None for models that do not take images."""
        if self._spec is None:
            shape = self.source.resolved_input_shape(self.req.input_size)
            try:
                self._spec = resolve(shape, self.req.preprocess, rescales_itself=self.source.rescales_itself)
            except ValueError:
                if self.cset is not None:
                    raise
                return None
            for note in self._spec.assumed:
                self.progress(f"assumed: {note}")
        return self._spec

    def arrays(self):
        if self._arrays is None:
            spec = self.spec
            if spec is None:  # pragma: no cover - resolve() raised above
                raise ConvertError("calibration needs an image-shaped model input")
            self.progress(f"calibration: {self.cset.count} images from {self.cset.folder}")
            self._arrays = calibration.load_arrays(self.cset, spec)
        return self._arrays


def _infer_task(req: ConvertRequest, outputs: tuple) -> Task:
    if req.task:
        return Task(req.task)
    if req.decoder is not None:
        return Task.SEGMENTATION if req.decoder.get("kind") == "segmentation" else Task.DETECTION
    if req.labels is not None:
        return Task.CLASSIFICATION
    if len(outputs) == 1 and len(outputs[0]["shape"]) == 2 and outputs[0]["shape"][1] > 1:
        return Task.CLASSIFICATION
    return Task.OTHER


def validate(req: ConvertRequest) -> Optional[calibration.CalibrationSet]:
    """Check every input before slow work; returns the calibration set (if needed)."""
    modelio.model_kind(req.model)
    if not req.recipes:
        raise ConvertError("no recipes given")
    if req.labels is not None:
        try:
            req.labels.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ConvertError(f"labels file {req.labels}: unreadable ({e})") from None
    check_writable(req.out_dir)
    needs_calib = any(r.needs_calibration for r in req.recipes)
    if needs_calib and req.calib_dir is None:
        names = ", ".join(r.name for r in req.recipes if r.needs_calibration)
        raise ConvertError(f"recipes {names} need calibration images: pass --calib DIR")
    if req.decoder is not None:
        from edgepipe.device.decode import DecoderSpec

        DecoderSpec.from_dict(req.decoder)  # DecodeError (one line) before any slow work
    if req.calib_dir is not None and needs_calib:
        return calibration.select(req.calib_dir, req.calib_count, req.calib_seed)
    return None


def convert_model(req: ConvertRequest, progress: Progress = lambda msg: None) -> list:
    """Convert ``req.model`` with every recipe; returns one RecipeResult per recipe."""
    cset = validate(req)
    run = _Run(req, cset, modelio.model_digest(req.model), progress)
    results = []
    for i, recipe in enumerate(req.recipes, 1):
        progress(f"[{i}/{len(req.recipes)}] {recipe.name}")
        t0 = time.perf_counter()
        try:
            results.append(run.recipe(recipe, t0))
        except (ConvertError, BundleWriteError, edgetpu.EdgeTPUError, modelio.ModelError,
                calibration.CalibrationError, ValueError) as e:
            # A recipe the model cannot take (e.g. an op without int16x8 kernels)
            # must not cost the user the recipes that work.
            results.append(RecipeResult(recipe.name, None, seconds=time.perf_counter() - t0, error=str(e)))
            progress(f"{recipe.name} failed: {e}")
            if isinstance(e, (modelio.ModelError, calibration.CalibrationError)):
                raise ConvertError(str(e)) from None
    fp32 = next((r.size for r in results if r.recipe == "fp32" and r.size), None)
    if fp32:
        results = [r if not r.size else _with_ratio(r, r.size / fp32) for r in results]
    return results


class _Run:
    """One ``convert_model`` call: per recipe, serve from the cache or convert, then write the bundle."""

    def __init__(self, req: ConvertRequest, cset: Optional[calibration.CalibrationSet], digest: str,
                 progress: Progress):
        self.req, self.cset, self.digest, self.progress = req, cset, digest, progress
        self.session = _Session(req, cset, progress)
        self.store = _cache.ConversionCache(req.cache_dir) if req.cache_dir else None
        self.compiler_missing_said = False

    def _key(self, recipe: Recipe) -> str:
        req, cset = self.req, self.cset
        if modelio.model_kind(req.model) == modelio.ModelKind.TFLITE:
            from edgepipe.pipeline.convert_tflite import quantizer_version

            extra = {"quantizer": quantizer_version()}
        else:
            extra = {}
        return _cache.cache_key({**extra,
            "model": self.digest, "recipe": recipe.describe(), "io": recipe.io_type,
            "calibration": cset.digest if (cset and recipe.needs_calibration) else None,
            "preprocess": req.preprocess.to_dict(), "input_size": req.input_size,
            "tensorflow": tensorflow_version(), "edgepipe": __version__,
        })

    def _edgetpu(self, recipe: Recipe) -> tuple:
        """(compile for the Edge TPU?, the manifest's block when it cannot be)."""
        if not (recipe.edgetpu and self.req.edgetpu):
            return False, None
        if edgetpu.find_compiler() is not None:
            return True, None
        if not self.compiler_missing_said:
            self.progress(f"{edgetpu.COMPILER} not on PATH: {recipe.name} bundles are not compiled "
                          "for the Edge TPU (install the Edge TPU compiler to compile them)")
            self.compiler_missing_said = True
        return False, {"compiled": False, "reason": f"{edgetpu.COMPILER} not found on PATH"}

    def recipe(self, recipe: Recipe, t0: float) -> RecipeResult:
        req = self.req
        key = self._key(recipe)
        hit = self.store.get(key) if self.store else None
        if hit:
            data, meta = hit
        else:
            data, meta = _convert_one(self.session, recipe, req)
            if self.store:
                self.store.put(key, data, meta)
        name = f"{req.name or req.model.stem}-{recipe.name}"
        compile_tpu, not_compiled = self._edgetpu(recipe)
        bundle, tpu = write_bundle(
            req.out_dir, name, data,
            manifest_for=lambda model_path, tpu_block: _manifest(
                req, recipe, name, self.digest, data, meta, model_path, tpu_block or not_compiled, self.cset),
            labels=req.labels, compile_edgetpu=compile_tpu)
        return RecipeResult(recipe.name, bundle, len(data), time.perf_counter() - t0,
                            cache_hit=bool(hit), edgetpu=tpu or not_compiled)


def _with_ratio(r: RecipeResult, ratio: float) -> RecipeResult:
    from dataclasses import replace

    return replace(r, ratio_to_fp32=round(ratio, 4))


def _convert_one(session: _Session, recipe: Recipe, req: ConvertRequest) -> tuple:
    """Run the TFLite converter for one recipe; returns (bytes, meta for cache/manifest)."""
    if session.source.kind == modelio.ModelKind.TFLITE:
        return _quantize_tflite(session, recipe)
    tf = session.tf
    source = session.source
    spec = session.spec
    arrays = session.arrays() if recipe.needs_calibration else None
    try:
        with captured_output():
            converter = source.make_converter(tf, req.input_size)
            _configure(tf, converter, recipe, arrays)
    except modelio.ModelError:
        raise
    except Exception as e:  # noqa: BLE001 - tracing the model raises many types
        raise ConvertError(f"{recipe.name}: cannot trace the model ({modelio.one_line(e)})") from None
    log = Path(tempfile.gettempdir()) / f"edgepipe-convert-{os.getpid()}-{recipe.name}.log"
    # A log an earlier failure left under this name must not lend us its error line.
    log.unlink(missing_ok=True)
    try:
        with captured_output(log):
            data = converter.convert()
    except Exception as e:  # noqa: BLE001 - the converter raises many types; one line for the user
        detail = last_error_line(log) or modelio.one_line(e)
        raise ConvertError(f"{recipe.name}: conversion failed: {detail} (full log: {log})") from None
    log.unlink(missing_ok=True)  # kept only on failure, where the error points at it
    meta = {
        "preprocess": spec.to_dict() if spec else None,
        "source_kind": source.kind.value,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    return bytes(data), meta


def _quantize_tflite(session: _Session, recipe: Recipe) -> tuple:
    """A float .tflite through the LiteRT quantizer (edgepipe.pipeline.convert_tflite)."""
    from edgepipe.pipeline.convert_tflite import quantize

    spec = session.spec
    arrays = session.arrays() if recipe.needs_calibration else None
    with captured_output():
        data, converter = quantize(session.source, recipe, arrays)
    return data, {"preprocess": spec.to_dict() if spec else None, "source_kind": session.source.kind.value,
                  "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                  "converter": converter}


def _manifest(req: ConvertRequest, recipe: Recipe, name: str, digest: str, data: bytes, meta: dict,
              model_path: Path, tpu_block: Optional[dict],
              cset: Optional[calibration.CalibrationSet]) -> Manifest:
    import hashlib

    from edgepipe.device.runtime import load_model

    # Tensors as the device runtime sees them (the same code the board runs).
    inputs, outputs = load_model(model_path).tensor_infos()
    task = _infer_task(req, [o.to_dict() for o in outputs])
    return Manifest(
        name=name,
        recipe=recipe.name,
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        source_model={"name": req.model.name, "sha256": digest, "format": meta.get("source_kind")},
        model_sha256=hashlib.sha256(data).hexdigest(),
        model_size=len(data),
        converter=meta.get("converter") or {"tensorflow": tensorflow_version(), "edgepipe": __version__},
        inputs=inputs,
        outputs=outputs,
        preprocess=Preprocess.from_dict(meta["preprocess"]) if meta.get("preprocess") else None,
        task=task,
        labels_file="labels.txt" if req.labels else None,
        calibration=cset.record() if (cset and recipe.needs_calibration) else None,
        edgetpu=tpu_block,
        extra={"recipe": recipe.describe(), "input_size": list(req.input_size) if req.input_size else None},
        decoder=dict(req.decoder) if req.decoder is not None else None,
    )
