"""What machine are we measuring on: board, CPU, OS, governor, temperature,
throttling and memory.

Every source is optional: a file that does not exist (no device tree on x86,
no thermal zone in a container, no ``vcgencmd`` off a Pi) simply leaves its
field ``None``. Readers take a ``root`` so tests can point them at a fake
``/proc`` + ``/sys`` tree made of real files.
"""
from __future__ import annotations

import os
import platform
import shutil
import socket
import subprocess
import sys
from typing import Dict, List, Optional

# Bits of `vcgencmd get_throttled` (Raspberry Pi firmware documentation).
THROTTLE_BITS = {
    0: "under-voltage detected",
    1: "ARM frequency capped",
    2: "currently throttled",
    3: "soft temperature limit active",
    16: "under-voltage has occurred",
    17: "ARM frequency capping has occurred",
    18: "throttling has occurred",
    19: "soft temperature limit has occurred",
}
# Thermal zone types that measure the SoC / CPU, in preference order.
CPU_THERMAL_TYPES = ("cpu-thermal", "cpu_thermal", "soc_thermal", "x86_pkg_temp", "cpu", "soc")


def _read(root: str, rel: str) -> Optional[str]:
    try:
        with open(os.path.join(root, rel.lstrip("/")), "rb") as f:
            return f.read().decode("utf-8", "replace")
    except OSError:
        return None


def board_model(root: str = "/") -> Optional[str]:
    """``/proc/device-tree/model`` (e.g. "Raspberry Pi 5 Model B Rev 1.0"), NUL-stripped."""
    text = _read(root, "proc/device-tree/model") or _read(root, "sys/firmware/devicetree/base/model")
    if text is None:
        return None
    text = text.replace("\x00", "").strip()
    return text or None


def cpu_model(root: str = "/") -> Optional[str]:
    """The CPU's marketing name from ``/proc/cpuinfo``, else ``platform.processor()``."""
    text = _read(root, "proc/cpuinfo")
    if text:
        fields: Dict[str, str] = {}
        for line in text.splitlines():
            k, sep, v = line.partition(":")
            if sep and v.strip():
                fields.setdefault(k.strip().lower(), v.strip())
        # x86: "model name"; ARM: "model name" (often just "ARMv7 Processor..."),
        # else "Hardware" / "cpu model" (MIPS) / "Processor".
        for key in ("model name", "hardware", "cpu model", "processor"):
            v = fields.get(key)
            if v and not v.isdigit():
                return v
    return platform.processor() or None


def os_name(root: str = "/") -> Optional[str]:
    """PRETTY_NAME from ``/etc/os-release`` plus the kernel release, else ``platform.platform()``."""
    text = _read(root, "etc/os-release")
    if text:
        for line in text.splitlines():
            if line.startswith("PRETTY_NAME="):
                name = line.split("=", 1)[1].strip().strip('"')
                return f"{name} (kernel {platform.release()})" if root == "/" else name
    return platform.platform() if root == "/" else None


def governor(root: str = "/") -> Optional[str]:
    """cpufreq scaling governor of cpu0 ("performance", "ondemand", "schedutil", ...)."""
    text = _read(root, "sys/devices/system/cpu/cpu0/cpufreq/scaling_governor")
    return text.strip() or None if text is not None else None


def temperature_c(root: str = "/") -> Optional[float]:
    """SoC/CPU temperature in degrees Celsius from ``/sys/class/thermal``, if any zone exposes it."""
    base = os.path.join(root, "sys/class/thermal")
    try:
        zones = sorted(z for z in os.listdir(base) if z.startswith("thermal_zone"))
    except OSError:
        return None
    readings = []
    for z in zones:
        raw = _read(root, f"sys/class/thermal/{z}/temp")
        if raw is None:
            continue
        try:
            value = int(raw.strip()) / 1000.0
        except ValueError:
            continue
        kind = (_read(root, f"sys/class/thermal/{z}/type") or "").strip().lower()
        readings.append((kind, value))
    for want in CPU_THERMAL_TYPES:
        for kind, value in readings:
            if kind == want:
                return value
    return readings[0][1] if readings else None


def throttled(vcgencmd: Optional[str] = None, timeout: float = 2.0) -> Optional[str]:
    """``vcgencmd get_throttled`` as a hex string ("0x0"), or None off a Raspberry Pi."""
    exe = vcgencmd or shutil.which("vcgencmd")
    if not exe:
        return None
    try:
        out = subprocess.run([exe, "get_throttled"], capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    _, sep, value = out.stdout.strip().partition("=")
    value = value.strip() if sep else out.stdout.strip()
    try:
        int(value, 16)
    except ValueError:
        return None
    return value


def decode_throttled(value: Optional[str]) -> List[str]:
    """Human meaning of the set bits of a ``get_throttled`` value (empty when fine or unknown)."""
    if not value:
        return []
    try:
        bits = int(value, 16)
    except ValueError:
        return []
    return [text for bit, text in THROTTLE_BITS.items() if bits & (1 << bit)]


def memory_mb(root: str = "/") -> Dict[str, Optional[float]]:
    """Total and available memory (MB) from ``/proc/meminfo``."""
    out: Dict[str, Optional[float]] = {"total": None, "available": None}
    text = _read(root, "proc/meminfo")
    if text:
        for line in text.splitlines():
            k, _, v = line.partition(":")
            parts = v.split()
            if parts and parts[0].isdigit():
                if k == "MemTotal":
                    out["total"] = round(int(parts[0]) / 1024.0, 1)
                elif k == "MemAvailable":
                    out["available"] = round(int(parts[0]) / 1024.0, 1)
    if out["total"] is None and root == "/" and hasattr(os, "sysconf"):
        try:
            out["total"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20, 1)
        except (ValueError, OSError):
            pass
    return out


def peak_rss_mb() -> Optional[float]:
    """Peak resident set size of this process so far (MB)."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return round(rss / (2**20 if sys.platform == "darwin" else 1024.0), 1)


def emulated() -> bool:
    """True when running under CPU emulation (set by scripts/test-arm64.sh): timings are meaningless."""
    return os.environ.get("EDGEPIPE_EMULATED", "") not in ("", "0")


def snapshot(root: str = "/", vcgencmd: Optional[str] = None) -> dict:
    """The fields that change during a run: governor, temperature, throttling."""
    return {"governor": governor(root), "temperature_c": temperature_c(root),
            "throttled": throttled(vcgencmd)}


def _identity(root: str) -> dict:
    """What does not change while the device is up: id, host, board, CPU, OS, Python."""
    from edgepipe.device.identity import current_identity

    ident = current_identity()
    return {
        **(ident.to_dict() if ident else {}),
        "hostname": socket.gethostname(),
        "board": board_model(root),
        "cpu": cpu_model(root),
        "machine": platform.machine() or None,
        "cores": os.cpu_count(),
        "os": os_name(root),
        "python": platform.python_version(),
    }


def device_info(root: str = "/", vcgencmd: Optional[str] = None) -> dict:
    """The report's ``device`` block (temperature/throttling as start-only snapshots)."""
    snap = snapshot(root, vcgencmd)
    return dict(
        _identity(root),
        governor=snap["governor"],
        temperature_c={"start": snap["temperature_c"], "end": None},
        throttled={"start": snap["throttled"], "end": None},
        memory_mb=memory_mb(root)["total"],
    )


def start_snapshot(device: dict) -> dict:
    """The start-of-run snapshot held in a ``device_info()`` block (compared with the end)."""
    return {"governor": device["governor"], "temperature_c": device["temperature_c"]["start"],
            "throttled": device["throttled"]["start"]}


def info(root: str = "/", vcgencmd: Optional[str] = None) -> dict:
    """Everything ``edgerun info`` shows: device, runtimes, delegates, memory.

    The runtime is not imported: backends are found by package metadata.
    """
    from edgepipe.device.delegates import find_delegates
    from edgepipe.device.runtime import available_backends

    snap = snapshot(root, vcgencmd)
    mem = memory_mb(root)
    return {
        **_identity(root),
        "governor": snap["governor"],
        "temperature_c": snap["temperature_c"],
        "throttled": snap["throttled"],
        "throttled_flags": decode_throttled(snap["throttled"]),
        "memory_mb": mem,
        "backends": [{"name": n, "version": v} for n, v in available_backends()],
        "delegates": find_delegates(),
        "emulated": emulated(),
    }
