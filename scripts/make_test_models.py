#!/usr/bin/env python
"""Build the tiny .tflite models committed under tests/data/models/.

The device tests run in .venv-device, where TensorFlow is absent, so the
models they need are generated once here (in .venv) and committed:

    .venv/bin/python scripts/make_test_models.py [--out tests/data/models]

Everything is seeded; re-running gives functionally identical models (the
bytes may differ between TensorFlow versions). Each model is a few KB.

  float.tflite           float32 in/out, 1x8x8x3 -> 4 softmax scores
  int8_float_io.tflite   full int8 kernels, float32 in/out (quantize/dequantize ops inside)
  int8_io.tflite         full int8 incl. int8 input and output tensors
  uint8_io.tflite        int8 kernels with uint8 input and output tensors
  two_outputs.tflite     float32, two outputs: 4 softmax scores and a 2-vector
  int8_no_bias.tflite    int8_io without the Dense bias (FULLY_CONNECTED bias input -1)
  custom_op.tflite       float.tflite with its first op rewritten to custom op "EdgepipeTestOp"
  edgetpu_like.tflite    float.tflite with its first op rewritten to "edgetpu-custom-op"
  truncated.tflite       the first half of float.tflite
  not_a_model.tflite     a text file with a .tflite suffix
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
H, W, C, K = 8, 8, 3, 4


def _tf():
    sys.path.insert(0, str(ROOT))
    from edgepipe.pipeline.tfenv import import_tf  # quiet import (fd-level)

    return import_tf()


def build_keras(tf, two_outputs: bool = False, bias: bool = True):
    tf.keras.utils.set_random_seed(0)
    inp = tf.keras.Input((H, W, C), batch_size=1, name="image")
    x = tf.keras.layers.Conv2D(4, 3, padding="same", activation="relu")(inp)
    x = tf.keras.layers.DepthwiseConv2D(3, padding="same", activation="relu")(x)
    x = tf.keras.layers.GlobalAveragePooling2D()(x)
    # Non-zero biases, as in any trained model: the converter drops an all-zero
    # bias, and tflite-runtime 2.14 on arm64 dereferences the missing bias of an
    # int8 FULLY_CONNECTED (segfault in gemmlowp), see docs/arm64.md.
    scores = tf.keras.layers.Dense(K, activation="softmax", use_bias=bias, bias_initializer="random_uniform",
                                   name="scores")(x)
    if not two_outputs:
        return tf.keras.Model(inp, scores)
    aux = tf.keras.layers.Dense(2, bias_initializer="random_uniform", name="aux")(x)
    return tf.keras.Model(inp, [scores, aux])


def convert(tf, model, quant: str | None = None) -> bytes:
    conv = tf.lite.TFLiteConverter.from_keras_model(model)
    if quant:
        rng = __import__("numpy").random.default_rng(0)

        def rep():
            for _ in range(32):
                yield [rng.uniform(-1, 1, (1, H, W, C)).astype("float32")]

        conv.optimizations = [tf.lite.Optimize.DEFAULT]
        conv.representative_dataset = rep
        conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        if quant == "int8":
            conv.inference_input_type = tf.int8
            conv.inference_output_type = tf.int8
        elif quant == "uint8":
            conv.inference_input_type = tf.uint8
            conv.inference_output_type = tf.uint8
    return conv.convert()


def with_custom_first_op(data: bytes, custom_code: str) -> bytes:
    """Rewrite the first operator into a custom op (what an unknown op or an
    Edge TPU-compiled model looks like to a stock runtime)."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as s

    model = s.ModelT.InitFromObj(s.Model.GetRootAsModel(data, 0))
    code = s.OperatorCodeT()
    code.builtinCode = s.BuiltinOperator.CUSTOM
    code.deprecatedBuiltinCode = s.BuiltinOperator.CUSTOM
    code.customCode = custom_code
    code.version = 1
    model.operatorCodes.append(code)
    op = model.subgraphs[0].operators[0]
    op.opcodeIndex = len(model.operatorCodes) - 1
    op.builtinOptionsType = 0
    op.builtinOptions = None
    op.customOptions = [0]
    b = flatbuffers.Builder(1024)
    b.Finish(model.Pack(b), file_identifier=b"TFL3")
    return bytes(b.Output())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "tests" / "data" / "models"))
    ap.add_argument("--only", action="append", default=[], metavar="NAME",
                    help="Write only these files (repeatable), leaving the others untouched.")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tf = _tf()
    model = build_keras(tf)
    files = {
        "float.tflite": convert(tf, model),
        "int8_float_io.tflite": convert(tf, model, "float"),
        "int8_io.tflite": convert(tf, model, "int8"),
        "uint8_io.tflite": convert(tf, model, "uint8"),
        "two_outputs.tflite": convert(tf, build_keras(tf, two_outputs=True)),
        # The layout tflite-runtime 2.14 segfaults on under ARM; edgepipe.device.runtime refuses it there.
        "int8_no_bias.tflite": convert(tf, build_keras(tf, bias=False), "int8"),
    }
    files["custom_op.tflite"] = with_custom_first_op(files["float.tflite"], "EdgepipeTestOp")
    files["edgetpu_like.tflite"] = with_custom_first_op(files["float.tflite"], "edgetpu-custom-op")
    files["truncated.tflite"] = files["float.tflite"][: len(files["float.tflite"]) // 2]
    files["not_a_model.tflite"] = b"this is not a TFLite model\n"
    for name, data in files.items():
        if args.only and name not in args.only:
            continue
        (out / name).write_bytes(data)
        print(f"{name:24s} {len(data):7d} bytes")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    sys.exit(main())
