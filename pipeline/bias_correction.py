"""Empirical bias correction of an int8 model: remove the mean shift int8 adds to each conv/FC output channel.

Rounding the weights of a layer to int8 moves the *mean* of each of its
output channels a little (the rounding errors of a channel's weights do not
cancel against a non-zero-mean input). Depthwise layers, with only 9 weights
per channel, suffer most. Running the float model and the int8 model on the
calibration images gives each channel's mean shift, and subtracting it from
that channel's int32 bias removes it at no cost at run time.

The shift of a layer includes what the layers before it passed on, and all
layers are corrected from one pass, so the correction is damped (``strength``
below 1 keeps a layer from over-correcting what an earlier one already fixed).
"""
from __future__ import annotations

from typing import Dict

import numpy as np

from edgepipe.device.errors import EdgepipeError
from edgepipe.pipeline.tfenv import captured_output, import_tf

CORRECTED_OPS = {"CONV_2D": 3, "DEPTHWISE_CONV_2D": 4, "FULLY_CONNECTED": 9}


class BiasCorrectionError(EdgepipeError, RuntimeError):
    """Bias correction could not run; one-line reason."""


def _channel_means(tf, model: bytes, x: np.ndarray, names: set) -> Dict[str, np.ndarray]:
    """Tensor name -> mean over images and positions of each output channel (dequantized when integer)."""
    with captured_output():
        interp = tf.lite.Interpreter(model_content=model, experimental_preserve_all_tensors=True)
        interp.allocate_tensors()
    details = {d["name"]: d for d in interp.get_tensor_details() if d["name"] in names}
    inp = interp.get_input_details()[0]
    sums: Dict[str, np.ndarray] = {}
    for xi in x:
        interp.set_tensor(inp["index"], xi[None].astype(inp["dtype"]))
        interp.invoke()
        for name, d in details.items():
            v = interp.get_tensor(d["index"])
            if v.dtype != np.float32:
                scale, zp = d["quantization"]
                v = (v.astype(np.float32) - zp) * scale
            m = v.reshape(-1, v.shape[-1]).mean(axis=0)
            sums[name] = sums.get(name, 0.0) + m
    return {k: v / len(x) for k, v in sums.items()}


def correct_bias(int8_model: bytes, float_model: bytes, x: np.ndarray, strength: float = 0.5) -> bytes:
    """``int8_model`` with each conv/FC output channel's mean shift (vs ``float_model`` on ``x``) removed.

    ``float_model`` is the float TFLite model with the same tensor names (the
    calibrated model of :mod:`edgepipe.pipeline.ptq`). Layers whose output has
    no float twin of the same name are left alone.
    """
    from tensorflow.lite.tools import flatbuffer_utils as fu

    tf = import_tf()
    m = fu.read_model_from_bytearray(bytearray(int8_model))
    g = m.subgraphs[0]
    targets = []
    for op in g.operators:
        oc = m.operatorCodes[op.opcodeIndex]
        code = max(oc.builtinCode, oc.deprecatedBuiltinCode)
        if code not in CORRECTED_OPS.values() or len(op.inputs) < 3 or op.inputs[2] < 0:
            continue
        bias = g.tensors[op.inputs[2]]
        if bias.type != 2 or bias.quantization is None or bias.quantization.scale is None:  # 2: INT32
            continue
        targets.append((g.tensors[op.outputs[0]].name.decode(), bias))
    if not targets:
        raise BiasCorrectionError("no int8 conv/FC layer with an int32 bias to correct")
    names = {n for n, _ in targets}
    q_means = _channel_means(tf, int8_model, x, names)
    f_means = _channel_means(tf, float_model, x, names)
    for name, bias in targets:
        if name not in q_means or name not in f_means or q_means[name].shape != f_means[name].shape:
            continue
        shift = (q_means[name] - f_means[name]) * strength
        buf = m.buffers[bias.buffer]
        b = np.frombuffer(np.asarray(buf.data, dtype=np.uint8).tobytes(), dtype=np.int32).copy()
        scale = np.asarray(bias.quantization.scale, dtype=np.float64)
        if b.shape != shift.shape:
            continue
        b -= np.round(shift / scale).astype(np.int32)
        buf.data = np.frombuffer(b.tobytes(), dtype=np.uint8)
    return bytes(fu.convert_object_to_bytearray(m))


__all__ = ["BiasCorrectionError", "correct_bias"]
