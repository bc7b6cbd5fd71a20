"""Delegate tables, discovery and error explanations for ``edgepipe.device.runtime``.

This module never imports a runtime: ``edgepipe.device.runtime`` passes in the
backend's ``load_delegate``. It turns native failures ("Failed to load
delegate from libedgetpu.so.1") into one-line reasons with a hint.
"""
from __future__ import annotations

import ctypes
import glob
import os
import re
import sys
import threading
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple
from edgepipe.device.errors import EdgepipeError


class RuntimeLoadError(EdgepipeError):
    """A model or delegate that cannot be loaded; the message is one actionable line."""


# Library names per platform, as published by the Coral / TFLite projects.
EDGETPU_LIBS = {
    "linux": ("libedgetpu.so.1", "libedgetpu.so"),
    "darwin": ("libedgetpu.1.dylib", "libedgetpu.dylib"),
    "win32": ("edgetpu.dll",),
}
GPU_LIBS = {
    "linux": ("libtensorflowlite_gpu_delegate.so", "libtensorflowlite_gpu_gl.so"),
    "darwin": ("libtensorflowlite_gpu_delegate.dylib", "libtensorflowlite_metal_delegate.dylib"),
    "win32": ("tensorflowlite_gpu_delegate.dll",),
}
LIB_DIRS = ("/usr/lib", "/usr/local/lib", "/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu",
            "/usr/lib/arm-linux-gnueabihf", "/opt/homebrew/lib", "/usr/local/opt/libedgetpu/lib")
# USB ids of the Coral USB Accelerator: before (1a6e:089a) and after (18d1:9302) its firmware loads.
EDGETPU_USB_IDS = (("1a6e", "089a"), ("18d1", "9302"))
EDGETPU_CUSTOM_OP = b"edgetpu-custom-op"


def _platform_key() -> str:
    return "linux" if sys.platform.startswith("linux") else sys.platform


def find_library(names: Tuple[str, ...]) -> Optional[str]:
    """First of ``names`` found on the loader path or in the usual lib dirs."""
    extra = os.environ.get("EDGEPIPE_DELEGATE_PATH", "")
    dirs = [d for d in extra.split(os.pathsep) if d] + list(LIB_DIRS)
    for name in names:
        for d in dirs:
            p = os.path.join(d, name)
            if os.path.exists(p):
                return p
    import ctypes.util  # runs ldconfig/gcc: only when the usual dirs had nothing

    for name in names:
        base = re.sub(r"^lib|\.(so.*|dylib|dll)$", "", name).split(".")[0]
        found = ctypes.util.find_library(base)
        if found:
            return found
    return None


def edgetpu_devices() -> List[str]:
    """Visible Edge TPUs as device strings (``usb:N`` / ``pci:N``); best effort, Linux only."""
    found: List[str] = []
    n = 0
    for d in sorted(glob.glob("/sys/bus/usb/devices/*")):
        try:
            with open(os.path.join(d, "idVendor")) as f:
                vid = f.read().strip()
            with open(os.path.join(d, "idProduct")) as f:
                pid = f.read().strip()
        except OSError:
            continue
        if (vid, pid) in EDGETPU_USB_IDS:
            found.append(f"usb:{n}")
            n += 1
    for i, _ in enumerate(sorted(glob.glob("/dev/apex_*"))):
        found.append(f"pci:{i}")
    return found


def find_delegates() -> Dict[str, dict]:
    """What accelerators this machine could use: ``{name: {available, library, ...}}``.

    ``cpu`` is always there (XNNPACK is built into every runtime we support).
    """
    key = _platform_key()
    tpu_lib = find_library(EDGETPU_LIBS.get(key, ()))
    gpu_lib = find_library(GPU_LIBS.get(key, ()))
    return {
        "cpu": {"available": True, "library": None, "note": "built-in kernels + XNNPACK"},
        "edgetpu": {"available": bool(tpu_lib), "library": tpu_lib, "devices": edgetpu_devices()},
        "gpu": {"available": bool(gpu_lib), "library": gpu_lib},
    }


@dataclass
class CpuFallback:
    """How much of the graph a delegate took; ``cpu_ops`` ran on the CPU kernels."""

    delegate: str
    total_ops: int
    delegated_ops: int
    cpu_ops: int
    cpu_op_names: Dict[str, int] = field(default_factory=dict)
    note: Optional[str] = None

    def to_dict(self) -> dict:
        return {"delegate": self.delegate, "total_ops": self.total_ops, "delegated_ops": self.delegated_ops,
                "cpu_ops": self.cpu_ops, "cpu_op_names": dict(self.cpu_op_names), "note": self.note}


@dataclass(frozen=True)
class DelegatePlan:
    """What ``--delegate`` asked for, resolved before anything is loaded."""

    kind: str  # cpu | edgetpu | gpu | external
    label: str  # what the report says
    library: Optional[str] = None
    candidates: Tuple[str, ...] = ()
    options: Dict[str, str] = field(default_factory=dict)


def parse_delegate(spec: Optional[str], *, edgetpu_device: Optional[str] = None,
                   options: Optional[dict] = None) -> DelegatePlan:
    """``cpu``, ``xnnpack``, ``edgetpu[:usb|:pci|:N|:usb:N]``, ``gpu`` or a library path."""
    s = (spec or "cpu").strip()
    opts = {str(k): str(v) for k, v in (options or {}).items()}
    low = s.lower()
    if low in ("cpu", "xnnpack"):
        return DelegatePlan("cpu", low, options=opts)
    if low == "edgetpu" or low.startswith("edgetpu:"):
        _edgetpu_device(edgetpu_device or (s.split(":", 1)[1] if ":" in s else None), opts)
        names = EDGETPU_LIBS.get(_platform_key(), ())
        return DelegatePlan("edgetpu", "edgetpu", find_library(names), names, opts)
    if low == "gpu":
        names = GPU_LIBS.get(_platform_key(), ())
        return DelegatePlan("gpu", "gpu", find_library(names), names, opts)
    if os.sep in s or "/" in s or re.search(r"\.(so(\.\d+)*|dylib|dll)$", s):
        return DelegatePlan("external", s, s, (s,), opts)
    raise RuntimeLoadError(f"unknown delegate {spec!r}; use cpu, xnnpack, edgetpu, gpu or a path to a "
                           "delegate library (.so/.dylib/.dll)")


def _edgetpu_device(dev: Optional[str], opts: dict) -> None:
    if dev:
        if not re.fullmatch(r"(usb|pci)?(:\d+)?|:?\d+", dev):
            raise RuntimeLoadError(f"bad Edge TPU device {dev!r}; use usb, pci, usb:N, pci:N or :N")
        opts.setdefault("device", dev if not dev.isdigit() else f":{dev}")


class _Captured:
    def __init__(self) -> None:
        self._file: Any = None
        self._text = ""

    def text(self) -> str:
        if self._file is not None:
            self._file.flush()
            self._file.seek(0)
            self._text = self._file.read().decode("utf-8", "replace")
        return self._text


# fd 2 is process-wide: loads from several threads (runner lanes, the agent) must
# not interleave their dup2 dance, or stderr could end up in a deleted temp file.
_FD2_LOCK = threading.RLock()
_CHATTER = ("INFO:", "VERBOSE:")


@contextmanager
def capture_stderr(enabled: bool = True) -> Iterator[_Captured]:
    """Collect native stderr (fd 2) for the block so the runtime's chatter
    ("INFO: Created TensorFlow Lite XNNPACK delegate...") stays out of user
    output but is still available to explain a failure.

    When the block succeeds, anything else written meanwhile (runtime
    warnings, other threads' messages) is passed on to the real stderr.
    """
    cap = _Captured()
    if not enabled:
        yield cap
        return
    with _FD2_LOCK:
        try:
            sys.stderr.flush()
            saved = os.dup(2)
        except (OSError, ValueError):  # no real fd 2 (embedded / some test runners)
            yield cap
            return
        import tempfile

        tmp = tempfile.TemporaryFile()
        cap._file = tmp
        os.dup2(tmp.fileno(), 2)
        failed = False
        try:
            yield cap
        except BaseException:
            failed = True
            raise
        finally:
            try:
                sys.stderr.flush()
            except ValueError:
                pass
            os.dup2(saved, 2)
            os.close(saved)
            text = cap.text()
            tmp.close()
            cap._file = None
            if not failed:
                keep = [ln for ln in text.splitlines(True) if ln.strip() and not ln.startswith(_CHATTER)]
                if keep:
                    os.write(2, "".join(keep).encode("utf-8", "replace"))


def _missing_lib_message(plan: DelegatePlan) -> str:
    names = " / ".join(plan.candidates) or "?"
    if plan.kind == "edgetpu":
        return (f"Edge TPU delegate library not found ({names}); install the Edge TPU runtime "
                "(Debian/Raspberry Pi OS: 'sudo apt-get install libedgetpu1-std' from the Coral repository) "
                "or set EDGEPIPE_DELEGATE_PATH to the folder holding it")
    if plan.kind == "gpu":
        return (f"GPU delegate library not found ({names}); the Python runtimes ship no GPU delegate for Linux "
                "desktops/Pi, build one or pass its path with --delegate /path/to/libdelegate.so")
    return f"delegate library not found: {plan.library}"


def load(plan: DelegatePlan, load_delegate: Callable, captured: _Captured) -> Any:
    """Load the native delegate for ``plan`` (None for the CPU)."""
    if plan.kind == "cpu":
        return None
    if not plan.library or (plan.kind == "external" and not os.path.exists(plan.library)):
        raise RuntimeLoadError(_missing_lib_message(plan))
    _check_delegate_library(plan)
    try:
        return load_delegate(plan.library, plan.options or None)
    except Exception as e:  # noqa: BLE001 - ctypes raises AttributeError/OSError, wrappers ValueError
        native = _one_line(captured.text()) or _one_line(str(e))
        if plan.kind == "edgetpu":
            devs = edgetpu_devices()
            if not devs:
                hint = ("no Edge TPU visible: plug the Coral USB Accelerator into a USB 3 port (lsusb should show "
                        "1a6e:089a or 18d1:9302) or check the PCIe driver (/dev/apex_0), and that your user may "
                        "access it (plugdev group / udev rules)")
            else:
                hint = (f"Edge TPU(s) visible ({', '.join(devs)}) but not usable: is another process using it, or "
                        "does the device string match (usb, pci, usb:N)?")
            raise RuntimeLoadError(f"Edge TPU delegate failed to load ({native}); {hint}") from None
        raise RuntimeLoadError(f"{plan.label} delegate failed to load from {plan.library} ({native}); check that "
                               "it was built for this runtime version and CPU architecture") from None


def _check_delegate_library(plan: DelegatePlan) -> None:
    """dlopen the library and look for the external-delegate entry points first:
    the runtimes' wrapper half-constructs itself on a library without them and
    then prints a traceback from its finalizer."""
    try:
        lib = ctypes.CDLL(plan.library)
    except OSError as e:
        raise RuntimeLoadError(f"{plan.label} delegate library {plan.library} cannot be loaded ({_one_line(str(e))}); "
                               "is it built for this CPU architecture, with its dependencies installed?") from None
    for sym in ("tflite_plugin_create_delegate", "tflite_plugin_destroy_delegate"):
        if not hasattr(lib, sym):
            raise RuntimeLoadError(f"{plan.library} is not a TFLite delegate (no {sym} symbol); pass a library built "
                                   "as an external delegate")


def _one_line(text: str, limit: int = 200) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("INFO:")]
    s = " / ".join(lines)
    return s if len(s) <= limit else s[: limit - 3] + "..."


_CUSTOM_OP = re.compile(r"unresolved custom op:?\s*([\w.\-/]+)", re.I)
_MISSING_BUILTIN = re.compile(r"Didn't find op for builtin opcode '?(\w+)'?(?: version '?(\d+)'?)?", re.I)


def explain_build_error(path: str, plan: DelegatePlan, data: bytes, err: Exception, native: str) -> RuntimeLoadError:
    """A native build/allocate failure as one line with a reason and a hint."""
    text = f"{err}\n{native}"
    m = _CUSTOM_OP.search(text)
    if m:
        op = m.group(1).rstrip(".")
        if op == EDGETPU_CUSTOM_OP.decode():
            return RuntimeLoadError(f"{path}: model is compiled for the Edge TPU (op {op}); run it with "
                                    "the edgetpu delegate, or use the bundle's CPU model.tflite")
        return RuntimeLoadError(f"{path}: model needs custom op {op!r}, which this runtime does not provide; "
                                "re-convert without custom ops or use a runtime/delegate that registers it")
    m = _MISSING_BUILTIN.search(text)
    if m:
        ver = f" version {m.group(2)}" if m.group(2) else ""
        return RuntimeLoadError(f"{path}: op {m.group(1)}{ver} is not supported by this runtime; upgrade the "
                                "runtime (pip install -U ai-edge-litert) or convert with an older TensorFlow")
    if "TFL3" in text or "identifier" in text or "verif" in text.lower() or "flatbuffer" in text.lower():
        return RuntimeLoadError(f"{path}: corrupt or truncated TFLite model ({_one_line(str(err))})")
    if plan.kind != "cpu":
        return RuntimeLoadError(f"{path}: {plan.label} delegate could not prepare the model "
                                f"({_one_line(text)}); try --delegate cpu")
    return RuntimeLoadError(f"{path}: cannot load model ({_one_line(text) or type(err).__name__})")


def _partition(node: dict, producers: Dict[int, int], ops: List[dict]) -> set:
    """Original node indices a delegate node replaced: walk back from its outputs
    to its inputs through the producing nodes (TFLite partitions are convex)."""
    stop = {int(t) for t in node.get("inputs", ())}
    covered: set = set()
    stack = [int(t) for t in node.get("outputs", ())]
    while stack:
        t = stack.pop()
        p = producers.get(t)
        if p is None or p in covered:
            continue
        covered.add(p)
        stack.extend(int(x) for x in ops[p].get("inputs", ()) if int(x) >= 0 and int(x) not in stop)
    return covered


def cpu_fallback(ops: Optional[List[dict]], plan: DelegatePlan, data: bytes) -> Optional[Any]:
    """How many ops the delegate took and which ran on the CPU; None for the CPU itself.

    ``ops`` must be the interpreter's op details taken *before* allocate_tensors:
    at that point the only delegate nodes are the requested delegate's (XNNPACK
    is applied lazily by allocate and would otherwise look like an accelerator).
    """
    if plan.kind == "cpu":
        return None
    if ops is None:
        return CpuFallback(plan.label, 0, 0, 0, note="op details not available from this runtime")
    original = [i for i, o in enumerate(ops) if o.get("op_name") != "DELEGATE"]
    on_accel = _accelerated(ops, original)
    cpu = dict(Counter(str(ops[i].get("op_name")) for i in original if i not in on_accel))
    note = None
    if plan.kind == "edgetpu" and EDGETPU_CUSTOM_OP not in data:
        note = "model is not compiled for the Edge TPU: every op runs on the CPU (run edgetpu_compiler first)"
    return CpuFallback(plan.label, len(original), len(on_accel), sum(cpu.values()), cpu, note)


def _accelerated(ops: List[dict], original: List[int]) -> set:
    """Indices of the original ops a delegate (or the Edge TPU's compiled custom op) took."""
    producers = {int(t): i for i in original for t in ops[i].get("outputs", ())}
    on_accel: set = set()
    for o in ops:
        if o.get("op_name") == "DELEGATE":
            on_accel |= _partition(o, producers, ops)
    # The Edge TPU compiler bakes its partitions into custom ops that only the TPU runs.
    tpu_op = EDGETPU_CUSTOM_OP.decode()
    return on_accel | {i for i in original if ops[i].get("op_name") == tpu_op}


def op_details(interp: Any) -> Optional[List[dict]]:
    """The interpreter's op list (private API, present in litert, tflite_runtime and tf.lite)."""
    try:
        return list(interp._get_ops_details())
    except Exception:  # noqa: BLE001 - introspection is best effort, never fatal
        return None
