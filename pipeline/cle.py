"""Cross-layer equalization (Nagel et al. 2019, "Data-Free Quantization"), for depthwise networks.

A depthwise layer has one filter per channel, and after BatchNorm folding
those filters' ranges differ by orders of magnitude; with one int8 scale per
tensor (or per activation), the small channels round to nothing. When layer 1
feeds layer 2 through a positively homogeneous function f (f(x/s) = f(x)/s
for s > 0: ReLU, identity, zero padding, max/average pooling), dividing
layer 1's output channel i by s_i and multiplying layer 2's input channel i
by s_i leaves the network's function unchanged. With
s_i = sqrt(r1_i / r2_i), r the channel's weight range after BatchNorm
folding, both channels end with the range sqrt(r1_i * r2_i). Layers in two
pairs (conv -> depthwise -> conv) are revisited until the scales stop moving.

ReLU6 is not positively homogeneous (its clip at 6 would move). As in the
paper, an equalized pair's ReLU6 becomes a ReLU: a change to the float model
itself, so callers measure the equalized model against the original one.

Only Keras functional (or built Sequential) models, channels-last, whose
layers are each called once; anything else passes through unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np

WEIGHTED = ("Conv2D", "DepthwiseConv2D", "Dense")
# Channel-wise and commuting with a positive per-channel scale.
PASS_THROUGH = ("ZeroPadding2D", "MaxPooling2D", "AveragePooling2D", "GlobalAveragePooling2D", "Dropout")
_SCALE_LIMIT = 1e4  # a channel whose two ranges differ more than 1e8 is left as it is


@dataclass(frozen=True)
class Pair:
    """One equalized pair of layers and its weight ranges before and after.

    ``precision``: the paper's objective, mean over channels of
    (r1_i / max r1) * (r2_i / max r2): how much of a per-tensor int8 grid the
    typical channel uses in both layers (1.0: all channels alike).
    ``mismatch``: max over channels of |ln(r1_i / r2_i)| (0.0: equalized).
    """

    first: str
    second: str
    channels: int
    precision_before: float
    precision_after: float
    mismatch_before: float
    mismatch_after: float


@dataclass(frozen=True)
class Equalization:
    """What :func:`equalize` changed."""

    pairs: Tuple[Pair, ...]
    relu6_replaced: Tuple[str, ...]  # activation layers now ReLU instead of ReLU6
    iterations: int
    converged: bool

    def to_dict(self) -> dict:
        return {"pairs": len(self.pairs), "relu6_replaced": len(self.relu6_replaced),
                "iterations": self.iterations, "converged": self.converged,
                "mean_precision_before": _mean([p.precision_before for p in self.pairs]),
                "mean_precision_after": _mean([p.precision_after for p in self.pairs])}


def _mean(xs) -> Optional[float]:
    return round(float(np.mean(xs)), 4) if xs else None


@dataclass(frozen=True)
class _Chain:
    first: str
    bn: Optional[str]
    relu6: Tuple[str, ...]
    second: str
    second_bn: Optional[str]  # the BatchNorm the converter folds into layer 2 (its ranges include it)


def equalize(model, *, replace_relu6: bool = True, max_iterations: int = 50,
             tolerance: float = 1e-4) -> Tuple[object, Equalization]:
    """An equalized copy of the Keras ``model`` and what was done; ``model`` itself is never changed.

    Without an equalizable pair the same ``model`` object comes back. With
    ``replace_relu6=False`` pairs joined by a ReLU6 are skipped instead.
    """
    chains = find_pairs(model, replace_relu6=replace_relu6)
    if not chains:
        return model, Equalization((), (), 0, True)
    weights = {n: [np.array(w, np.float64) for w in model.get_layer(n).get_weights()]
               for c in chains for n in (c.first, c.bn, c.second, c.second_bn) if n}
    layers = {n: model.get_layer(n) for n in weights}
    before = [_ranges(c, layers, weights) for c in chains]
    iterations, converged = 0, False
    while iterations < max_iterations and not converged:
        iterations += 1
        moved = max(_equalize_pair(c, layers, weights) for c in chains)
        converged = moved < tolerance
    after = [_ranges(c, layers, weights) for c in chains]
    relu6 = tuple(sorted({n for c in chains for n in c.relu6}))
    new = _rebuild(model, set(relu6))
    for n, ws in weights.items():
        new.get_layer(n).set_weights([w.astype(np.float32) for w in ws])
    pairs = tuple(Pair(c.first, c.second, len(b[0]), _precision(*b), _precision(*a), _mismatch(*b),
                       _mismatch(*a)) for c, b, a in zip(chains, before, after))
    return new, Equalization(pairs, relu6, iterations, converged)


def find_pairs(model, *, replace_relu6: bool = True) -> List[_Chain]:
    """The equalizable (layer 1, layer 2) chains of ``model``, in layer order."""
    graph = _Graph.of(model)
    if graph is None:
        return []
    return [c for c in (graph.chain_from(layer, replace_relu6) for layer in model.layers) if c is not None]


class _Graph:
    """Producers and consumers of each layer within one model."""

    def __init__(self, model, consumers: Dict[str, List[str]], outputs: set):
        self.model, self.consumers, self.outputs = model, consumers, outputs

    @classmethod
    def of(cls, model) -> Optional["_Graph"]:
        consumers: Dict[str, List[str]] = {}
        try:
            for layer in model.layers:
                for node in layer._inbound_nodes:
                    for t in node.input_tensors:
                        consumers.setdefault(t._keras_history.operation.name, []).append(layer.name)
            outputs = {t._keras_history.operation.name for t in model.outputs}
        except (AttributeError, TypeError, ValueError):  # a subclassed model has no graph to walk
            return None
        return cls(model, consumers, outputs)

    def _single_consumer(self, name: str):
        """The one layer that reads ``name``'s output, or None (several, none, or a model output)."""
        users = self.consumers.get(name, [])
        if len(users) != 1 or name in self.outputs:
            return None
        layer = self.model.get_layer(users[0])
        return layer if _called_once(layer) else None

    def chain_from(self, first, replace_relu6: bool) -> Optional[_Chain]:
        if type(first).__name__ not in WEIGHTED or not _called_once(first) or not _weighted_ok(first):
            return None
        bn, relu6, name = None, [], first.name
        fused = _activation_kind(first)
        while True:
            nxt = self._single_consumer(name)
            if nxt is None:
                return None
            kind = type(nxt).__name__
            if kind in WEIGHTED:
                if fused != "identity" and (fused != "relu" or bn is not None):
                    return None  # BN after a non-linearity cannot take the scale
                if not _weighted_ok(nxt):
                    return None
                after = self._single_consumer(nxt.name)
                bn2 = after.name if after is not None and type(after).__name__ == "BatchNormalization" \
                    and _bn_ok(after) and _activation_kind(nxt) == "identity" else None
                return _Chain(first.name, bn, tuple(relu6), nxt.name, bn2)
            if kind == "BatchNormalization" and name == first.name and _bn_ok(nxt):
                bn = nxt.name
            elif kind in PASS_THROUGH and _channels_last(nxt):
                pass
            else:
                act = _activation_kind(nxt)
                if act == "relu6" and replace_relu6:
                    relu6.append(nxt.name)
                elif act not in ("identity", "relu"):
                    return None
            name = nxt.name


def _called_once(layer) -> bool:
    return len(getattr(layer, "_inbound_nodes", ())) == 1 and len(layer._inbound_nodes[0].input_tensors) == 1


def _channels_last(layer) -> bool:
    return getattr(layer, "data_format", "channels_last") == "channels_last"


def _weighted_ok(layer) -> bool:
    return _channels_last(layer) and getattr(layer, "groups", 1) == 1 and bool(layer.get_weights())


def _bn_ok(layer) -> bool:
    return bool(layer.scale) and tuple(np.atleast_1d(layer.axis)) in ((-1,), (len(layer.input.shape) - 1,))


def _activation_kind(layer) -> Optional[str]:
    """identity | relu | relu6 (homogeneous or convertible), or None for anything else."""
    kind = type(layer).__name__
    if kind == "ReLU":
        if float(layer.threshold) != 0.0 or float(layer.negative_slope) < 0.0:
            return None
        return "relu" if layer.max_value is None else ("relu6" if float(layer.max_value) == 6.0 else None)
    if kind == "LeakyReLU":
        return "relu"
    act = getattr(layer, "activation", None)
    if act is None or kind not in ("Activation",) + WEIGHTED:
        return None
    name = getattr(act, "__name__", "")
    return {"linear": "identity", "relu": "relu", "relu6": "relu6"}.get(name)


def _bn_factor(layer, ws) -> np.ndarray:
    """Per-channel multiplier that BatchNorm folding puts on the preceding kernel: gamma / sqrt(var + eps)."""
    gamma, var = ws[0], ws[-1]
    return gamma / np.sqrt(var + layer.epsilon)


def _out_ranges(layer, ws, bn=None, bn_ws=None) -> np.ndarray:
    """Per-output-channel range of ``layer``'s kernel after folding the following BatchNorm (if any)."""
    k = ws[0]
    r = np.abs(k.reshape(-1, k.shape[-2] * k.shape[-1]) if type(layer).__name__ == "DepthwiseConv2D"
               else k.reshape(-1, k.shape[-1])).max(axis=0)
    return r * np.abs(_bn_factor(bn, bn_ws)) if bn is not None else r


def _in_ranges(layer, ws, following_bn=None, bn_ws=None) -> np.ndarray:
    """Per-input-channel range of ``layer``'s kernel (its own following BatchNorm folded in when known)."""
    k = ws[0]
    kind = type(layer).__name__
    if following_bn is not None:
        k = k * _bn_factor(following_bn, bn_ws).reshape((k.shape[-2], k.shape[-1]) if kind == "DepthwiseConv2D"
                                                      else (-1,))
    axes = tuple(i for i in range(k.ndim) if i != k.ndim - 2)  # Dense (in, out) and HWIO/HWCM alike
    return np.abs(k).max(axis=axes)


def _ranges(chain: _Chain, layers, weights) -> Tuple[np.ndarray, np.ndarray]:
    """(layer 1's output-channel ranges, layer 2's input-channel ranges), each with its BatchNorm folded."""
    r1 = _out_ranges(layers[chain.first], weights[chain.first], layers.get(chain.bn), weights.get(chain.bn))
    r2 = _in_ranges(layers[chain.second], weights[chain.second], layers.get(chain.second_bn),
                    weights.get(chain.second_bn))
    return r1, r2


def _equalize_pair(chain: _Chain, layers, weights) -> float:
    """Apply one round of scales to the pair; returns max |ln s_i| (0 when already equal)."""
    r1, r2 = _ranges(chain, layers, weights)
    ok = (r1 > 0) & (r2 > 0) & np.isfinite(r1) & np.isfinite(r2)
    s = np.ones_like(r1)
    s[ok] = np.sqrt(r1[ok] / r2[ok])
    s[(s > _SCALE_LIMIT) | (s < 1.0 / _SCALE_LIMIT)] = 1.0
    if chain.bn:  # BN's output scales with gamma and beta (no beta with center=False)
        bn = weights[chain.bn]
        bn[0] /= s
        if layers[chain.bn].center:
            bn[1] /= s
    else:
        first = weights[chain.first]
        shape = first[0].shape  # output channel c*M+m of a depthwise kernel (H, W, C, M) is its flat last pair
        first[0] = (first[0].reshape(shape[:-2] + (-1,)) / s).reshape(shape) \
            if type(layers[chain.first]).__name__ == "DepthwiseConv2D" else first[0] / s
        if len(first) > 1:
            first[1] /= s
    # Input channels sit on axis -2 of every kernel: Dense (in, out), Conv2D HWIO, DepthwiseConv2D HWCM.
    weights[chain.second][0] *= s.reshape((-1, 1))
    return float(np.max(np.abs(np.log(s)))) if s.size else 0.0


def _precision(r1: np.ndarray, r2: np.ndarray) -> float:
    if not r1.size or r1.max() <= 0 or r2.max() <= 0:
        return 1.0
    return float(np.mean((r1 / r1.max()) * (r2 / r2.max())))


def _mismatch(r1: np.ndarray, r2: np.ndarray) -> float:
    ok = (r1 > 0) & (r2 > 0)
    return float(np.max(np.abs(np.log(r1[ok] / r2[ok])))) if ok.any() else 0.0


def _rebuild(model, relu6: set):
    """A structural copy of ``model`` (fresh weights copied over) with the ``relu6`` layers as plain ReLU."""
    import keras

    def clone(layer):
        if layer.name in relu6:
            if type(layer).__name__ == "ReLU":
                return keras.layers.ReLU(negative_slope=float(layer.negative_slope), name=layer.name,
                                         dtype=layer.dtype_policy)
            return keras.layers.Activation("relu", name=layer.name, dtype=layer.dtype_policy)
        return layer.__class__.from_config(layer.get_config())

    new = keras.models.clone_model(model, clone_function=clone)
    for layer in model.layers:
        if layer.weights:
            new.get_layer(layer.name).set_weights(layer.get_weights())
    return new


def float_cost(equalized, summary: Equalization, x: np.ndarray, ref: np.ndarray) -> dict:
    """``summary.to_dict()`` plus what equalizing (its ReLU6 -> ReLU) costs the float model itself: top-1
    agreement and SNR of the ``equalized`` Keras model on ``x`` against ``ref``, the ORIGINAL model's outputs."""
    from edgepipe.pipeline import metrics
    from edgepipe.pipeline.model_run import float_outputs

    if not summary.pairs:  # the model came back unchanged
        return {**summary.to_dict(), "float_agreement": 1.0, "float_snr_db": None}
    out = np.concatenate([float_outputs(equalized, x[i:i + 32]) for i in range(0, len(x), 32)])  # bounded memory
    return {**summary.to_dict(), "float_agreement": metrics.top1_agreement(out, ref),
            "float_snr_db": round(metrics.snr_db(out, ref), 2)}


__all__ = ["Equalization", "Pair", "equalize", "find_pairs", "float_cost"]
