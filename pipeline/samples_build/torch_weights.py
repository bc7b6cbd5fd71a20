"""Read PyTorch ``.pth`` state dicts into numpy arrays, without torch.

Two on-disk formats exist and both are handled:

- zip (``torch.save`` since 1.6): ``<root>/data.pkl`` is a pickle whose tensors
  refer, by persistent id ``('storage', StorageType, key, location, numel)``, to raw
  little-endian storages in ``<root>/data/<key>``.
- legacy (before 1.6; torchvision's older checkpoints such as
  ``mobilenet_v2-b0353104.pth``): a stream of pickles -- magic number, protocol
  version, system info, the object itself (persistent ids
  ``('storage', StorageType, key, location, numel, view)``), the list of storage
  keys -- followed by each storage as an int64 element count and its raw bytes.

Unpickling runs no code from the file: a restricted ``Unpickler`` resolves only
the handful of globals a state dict needs and refuses anything else.
"""
from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import zipfile
from typing import Any, Union

import numpy as np
from edgepipe.device.errors import EdgepipeError

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001

_STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "BFloat16Storage": "bfloat16",  # no numpy dtype: widened to float32 below
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
    "UntypedStorage": np.uint8,
}


class TorchWeightsError(EdgepipeError, ValueError):
    """A file that is not a readable PyTorch state dict; one-line message."""


class _StorageType:
    """Stand-in for ``torch.FloatStorage`` etc.: only its element type matters."""

    def __init__(self, name: str):
        self.name = name
        self.dtype = _STORAGE_DTYPES[name]

    @property
    def itemsize(self) -> int:
        return 2 if self.dtype == "bfloat16" else np.dtype(self.dtype).itemsize


class _Storage:
    """A flat storage whose bytes may arrive after the pickle (legacy format)."""

    def __init__(self, stype: _StorageType, key: str, numel: int):
        self.stype, self.key, self.numel = stype, key, numel
        self.array: Union[np.ndarray, None] = None
        self.view: Union[tuple, None] = None  # (root storage, element offset, size)

    def set_bytes(self, raw: bytes) -> None:
        if self.stype.dtype == "bfloat16":
            bits = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
            self.array = bits.view(np.float32)
        else:
            self.array = np.frombuffer(raw, dtype=np.dtype(self.stype.dtype).newbyteorder("<"))

    def data(self) -> np.ndarray:
        if self.view is not None:
            root, offset, size = self.view
            return root.data()[offset:offset + size]
        if self.array is None:
            raise TorchWeightsError(f"storage {self.key} has no data")
        return self.array


class _TensorRef:
    """A tensor waiting for its storage's bytes; materialised after loading."""

    def __init__(self, storage: _Storage, offset: int, size: tuple, stride: tuple):
        self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)

    def materialize(self) -> np.ndarray:
        flat = self.storage.data()
        if not self.size:
            return np.array(flat[self.offset]).astype(flat.dtype.newbyteorder("="))
        extent = self.offset + 1 + sum((n - 1) * s for n, s in zip(self.size, self.stride) if n > 0)
        if any(n == 0 for n in self.size):
            return np.zeros(self.size, dtype=flat.dtype.newbyteorder("="))
        if extent > flat.size:
            raise TorchWeightsError(f"tensor of size {self.size} overruns storage {self.storage.key}")
        view = np.lib.stride_tricks.as_strided(
            flat[self.offset:], shape=self.size,
            strides=tuple(s * flat.itemsize for s in self.stride), writeable=False)
        return np.ascontiguousarray(view).astype(flat.dtype.newbyteorder("="), copy=False)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
    return _TensorRef(storage, storage_offset, size, stride)


def _rebuild_tensor(storage, storage_offset, size, stride):
    return _TensorRef(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
    return data


def _rebuild_parameter_with_state(data, requires_grad=False, backward_hooks=None, state=None):
    return data


_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter_with_state,
}


class _Unpickler(pickle.Unpickler):
    """Resolves only state-dict globals; storages come from ``storages`` by key."""

    def __init__(self, file, storages: dict, legacy: bool):
        super().__init__(file, encoding="latin1" if legacy else "ASCII")
        self.storages = storages
        self.legacy = legacy

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module in ("torch", "torch.storage") and name in _STORAGE_DTYPES:
            return _StorageType(name)
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name} from a weights file")

    def persistent_load(self, pid: Any) -> Any:
        if not isinstance(pid, tuple) or len(pid) < 5 or pid[0] != "storage":
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r:.60}")
        stype, key, numel = pid[1], str(pid[2]), int(pid[4])  # pid[3] is the device, e.g. "cpu"
        if not isinstance(stype, _StorageType):
            raise pickle.UnpicklingError("persistent id without a storage type")
        storage = self.storages.get(key)
        if storage is None:
            storage = self.storages[key] = _Storage(stype, key, numel)
        if self.legacy and len(pid) > 5 and pid[5] is not None:
            view_key, offset, size = pid[5]
            view = self.storages.get(str(view_key))
            if view is None:
                view = self.storages[str(view_key)] = _Storage(stype, str(view_key), int(size))
                view.view = (storage, int(offset), int(size))
            return view
        return storage


def _materialize(obj: Any) -> Any:
    if isinstance(obj, _TensorRef):
        return obj.materialize()
    if isinstance(obj, dict):
        return type(obj)((k, _materialize(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(_materialize(v) for v in obj)
    return obj


def _load_zip(zf: zipfile.ZipFile) -> Any:
    pkls = [n for n in zf.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
    if len(pkls) != 1:
        raise TorchWeightsError("zip has no single data.pkl: not a torch.save file")
    root = pkls[0][: -len("data.pkl")]
    names = set(zf.namelist())
    if f"{root}byteorder" in names and zf.read(f"{root}byteorder").strip() != b"little":
        raise TorchWeightsError("big-endian torch files are not supported")
    storages: dict = {}
    obj = _Unpickler(io.BytesIO(zf.read(pkls[0])), storages, legacy=False).load()
    for key, storage in storages.items():
        member = f"{root}data/{key}"
        if member not in names:
            raise TorchWeightsError(f"storage {key} missing from the archive")
        raw = zf.read(member)
        if len(raw) < storage.numel * storage.stype.itemsize:
            raise TorchWeightsError(f"storage {key} is truncated")
        storage.set_bytes(raw[: storage.numel * storage.stype.itemsize])
    return obj


def _load_legacy(f: io.BufferedIOBase) -> Any:
    def plain(stream):
        return _Unpickler(stream, {}, legacy=True).load()

    try:
        magic = plain(f)
    except Exception:
        raise TorchWeightsError("neither a zip nor a legacy torch file") from None
    if magic != LEGACY_MAGIC:
        raise TorchWeightsError("bad magic number: not a torch file")
    if plain(f) != LEGACY_PROTOCOL:
        raise TorchWeightsError("unsupported legacy torch protocol version")
    sys_info = plain(f)
    if isinstance(sys_info, dict) and not sys_info.get("little_endian", True):
        raise TorchWeightsError("big-endian torch files are not supported")
    storages: dict = {}
    obj = _Unpickler(f, storages, legacy=True).load()
    keys = plain(f)
    for key in keys:
        storage = storages.get(str(key))
        if storage is None:
            raise TorchWeightsError(f"storage {key} listed but never used")
        head = f.read(8)
        if len(head) != 8:
            raise TorchWeightsError("file truncated in storage data")
        (numel,) = struct.unpack("<q", head)
        raw = f.read(numel * storage.stype.itemsize)
        if len(raw) != numel * storage.stype.itemsize:
            raise TorchWeightsError(f"storage {key} is truncated")
        storage.set_bytes(raw)
    return obj


def load(source: Union[bytes, os.PathLike, str]) -> Any:
    """Unpickle a ``torch.save`` file (zip or legacy) with tensors as numpy arrays."""
    data = source if isinstance(source, (bytes, bytearray)) else open(source, "rb").read()
    buf = io.BytesIO(data)
    try:
        if zipfile.is_zipfile(buf):
            with zipfile.ZipFile(buf) as zf:
                obj = _load_zip(zf)
        else:
            buf.seek(0)
            obj = _load_legacy(buf)
        return _materialize(obj)
    except pickle.UnpicklingError as exc:
        raise TorchWeightsError(str(exc)) from None


def load_state_dict(source: Union[bytes, os.PathLike, str]) -> "collections.OrderedDict[str, np.ndarray]":
    """A state dict (name -> numpy array), unwrapping a ``{'state_dict': ...}`` checkpoint."""
    obj = load(source)
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, np.ndarray) for v in obj.values()):
        raise TorchWeightsError("file does not hold a state dict of tensors")
    return collections.OrderedDict(obj)
