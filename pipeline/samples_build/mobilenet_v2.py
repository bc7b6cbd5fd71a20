"""Keras MobileNetV2 that matches torchvision's ``mobilenet_v2`` layer for layer.

Why not ``keras.applications.MobileNetV2``: its weights would have to be fetched
from a hub at run time, and its layout differs from torchvision's (TF "same"
padding is asymmetric on stride 2, BatchNorm eps 1e-3). Here every torch layer
has a Keras twin named after the torch key, so the state dict maps by name:

- 3x3 convs: ``ZeroPadding2D(1)`` + ``'valid'`` conv (torch pads symmetrically),
- BatchNorm ``epsilon=1e-5`` (torch's default), ReLU6,
- weights transposed: conv OIHW -> HWIO, depthwise (C,1,H,W) -> (H,W,C,1),
  linear (out,in) -> (in,out).

Input (224, 224, 3) float with torchvision's normalisation (edgepipe preset
``imagenet``); output 1000 softmax probabilities in torchvision's class order.
TensorFlow/Keras is imported inside the functions (no import-time side effects).
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Optional

import numpy as np

from edgepipe.pipeline.samples import SampleDataError

# torchvision's inverted-residual settings: expansion t, channels c, repeats n, stride s.
INVERTED_RESIDUAL_SETTING = (
    (1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
    (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1),
)
IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)
BN_EPSILON = 1e-5

# Photos in sample_data/images with an unambiguous subject: the ImageNet class
# indices any sane classifier puts in its top 5.
KNOWN_PHOTOS = {
    "orange.jpg": {950},                 # orange
    "apple.jpg": {948, 950, 951, 952, 957},  # Granny Smith, orange, lemon, fig, pomegranate
    "baboon.jpg": {372, 373, 365},       # baboon / macaque / orangutan
    "butterfly.jpg": set(range(320, 327)),  # admiral .. lycaenid (butterflies)
    "squirrel_cls.jpg": {335, 336},      # fox squirrel / marmot
    "messi5.jpg": {805},                 # soccer ball
    "chicky_512.jpg": set(range(151, 269)),  # any dog breed
    "hfs_000.jpg": set(range(7, 25)),    # any small bird (cock .. great grey owl)
}


def _key(name: str) -> str:
    return name.replace(".", "_")


class _Ported:
    """Keras layers named after torchvision's modules, collecting the torch weights for each in Keras order."""

    def __init__(self, layers, state_dict: Optional[Mapping[str, np.ndarray]]):
        self.L, self.state = layers, state_dict
        self.weights: dict = {}  # keras layer name -> list of arrays in Keras order

    def conv(self, x, torch_name, filters, kernel, stride=1, depthwise=False):
        L = self.L
        if kernel > 1:
            x = L.ZeroPadding2D((kernel - 1) // 2, name=_key(torch_name) + "_pad")(x)
        if depthwise:
            layer = L.DepthwiseConv2D(kernel, strides=stride, padding="valid", use_bias=False,
                                      name=_key(torch_name))
        else:
            layer = L.Conv2D(filters, kernel, strides=stride, padding="valid", use_bias=False,
                             name=_key(torch_name))
        if self.state is not None:
            w = np.asarray(self.state[torch_name + ".weight"], np.float32)
            # OIHW -> HWIO; depthwise (C,1,H,W) -> (H,W,C,1)
            w = w.transpose(2, 3, 0, 1) if depthwise else w.transpose(2, 3, 1, 0)
            self.weights[layer.name] = [w]
        return layer(x)

    def bn(self, x, torch_name):
        layer = self.L.BatchNormalization(epsilon=BN_EPSILON, momentum=0.9, name=_key(torch_name))
        if self.state is not None:
            self.weights[layer.name] = [np.asarray(self.state[f"{torch_name}.{k}"], np.float32)
                                        for k in ("weight", "bias", "running_mean", "running_var")]
        return layer(x)

    def conv_bn_relu(self, x, prefix, filters, kernel, stride=1, depthwise=False):
        x = self.conv(x, prefix + ".0", filters, kernel, stride, depthwise)
        x = self.bn(x, prefix + ".1")
        return self.L.ReLU(6.0, name=_key(prefix) + "_relu6")(x)

    def inverted_residual(self, x, index: int, channels: int, t: int, c: int, stride: int):
        """torchvision's InvertedResidual ``features.{index}``: expand, depthwise, project (+ skip)."""
        p = f"features.{index}.conv"
        hidden = channels * t
        y, j = x, 0
        if t != 1:
            y = self.conv_bn_relu(y, f"{p}.0", hidden, 1)
            j = 1
        y = self.conv_bn_relu(y, f"{p}.{j}", hidden, 3, stride, depthwise=True)
        y = self.conv(y, f"{p}.{j + 1}", c, 1)
        y = self.bn(y, f"{p}.{j + 2}")
        if stride == 1 and channels == c:
            y = self.L.Add(name=f"features_{index}_add")([x, y])
        return y


def build_mobilenet_v2(state_dict: Optional[Mapping[str, np.ndarray]] = None,
                       num_classes: int = 1000, input_size: int = 224,
                       dropout: float = 0.2):
    """The Keras model; weights from a torchvision ``state_dict`` when given, else random."""
    import keras

    L = keras.layers
    net = _Ported(L, state_dict)
    inp = keras.Input((input_size, input_size, 3), name="input")
    x = net.conv_bn_relu(inp, "features.0", 32, 3, stride=2)
    channels, index = 32, 1
    for t, c, n, s in INVERTED_RESIDUAL_SETTING:
        for i in range(n):
            x = net.inverted_residual(x, index, channels, t, c, s if i == 0 else 1)
            channels, index = c, index + 1
    x = net.conv_bn_relu(x, f"features.{index}", 1280, 1)
    x = L.GlobalAveragePooling2D(name="pool")(x)
    x = L.Dropout(dropout, name="classifier_0")(x)
    dense = L.Dense(num_classes, name="classifier_1")
    x = dense(x)
    out = L.Softmax(name="probabilities")(x)
    model = keras.Model(inp, out, name="mobilenet_v2")

    if state_dict is not None:
        net.weights[dense.name] = [np.asarray(state_dict["classifier.1.weight"], np.float32).T,
                                   np.asarray(state_dict["classifier.1.bias"], np.float32)]
        _set_weights(model, net.weights, state_dict)
    return model


def _set_weights(model, weights: dict, state_dict: Mapping[str, np.ndarray]) -> None:
    """Load the mapped arrays, refusing a state dict that does not fit layer for layer."""
    for name, arrays in weights.items():
        layer = model.get_layer(name)
        expected = [tuple(w.shape) for w in layer.get_weights()]
        if expected != [a.shape for a in arrays]:
            raise SampleDataError(f"{name}: state dict shapes {[a.shape for a in arrays]} != {expected}")
        layer.set_weights(arrays)
    used = {k for k in state_dict if not k.endswith("num_batches_tracked")}
    mapped = sum(len(a) for a in weights.values())
    if mapped != len(used):
        raise SampleDataError(f"mapped {mapped} of {len(used)} tensors from the state dict")


def preprocess_photo(path: Path, size: int = 224, crop_fraction: float = 0.875) -> np.ndarray:
    """torchvision's eval transform (resize 256, centre crop 224, normalise) as float32 (H,W,3).

    Written out here, with PIL only, so the model check does not depend on the
    device preprocessing it is later compared against.
    """
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        w, h = im.size
        side = min(w, h) * crop_fraction
        left, top = (w - side) / 2, (h - side) / 2
        im = im.resize((size, size), Image.BILINEAR, box=(left, top, left + side, top + side))
        x = np.asarray(im, dtype=np.float32)
    return (x - np.array(IMAGENET_MEAN, np.float32)) / np.array(IMAGENET_STD, np.float32)


def top_k(model, paths, k: int = 5):
    """``[(path, [(class_index, probability), ...]), ...]`` for the given photos."""
    batch = np.stack([preprocess_photo(p) for p in paths])
    probs = np.asarray(model(batch, training=False))
    result = []
    for p, row in zip(paths, probs):
        order = np.argsort(row)[::-1][:k]
        result.append((Path(p), [(int(i), float(row[i])) for i in order]))
    return result


def check_known_photos(model, labels_path: Path, images_dir: Path) -> list:
    """Run the known photos; return one message per photo whose top 5 misses its class."""
    labels = Path(labels_path).read_text(encoding="utf-8").splitlines()
    paths = [Path(images_dir) / n for n in KNOWN_PHOTOS if (Path(images_dir) / n).is_file()]
    if not paths:
        return [f"no known photos found in {images_dir}"]
    failures = []
    for path, top in top_k(model, paths):
        got = {i for i, _ in top}
        if not got & KNOWN_PHOTOS[path.name]:
            failures.append(f"{path.name} -> {labels[top[0][0]]} ({top[0][1]:.2f})")
    return failures
