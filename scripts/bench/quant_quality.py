#!/usr/bin/env python
"""int8 quality per calibration method on images the model was NOT calibrated on (sample MobileNetV2).

The photos of sample_data/photos (290 real photos) are split by photo (seeded): --calib-photos
of them calibrate, the rest validate, so no agreement printed here was
measured on a calibration image. Each photo gives --views views (the photo,
its mirror image, corner and centre crops), all preprocessed the bundle's
way (ImageNet centre crop 0.875): more validation inputs, but views of one
photo are correlated, so read the agreement as +-1/(number of val photos)
rather than +-1/(number of views).

For each method of edgepipe.pipeline.ptq (min-max, percentile, MSE; per-channel
or per-tensor weights): top-1 agreement and SNR against the float Keras model
on the validation views, and p50 invoke latency (1 thread) relative to the
fp32 TFLite model. Then the selective search (--target-agreement, default
0.97) on top of the best method: layers ranked on the validation views, and
how many stay float and what that costs in latency. Before that, the cheap
alternative to float: 16-bit activations with int8 weights (a16w8, via
ai-edge-quantizer, on the best method's ranges without bias correction) for
the worst 1, 2, 4 ... --int16-max layers of the same ranking, each step's
agreement, SNR and p50 in the table. Target: >= 0.97 agreement at <= 0.65x
fp32 p50; the table says how far each method got.

--photos DIR takes any folder of .jpg/.jpeg/.png photos (searched recursively,
so class sub-folders are fine); the default is sample_data/photos, 128 photos
calibrate and the other 162 validate, 2 views each (256 and 324 inputs).
``--photos sample_data/images --calib-photos 16 --views 8`` repeats the first,
31-photo measurement.

    EDGEPIPE_CACHE=... .venv/bin/python scripts/bench/quant_quality.py [--photos DIR] [--calib-photos 128] [--views 2]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from edgepipe.pipeline import metrics  # noqa: E402
from edgepipe.pipeline.preprocessing import PreprocessRequest, resolve  # noqa: E402

TARGET_RATIO = 0.65
PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png")


def views(img: Image.Image, n: int) -> list:
    """The photo, its mirror, four corner crops (85%), centre crops (70%, mirrored 85%): up to n views."""
    w, h = img.size
    cw, ch = int(w * 0.85), int(h * 0.85)
    flip = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    out = [img, flip, img.crop((0, 0, cw, ch)), img.crop((w - cw, 0, w, ch)), img.crop((0, h - ch, cw, h)),
           img.crop((w - cw, h - ch, w, h)), img.crop((int(w * .15), int(h * .15), int(w * .85), int(h * .85))),
           flip.crop(((w - cw) // 2, (h - ch) // 2, (w + cw) // 2, (h + ch) // 2))]
    return out[:n]


def interleaved_p50(models: dict, x: np.ndarray, rounds: int, runs: int) -> dict:
    """Name -> p50 invoke ms (1 thread), the best of ``rounds`` rounds that each time every model in turn.

    On a shared CPU noise only ever slows a round down; interleaving keeps the models under the same load.
    """
    from edgepipe.pipeline.model_run import load_bytes

    loaded = {}
    for name, m in models.items():
        lm = load_bytes(m, 1)
        spec = lm.inputs[0]
        lm.set_input(0, spec.quantize(x[:1]).reshape(spec.shape))
        lm.invoke()
        loaded[name] = lm
    best = {name: float("inf") for name in models}
    for _ in range(rounds):
        for name, lm in loaded.items():
            ts = []
            for _ in range(runs):
                t0 = time.perf_counter_ns()
                lm.invoke()
                ts.append((time.perf_counter_ns() - t0) / 1e6)
            best[name] = min(best[name], float(np.median(ts)))
    return best


def load_split(folder: Path, calib_photos: int, n_views: int, spec, seed: int, val_photos: int = 0):
    from edgepipe.device.preprocess import load_image

    photos = sorted(p for p in folder.rglob("*") if p.suffix.lower() in PHOTO_SUFFIXES and p.is_file())
    if len(photos) <= calib_photos:
        raise SystemExit(f"{folder}: {len(photos)} photos (.jpg/.png); need more than --calib-photos {calib_photos}")
    order = np.random.default_rng(seed).permutation(len(photos))
    calib_p = [photos[i] for i in sorted(order[:calib_photos])]
    val_p = [photos[i] for i in sorted(order[calib_photos:calib_photos + (val_photos or len(photos))])]

    def arrays(paths):
        return np.stack([load_image(v, spec) for p in paths
                         for v in views(Image.open(p).convert("RGB"), n_views)]).astype(np.float32)
    return arrays(calib_p), arrays(val_p), len(calib_p), len(val_p)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--photos", "--images", dest="images", default=str(ROOT / "sample_data" / "photos"),
                    help="folder of .jpg/.png photos (recursive); split by photo into calibration and validation")
    ap.add_argument("--calib-photos", type=int, default=128)
    ap.add_argument("--val-photos", type=int, default=0, help="at most this many validation photos (0: all others)")
    ap.add_argument("--int16-max", type=int, default=8,
                    help="a16w8 steps: 16-bit activations for the worst 1, 2, 4 ... this many layers (0: none)")
    ap.add_argument("--views", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--target-agreement", type=float, default=0.97)
    ap.add_argument("--methods", default="minmax,minmax per-tensor,percentile:99.99,percentile:99.999,mse,"
                    "minmax+bias,percentile:99.999+bias,mse+bias,mse+cle,mse+cle+bias")
    ap.add_argument("--rank", choices=("output", "local"), default="output",
                    help="selective ranking: each layer's effect on the output SNR (validation views), or the "
                         "debugger's local error")
    ap.add_argument("--distill-steps", type=int, default=0,
                    help="also fine-tune int8 against the float outputs for this many steps (needs tf-keras + tfmot)")
    ap.add_argument("--distill-lr", type=float, default=1e-5)
    ap.add_argument("--runs", type=int, default=20, help="timed invokes per model and round")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (the best is kept)")
    return ap.parse_args()


def main() -> int:
    args = parse_args()
    print_table(args, measure(args))
    return 0


def measure(args) -> SimpleNamespace:
    """Every model of the table, its agreement and SNR on the validation views, and interleaved p50s."""
    from edgepipe.pipeline.ptq import Method, calibrate
    from edgepipe.pipeline.samples import mobilenet_v2_keras
    from edgepipe.pipeline.model_run import float_outputs, run_tflite
    from edgepipe.pipeline.tfenv import captured_output, import_tf

    tf = import_tf()
    with captured_output():
        model = tf.keras.models.load_model(str(mobilenet_v2_keras()), compile=False)
    spec = resolve(model.inputs[0].shape, PreprocessRequest(preset="imagenet"))
    calib, val, n_cp, n_vp = load_split(Path(args.images), args.calib_photos, args.views, spec, args.seed,
                                        args.val_photos)
    print(f"sample MobileNetV2; calibration: {n_cp} photos x {args.views} views = {len(calib)}; "
          f"validation: {n_vp} other photos x {args.views} views = {len(val)}")
    ref = float_outputs(model, val)
    with captured_output():
        fp32 = tf.lite.TFLiteConverter.from_keras_model(model).convert()
    t0 = time.perf_counter()
    cal = calibrate(model, calib)
    print(f"calibrated + histograms in {time.perf_counter() - t0:.1f} s")
    rows, models = [], {"fp32": fp32}
    for text in args.methods.split(","):
        m = Method.parse(text.strip())
        q = cal.quantize(m)
        out = run_tflite(q, val)
        rows.append((m, metrics.top1_agreement(out, ref), metrics.snr_db(out, ref)))
        models[m.name] = q
    best = max(rows, key=lambda r: (r[1], r[2]))
    sel, ranked = selective_step(args, model, cal, best[0], models[best[0].name], calib, val, ref)
    if sel.kept:
        models["selective"] = sel.tflite
    mixed = int16_steps(args, fp32, cal, best[0], ranked, calib, val, ref)
    for st, q in zip(mixed.steps if mixed else (), mixed.models if mixed else ()):
        models[f"a16w8:{len(st.int16_layers)}"] = q
    dist = distill_step(args, model, calib, val, models)
    p50 = interleaved_p50(models, val, args.rounds, args.runs)
    return SimpleNamespace(rows=rows, best=best, sel=sel, mixed=mixed, dist=dist, p50=p50)


def print_table(args, r: SimpleNamespace) -> None:
    """The markdown table and the "Done when" lines."""
    rows, best, sel, mixed, dist, p50 = r.rows, r.best, r.sel, r.mixed, r.dist, r.p50
    print(f"\np50: best of {args.rounds} interleaved rounds of {args.runs} invokes, 1 thread; "
          f"fp32 {p50['fp32']:.2f} ms\n")
    print("| method | agreement | SNR dB | p50 ms | p50 / fp32 |\n|---|---|---|---|---|")
    print(f"| fp32 (reference) | 1.0000 | - | {p50['fp32']:.2f} | 1.00 |")
    for m, agree, snr in rows:
        print(f"| {m.name} | {agree:.4f} | {snr:.1f} | {p50[m.name]:.2f} | {p50[m.name] / p50['fp32']:.2f} |")
    for st in mixed.steps if mixed else ():
        k = len(st.int16_layers)
        t = p50[f"a16w8:{k}"]
        print(f"| a16w8 ({best[0].ranges} ranges), {k} layer(s) at 16 bit | {st.agreement:.4f} | {st.snr_db:.1f} | "
              f"{t:.2f} | {t / p50['fp32']:.2f} |")
    if dist:
        d = p50["distilled"]
        print(f"| int8 distilled ({dist.steps} steps, batch {dist.batch}, lr {dist.lr:g}) | "
              f"{dist.after.agreement:.4f} | {dist.after.snr_db:.1f} | {d:.2f} | {d / p50['fp32']:.2f} |")
    b_ratio = p50[best[0].name] / p50["fp32"]
    print(f"\nbest method: {best[0].name}: agreement {best[1]:.4f}, p50 / fp32 = {b_ratio:.2f}")
    s_ratio = p50["selective"] / p50["fp32"] if sel.kept else b_ratio
    print(f"--target-agreement {args.target_agreement} on {best[0].name}: {len(sel.kept)} of {sel.layers_total} "
          f"layers float, agreement {sel.agreement:.4f} ({'reached' if sel.reached else 'NOT reached'}), "
          f"p50 / fp32 = {s_ratio:.2f}")
    if mixed:
        top = max(mixed.steps, key=lambda st: (st.agreement, st.snr_db))
        k = len(top.int16_layers)
        print(f"16-bit activations (a16w8) for the worst 1..{args.int16_max} layers: best agreement "
              f"{top.agreement:.4f} at {k} layer(s), p50 / fp32 = {p50[f'a16w8:{k}'] / p50['fp32']:.2f} "
              f"(worst layers, in order: {', '.join(mixed.steps[-1].to_dict()['layers']) or 'none'})")
    ok = sel.reached and s_ratio <= TARGET_RATIO
    print(f"target >= {args.target_agreement} agreement at <= {TARGET_RATIO}x fp32 p50: "
          + ("met" if ok else f"not met (best int8 without float layers: {best[1]:.4f} at {b_ratio:.2f}x; "
                              f"with float layers: {sel.agreement:.4f} at {s_ratio:.2f}x)"))


def distill_step(args, model, calib, val, models: dict):
    """--distill-steps: int8 fine-tuned against the float outputs on the calibration views (tf-keras + tfmot)."""
    if args.distill_steps <= 0:
        return None
    from edgepipe.pipeline.distill import DistillError, distill_int8

    try:
        res = distill_int8(model, calib, val, steps=args.distill_steps, lr=args.distill_lr)
    except DistillError as e:
        print(f"distillation: {e}")
        return None
    models["distilled"] = res.tflite
    print(f"distillation: {res.steps} steps in {res.seconds_total:.0f} s (train {res.seconds_train:.0f} s); "
          f"fake-quantized agreement {res.sim_agreement_before:.3f} -> {res.sim_agreement_after:.3f}")
    return res


def selective_step(args, model, cal, method, shipped: bytes, calib, val, ref):
    """The --target-agreement search on top of ``method``'s ranges, everything measured on the validation views
    (``ref``: the float model's outputs on them)."""
    from edgepipe.pipeline.layer_error import debug_int8
    from edgepipe.pipeline.ptq import for_selective, rank_by_output
    from edgepipe.pipeline.selective import selective_int8

    t0 = time.perf_counter()
    layers = debug_int8(model, calib, debug=val, max_debug=len(val)).layers  # errors on the validation views
    keep_order = args.rank == "output"
    if keep_order:  # each layer float alone, ranked by the output SNR it buys on a third of the validation views
        layers = rank_by_output(cal, method, layers, val[::3], ref[::3], say=print)
    res = selective_int8(model, "int8", calib, val, args.target_agreement, shipped=shipped,
                         debugged=for_selective(cal, method, layers, keep_order=keep_order),
                         measure_latency=False, ref=ref)
    print(f"selective search on {method.name} ({args.rank} ranking): {time.perf_counter() - t0:.0f} s; "
          "agreement by float layers: "
          + ", ".join(f"{s['float_layers']}: {s['agreement']:.3f}" for s in res.steps))
    ranked = layers if keep_order else sorted(layers, key=lambda e: -e.rmse_steps)
    return res, ranked


def int16_steps(args, fp32: bytes, cal, method, ranked: list, calib, val, ref):
    """a8w8 then a16w8 for the worst 1, 2, 4 ... --int16-max layers of ``ranked`` (timed later, interleaved)."""
    if args.int16_max <= 0:
        return None
    from edgepipe.pipeline.mixed_precision import named_ranges, search

    t0 = time.perf_counter()
    ranges = None if method.ranges == "minmax" else named_ranges(cal.model, cal.ranges(method))
    res = search(fp32, calib, val, ref, [e.tensor for e in ranked], max_layers=args.int16_max, ranges=ranges,
                 measure_latency=False, on_step=print)
    print(f"a16w8 steps on {method.ranges} ranges: {time.perf_counter() - t0:.0f} s"
          + (f"; not op outputs of the float model: {len(res.unmapped)}" if res.unmapped else ""))
    return res


if __name__ == "__main__":
    sys.exit(main())
