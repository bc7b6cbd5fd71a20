"""`edgepipe convert`: the click boundary around edgepipe.pipeline.convert."""
from __future__ import annotations

import json
from pathlib import Path

import click

from edgepipe.device.cliout import fail

from edgepipe.pipeline import calibration
from edgepipe.pipeline.cache import default_cache_dir
from edgepipe.pipeline.preprocessing import PRESETS, PreprocessRequest
from edgepipe.pipeline.recipes import DEFAULT_RECIPES, RECIPES, RecipeError, parse_recipes, with_io_type
from edgepipe.device.tables import format_bytes, format_table


def _floats(ctx, param, value):
    if value is None:
        return None
    try:
        return tuple(float(v) for v in value.split(","))
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers, got {value!r}") from None


def _size(ctx, param, value):
    if value is None:
        return None
    parts = value.lower().replace("*", "x").split("x")
    try:
        h, w = (int(parts[0]), int(parts[1])) if len(parts) == 2 else (int(parts[0]),) * 2
    except ValueError:
        raise click.BadParameter(f"expected HxW such as 224x224, got {value!r}") from None
    if h < 1 or w < 1:
        raise click.BadParameter("sizes must be positive")
    return (h, w)


def _list_recipes(ctx, param, value):
    if not value or ctx.resilient_parsing:
        return
    rows = [[r.name, r.weights, r.activations, r.io_type or "float32",
             "yes" if r.needs_calibration else "", "yes" if r.edgetpu else "", r.summary]
            for r in RECIPES.values()]
    click.echo(format_table(["recipe", "weights", "activations", "I/O", "calibration", "Edge TPU", "what"], rows))
    ctx.exit(0)


EPILOG = """\b
Examples:
  edgepipe convert model.keras --recipes all --calib photos/ --out bundles/
  edgepipe convert mobilenet_v2.keras --preprocess imagenet --labels labels.txt \\
      --recipes fp32,int8,int8-io --calib sample_data/images --out bundles/
  edgepipe convert saved_model_dir --recipes fp16 --out bundles/ --json
  edgepipe convert detector.tflite --preprocess mobilenet --labels labels.txt --decoder decoder.json \\
      --recipes fp32,int8 --calib photos/ --out bundles/
"""


@click.command(epilog=EPILOG)
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--recipes", default=",".join(DEFAULT_RECIPES), show_default=True,
              help="Comma-separated recipes, or 'all'. See --list-recipes.")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path),
              help="Directory that receives one bundle per recipe (<name>-<recipe>/).")
@click.option("--calib", "calib_dir", type=click.Path(path_type=Path),
              help="Folder of real images for calibration (needed by int8, int8-io, int16x8).")
@click.option("--calib-count", default=calibration.DEFAULT_COUNT, show_default=True, type=int,
              help="How many calibration images to draw from --calib.")
@click.option("--seed", default=calibration.DEFAULT_SEED, show_default=True, type=int,
              help="Seed for choosing the calibration images.")
@click.option("--preprocess", "preset", type=click.Choice(sorted(PRESETS)),
              help="Pixel normalisation preset of the model (default: inferred, see the manifest's 'assumed').")
@click.option("--mean", callback=_floats, help="Per-channel mean on 0..255 pixels, e.g. 127.5 or 123.7,116.3,103.5.")
@click.option("--std", callback=_floats, help="Per-channel std on 0..255 pixels, e.g. 127.5.")
@click.option("--color", type=click.Choice(["rgb", "bgr"]), help="Channel order the model expects.")
@click.option("--resize", type=click.Choice(["stretch", "center-crop", "letterbox"]),
              help="How frames are fitted to the input (letterbox: aspect kept, padded).")
@click.option("--crop-fraction", type=float, help="Centre-crop fraction with --resize center-crop (e.g. 0.875).")
@click.option("--input-size", callback=_size, help="Fix or change a Keras model's input size, HxW.")
@click.option("--io-type", type=click.Choice(["uint8", "int8"]), default="uint8", show_default=True,
              help="Integer input/output type of the int8-io recipe.")
@click.option("--labels", type=click.Path(path_type=Path), help="Class names, one per line, stored in the bundle.")
@click.option("--task", type=click.Choice(["classification", "detection", "segmentation", "other"]),
              help="What the outputs mean (default: inferred).")
@click.option("--decoder", "decoder_file", type=click.Path(path_type=Path, dir_okay=False),
              help="JSON file with the detection/segmentation decoder parameters recorded in the manifest "
                   "(an object with 'kind', or such objects keyed by model file name).")
@click.option("--name", help="Bundle name prefix (default: the model file's stem).")
@click.option("--cache-dir", type=click.Path(path_type=Path),
              help="Conversion cache (default: $EDGEPIPE_CACHE or ~/.cache/edgepipe).")
@click.option("--no-cache", is_flag=True, help="Convert from scratch and do not store the result.")
@click.option("--no-edgetpu", is_flag=True, help="Do not run edgetpu_compiler even when it is installed.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON on stdout.")
@click.option("--target-agreement", type=click.FloatRange(0, 1, min_open=True),
              help="int8 only: keep the fewest most sensitive layers in float until top-1 agreement "
                   "with the float model reaches this (e.g. 0.97) on --val (else the calibration images).")
@click.option("--val", "val_dir", type=click.Path(path_type=Path, file_okay=False, exists=True),
              help="Validation images (not used for calibration): every agreement --target-agreement and "
                   "--calib-method measure or optimise is measured here.")
@click.option("--calib-method", default=None, metavar="METHOD",
              help="int8 activation ranges: minmax (default), percentile:P (e.g. percentile:99.99) or mse; then "
                   "optionally +cle (cross-layer equalization first; ReLU6 of equalized layers become ReLU) "
                   "and/or +bias (bias correction), e.g. mse+cle+bias; then optionally ' per-tensor'. Kept only "
                   "when it agrees better with the original float model.")
@click.option("--try-int16", type=click.IntRange(0, 64), default=0, show_default=True, metavar="N",
              help="With --target-agreement: first try 16-bit activations (int8 weights) for the worst 1, 2, 4 "
                   "... N layers, and keep layers float only when that does not reach the target or is slower "
                   "than fp32. Off by default: LiteRT runs 16-bit convolutions on slow reference kernels on CPU.")
@click.option("--distill-steps", type=click.IntRange(0, 10_000), default=0, show_default=True, metavar="N",
              help="int8 only: fine-tune the quantized model for N steps to reproduce the float model's outputs "
                   "on the calibration images (no labels; tf-keras + tensorflow-model-optimization in a child "
                   "process); kept only when it agrees better with float on --val. Try 30-60.")
@click.option("--list-recipes", is_flag=True, is_eager=True, expose_value=False, callback=_list_recipes,
              help="Show what each recipe does and exit.")
def convert(model, recipes, out_dir, calib_dir, calib_count, seed, preset, mean, std, color, resize,
            crop_fraction, input_size, io_type, labels, task, decoder_file, name, cache_dir, no_cache, no_edgetpu,
            as_json, target_agreement, val_dir, calib_method, try_int16, distill_steps):
    """Convert MODEL (.keras, .h5, a SavedModel directory or a float .tflite) into TFLite bundles, one per recipe.

    A .tflite is quantized with the LiteRT quantizer (ai-edge-quantizer); the
    manifest's converter block says which tool made each variant.
    """
    from edgepipe.pipeline.convert import ConvertError, ConvertRequest, convert_model

    try:
        chosen = tuple(with_io_type(r, io_type) for r in parse_recipes(recipes))
    except RecipeError as e:
        raise fail(e) from None
    req = ConvertRequest(
        model=model, recipes=chosen, out_dir=out_dir, calib_dir=calib_dir, calib_count=calib_count,
        calib_seed=seed,
        preprocess=PreprocessRequest(preset=preset, mean=mean, std=std, color=color, resize=resize,
                                     crop_fraction=crop_fraction),
        input_size=input_size, labels=labels, task=task, name=name,
        cache_dir=None if no_cache else (cache_dir or default_cache_dir()),
        edgetpu=not no_edgetpu, decoder=_decoder(decoder_file, model),
    )

    from edgepipe.device import progress as pg

    # A bar with ETA over the recipes on a terminal (the "[i/N] recipe" lines drive it); plain lines otherwise.
    bar = pg.Bar(len(chosen), "convert", unit="recipe", on=pg.enabled(as_json=as_json))

    def progress(msg: str) -> None:
        if bar.active:
            bar.message(msg)
        else:
            click.echo(f"edgepipe: {msg}", err=True)

    if target_agreement is not None:
        _needs_int8_from_keras("--target-agreement", chosen, model)
    if try_int16 and target_agreement is None:
        raise click.ClickException("--try-int16: needs --target-agreement")
    method = _calib_method(calib_method, chosen, model)
    _check_distill(distill_steps, chosen, model)
    try:
        with bar:
            results = convert_model(req, progress=progress)
            bar.finish()
    except (ConvertError, ValueError, OSError) as e:
        raise fail(e) from None
    if target_agreement is not None:
        results = [_selective(r, results, model, target_agreement, progress, val_dir, method, try_int16)
                   for r in results]
    elif method is not None:
        results = [_requantize(r, results, model, method, progress, val_dir) for r in results]
    if distill_steps:
        results = [_distill(r, results, model, distill_steps, progress, val_dir) for r in results]
    _report(results, model, out_dir, as_json)


def _calib_method(text, chosen, model):
    """``--calib-method``: the parsed method (None when not given)."""
    if text is None:
        return None
    from edgepipe.pipeline.ptq import Method, PTQError

    try:
        method = Method.parse(text)
    except PTQError as e:
        raise click.ClickException(f"--calib-method: {e}") from None
    _needs_int8_from_keras("--calib-method", chosen, model)
    return method


def _needs_int8_from_keras(flag: str, chosen, model) -> None:
    """The options that re-make the int8 bundle from the source model need both."""
    if not any(r.name == "int8" for r in chosen):
        raise click.ClickException(f"{flag}: needs the int8 recipe in --recipes")
    if model.suffix.lower() == ".tflite":
        raise click.ClickException(f"{flag}: needs a Keras or SavedModel source, not a .tflite")


def _int8_again(r, results, progress, redo, errors):
    """Re-make the int8 result's bundle with ``redo(bundle) -> (model size, message)``; other rows pass."""
    import dataclasses

    if r.recipe != "int8" or not r.bundle or r.error:
        return r
    try:
        size, message = redo(r.bundle)
    except errors as e:
        raise fail(e) from None
    progress(message)
    fp32 = next((x.size for x in results if x.recipe == "fp32" and x.size), None)
    return dataclasses.replace(r, size=size, ratio_to_fp32=round(size / fp32, 4) if fp32 else None)


def _requantize(r, results, model_path, method, progress, val_dir):
    """``--calib-method``: re-make the int8 bundle with those ranges when they agree better with float."""
    from edgepipe.pipeline.ptq import PTQError, apply_to_bundle
    from edgepipe.pipeline.selective import SelectiveError

    def redo(bundle):
        res = apply_to_bundle(bundle, model_path, method, eval_dir=val_dir, on_step=progress)
        where = {"validation": "validation", "held-back": "held-back"}.get(res.measured_on, "calibration (no --val)")
        return len(res.tflite), (f"int8: agreement on {res.eval_images} {where} images: "
                                 + ", ".join(f"{k} {v:.4f} ({res.snr_db[k]:.1f} dB)" for k, v in res.agreement.items())
                                 + f"; kept {res.chosen}")
    return _int8_again(r, results, progress, redo, (PTQError, SelectiveError, ValueError, OSError))


def _check_distill(steps: int, chosen, model) -> None:
    if not steps:
        return
    _needs_int8_from_keras("--distill-steps", chosen, model)
    from edgepipe.pipeline.distill import missing_dependencies, unavailable_message

    missing = missing_dependencies()
    if missing:  # before the conversions, not after minutes of them
        raise click.ClickException(f"--distill-steps: {unavailable_message(missing)}")


def _distill(r, results, model_path, steps, progress, val_dir):
    """``--distill-steps``: re-make the int8 bundle with the fine-tuned model when it agrees better."""
    from edgepipe.pipeline.distill import DistillError
    from edgepipe.pipeline.distill_bundle import apply_to_bundle
    from edgepipe.pipeline.selective import SelectiveError

    def redo(bundle):
        res = apply_to_bundle(bundle, model_path, steps, eval_dir=val_dir, on_step=progress)
        d = res.to_dict()
        before = (d.get("before") or {}).get("agreement", float("nan"))
        return ((len(res.tflite) if res.kept else r.size),
                f"int8: distilled agreement {d['after']['agreement']:.4f} ({d['after']['snr_db']:.1f} dB) vs "
                f"{before:.4f} before; kept {d['kept']}")
    return _int8_again(r, results, progress, redo, (DistillError, SelectiveError, ValueError, OSError))


def _decoder(path, model):
    """``--decoder FILE``: the decoder block (a ``kind`` object, or one keyed by the model's file name)."""
    if path is None:
        return None
    from edgepipe.device.decode import DecodeError, DecoderSpec

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise click.ClickException(f"--decoder {path}: unreadable JSON ({e})") from None
    if isinstance(data, dict) and "kind" not in data:
        data = data.get(Path(model).name)
        if data is None:
            raise click.ClickException(f"--decoder {path}: no 'kind' and no entry for {Path(model).name}")
    try:
        return DecoderSpec.from_dict(data).to_dict()
    except DecodeError as e:
        raise click.ClickException(f"--decoder {path}: {e}") from None


def _report(results, model, out_dir, as_json: bool) -> None:
    """The table (or JSON) on stdout; a non-zero exit naming every recipe that failed."""
    if as_json:
        click.echo(json.dumps({"model": str(model), "out": str(out_dir),
                               "results": [r.to_dict() for r in results]}, indent=2))
    else:
        click.echo(_summary(results))
    failed = [r for r in results if r.error]
    if failed:
        raise click.ClickException(f"{len(failed)} of {len(results)} recipes failed: "
                                   + "; ".join(f"{r.recipe}: {r.error}" for r in failed))


def _summary(results) -> str:
    rows = []
    for r in results:
        tpu = ""
        if r.edgetpu:
            tpu = (f"{r.edgetpu.get('tpu_ops', 0)} on TPU / {r.edgetpu.get('cpu_ops', 0)} on CPU"
                   if r.edgetpu.get("compiled") else "not compiled")
        rows.append([r.recipe, format_bytes(r.size) if r.size else "-",
                     f"{r.ratio_to_fp32:.2f}x" if r.ratio_to_fp32 else "-",
                     f"{r.seconds:.1f} s", "hit" if r.cache_hit else ("-" if r.error else "miss"),
                     tpu, str(r.bundle) if r.bundle else f"FAILED: {r.error}"])
    return format_table(["recipe", "size", "vs fp32", "time", "cache", "Edge TPU", "bundle"], rows)


def _selective(r, results, model_path, target: float, progress, val_dir=None, method=None, try_int16=0):
    """``--target-agreement``: rework the int8 bundle of this run; the result's size follows."""
    import dataclasses

    if r.recipe != "int8" or not r.bundle or r.error:
        return r

    from edgepipe.pipeline.selective import SelectiveError, apply_to_bundle

    progress(f"int8: searching the fewest float layers for agreement >= {target}")
    try:
        sel = apply_to_bundle(r.bundle, model_path, target, on_step=progress, eval_dir=val_dir, method=method,
                              try_int16=try_int16)
    except (SelectiveError, ValueError, OSError) as e:
        raise fail(e) from None
    progress(_selective_summary(sel, target))
    if len(sel.kept) > sel.layers_total // 2:
        progress("warning: more than half of the layers stay float, so this is close to the "
                 "fp32 model in size and speed; compare with fp16, or calibrate with more "
                 "representative images (--calib, --calib-count)")
    fp32 = next((x.size for x in results if x.recipe == "fp32" and x.size), None)
    return dataclasses.replace(r, size=len(sel.tflite),
                               ratio_to_fp32=round(len(sel.tflite) / fp32, 4) if fp32 else None)


def _selective_summary(sel, target: float) -> str:
    """One line: agreement reached, and which layers stayed float (or went 16-bit) at what latency cost."""
    if sel.int16_chosen:
        step = sel.a16w8["steps"][sel.a16w8["chosen_step"]]
        return (f"int8: agreement {sel.agreement:.4f} (plain int8 {sel.baseline_agreement:.4f}) with "
                f"{step['int16_layers']} layer(s) at 16-bit activations: {', '.join(step['layers'])}; "
                f"p50 {step['p50_ms']:.3f} ms (fp32 {sel.a16w8['fp32_p50_ms']:.3f} ms)")
    if sel.latency and len(sel.latency) == len(sel.kept) + 1:
        kept = [f"{e.layer} ({c['cost_ms']:+.3f} ms)" for e, c in zip(sel.kept, sel.latency[1:])]
    else:
        kept = [e.layer for e in sel.kept]
    shown = ", ".join(kept[:6]) + (f" and {len(kept) - 6} more" if len(kept) > 6 else "")
    lat = sel.latency
    total = f"; p50 {lat[0]['p50_ms']:.3f} -> {lat[-1]['p50_ms']:.3f} ms" if len(lat) > 1 else ""
    return (f"int8: agreement {sel.agreement:.4f} (plain int8 {sel.baseline_agreement:.4f}); "
            f"{len(kept)} of {sel.layers_total} layers in float: {shown or 'none'}{total}"
            + ("" if sel.reached else f"; target {target} NOT reached"))
