"""Bias correction of an int8 model: remove the mean shift weight rounding adds to each conv/FC output channel.

Rounding a layer's weights to int8 moves the *mean* of each output channel
(the rounding errors of a channel's weights do not cancel against an input
whose mean is not zero). Depthwise layers, with 9 weights per channel,
suffer most. With the float weights W, the int8 weights' values Wq and the
mean E[x] of each input channel over the calibration images (from the float
model), each layer's own shift is ``sum((Wq - W) * E[x])`` per output channel
(Nagel et al., "Data-Free Quantization", empirical variant); it is
subtracted from that channel's int32 bias, at no cost at run time. Only each
layer's own weight error is removed, so corrections do not add up along the
network. Zero padding at the borders is ignored (a small error at the edges).
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
    """Tensor name -> mean over images and positions of each channel (float model)."""
    with captured_output():
        interp = tf.lite.Interpreter(model_content=model, experimental_preserve_all_tensors=True)
        interp.allocate_tensors()
    details = {d["name"]: d["index"] for d in interp.get_tensor_details() if d["name"] in names}
    inp = interp.get_input_details()[0]
    sums: Dict[str, np.ndarray] = {}
    for xi in x:
        interp.set_tensor(inp["index"], xi[None].astype(inp["dtype"]))
        interp.invoke()
        for name, i in details.items():
            v = interp.get_tensor(i)
            sums[name] = sums.get(name, 0.0) + v.reshape(-1, v.shape[-1]).mean(axis=0, dtype=np.float64)
    return {k: v / len(x) for k, v in sums.items()}


def _layers(model) -> Dict[str, tuple]:
    """Weight tensor name -> (op code, op) for every conv/FC op with a bias."""
    g = model.subgraphs[0]
    out = {}
    for op in g.operators:
        oc = model.operatorCodes[op.opcodeIndex]
        code = max(oc.builtinCode, oc.deprecatedBuiltinCode)
        if code in CORRECTED_OPS.values() and len(op.inputs) >= 3 and op.inputs[2] >= 0:
            out[g.tensors[op.inputs[1]].name.decode()] = (code, op)
    return out


def _array(model, tensor, dtype) -> np.ndarray:
    data = model.buffers[tensor.buffer].data
    return np.frombuffer(np.asarray(data, dtype=np.uint8).tobytes(), dtype=dtype).reshape(tuple(tensor.shape))


def _shift(code: int, err: np.ndarray, mean_in: np.ndarray) -> np.ndarray:
    """Each output channel's mean shift from the weight error ``err`` (TFLite layouts) and input means."""
    if code == CORRECTED_OPS["DEPTHWISE_CONV_2D"]:  # [1, KH, KW, C * multiplier]
        mult = err.shape[-1] // mean_in.shape[0]
        return err.reshape(-1, err.shape[-1]).sum(axis=0) * np.repeat(mean_in, mult)
    return err.reshape(err.shape[0], -1, mean_in.shape[0]).sum(axis=1) @ mean_in  # [O, ..., I]


def correct_bias(int8_model: bytes, float_model: bytes, x: np.ndarray, strength: float = 1.0) -> bytes:
    """``int8_model`` with each conv/FC output channel's own weight-rounding shift removed from its bias.

    ``float_model`` is the float TFLite model with the same tensor names (the
    calibrated model of :mod:`edgepipe.pipeline.ptq`); ``x`` the calibration
    inputs. Layers without a float twin of the same weight name stay as they are.
    """
    from tensorflow.lite.tools import flatbuffer_utils as fu

    tf = import_tf()
    fm = fu.read_model_from_bytearray(bytearray(float_model))
    qm = fu.read_model_from_bytearray(bytearray(int8_model))
    fg, qg = fm.subgraphs[0], qm.subgraphs[0]
    f_layers, q_layers = _layers(fm), _layers(qm)
    pairs = [(w, f_layers[w][1], q_layers[w]) for w in q_layers if w in f_layers]
    if not pairs:
        raise BiasCorrectionError("no int8 conv/FC layer with a float twin and an int32 bias to correct")
    means = _channel_means(tf, float_model, x, {fg.tensors[fop.inputs[0]].name.decode() for _, fop, _ in pairs})
    for _, fop, (code, qop) in pairs:
        w_t, wq_t, b_t = fg.tensors[fop.inputs[1]], qg.tensors[qop.inputs[1]], qg.tensors[qop.inputs[2]]
        mean_in = means.get(fg.tensors[fop.inputs[0]].name.decode())
        if wq_t.type != 9 or b_t.type != 2 or mean_in is None or fm.buffers[w_t.buffer].data is None:
            continue  # 9: INT8, 2: INT32
        w = _array(fm, w_t, np.float32)
        axis = wq_t.quantization.quantizedDimension or 0
        scale = np.asarray(wq_t.quantization.scale, np.float64)
        shape = [1] * w.ndim
        shape[axis] = -1
        err = _array(qm, wq_t, np.int8) * scale.reshape(shape if scale.size > 1 else [1] * w.ndim) - w
        bias = _array(qm, b_t, np.int32).astype(np.int64)
        shift = _shift(code, err, mean_in) * strength
        if shift.shape != bias.shape:
            continue
        bias -= np.round(shift / np.asarray(b_t.quantization.scale, np.float64)).astype(np.int64)
        qm.buffers[b_t.buffer].data = np.frombuffer(
            np.clip(bias, -2**31, 2**31 - 1).astype(np.int32).tobytes(), dtype=np.uint8)
    return bytes(fu.convert_object_to_bytearray(qm))


__all__ = ["BiasCorrectionError", "correct_bias"]
