"""edgepipe.device.sysinfo on fake /proc + /sys trees made of real files, and `edgerun info`."""
from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pytest

from edgepipe.device import sysinfo


def write(root: Path, rel: str, text) -> None:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(text if isinstance(text, bytes) else text.encode())


@pytest.fixture
def pi_root(tmp_path) -> Path:
    """What a Raspberry Pi 4 exposes (values copied from a real board)."""
    r = tmp_path / "pi"
    write(r, "proc/device-tree/model", b"Raspberry Pi 4 Model B Rev 1.4\x00")
    write(r, "proc/cpuinfo", "processor\t: 0\nBogoMIPS\t: 108.00\nCPU part\t: 0xd08\n\n"
                             "Hardware\t: BCM2835\nRevision\t: c03114\nModel\t\t: Raspberry Pi 4 Model B Rev 1.4\n")
    write(r, "etc/os-release", 'PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\nID=debian\n')
    write(r, "sys/devices/system/cpu/cpu0/cpufreq/scaling_governor", "ondemand\n")
    write(r, "sys/class/thermal/thermal_zone0/type", "cpu-thermal\n")
    write(r, "sys/class/thermal/thermal_zone0/temp", "48686\n")
    write(r, "proc/meminfo", "MemTotal:        3885396 kB\nMemFree:          100 kB\nMemAvailable:    3279220 kB\n")
    return r


@pytest.fixture
def vcgencmd(tmp_path) -> Path:
    exe = tmp_path / "bin" / "vcgencmd"
    exe.parent.mkdir()
    exe.write_text("#!/bin/sh\n[ \"$1\" = get_throttled ] && echo throttled=0x50005 && exit 0\nexit 1\n")
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    return exe


def test_pi_tree_is_read(pi_root, vcgencmd):
    assert sysinfo.board_model(pi_root) == "Raspberry Pi 4 Model B Rev 1.4"
    assert sysinfo.cpu_model(pi_root) == "BCM2835"
    assert sysinfo.os_name(pi_root) == "Debian GNU/Linux 12 (bookworm)"
    assert sysinfo.governor(pi_root) == "ondemand"
    assert sysinfo.temperature_c(pi_root) == pytest.approx(48.686)
    assert sysinfo.memory_mb(pi_root) == {"total": pytest.approx(3794.3, abs=0.1),
                                          "available": pytest.approx(3202.4, abs=0.1)}
    assert sysinfo.throttled(str(vcgencmd)) == "0x50005"
    assert sysinfo.snapshot(pi_root, str(vcgencmd)) == {"governor": "ondemand", "temperature_c": 48.686,
                                                         "throttled": "0x50005"}


def test_missing_sources_are_simply_absent(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert sysinfo.board_model(empty) is None
    assert sysinfo.governor(empty) is None
    assert sysinfo.temperature_c(empty) is None
    assert sysinfo.memory_mb(empty) == {"total": None, "available": None}
    assert sysinfo.os_name(empty) is None
    assert sysinfo.throttled(str(tmp_path / "no-vcgencmd")) is None
    d = sysinfo.device_info(empty, str(tmp_path / "no-vcgencmd"))
    assert d["board"] is None and d["temperature_c"] == {"start": None, "end": None}


def test_x86_cpuinfo_and_thermal_zone_preference(tmp_path):
    r = tmp_path / "x86"
    write(r, "proc/cpuinfo", "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Core(TM) i7\n")
    write(r, "sys/class/thermal/thermal_zone0/type", "acpitz\n")
    write(r, "sys/class/thermal/thermal_zone0/temp", "27800\n")
    write(r, "sys/class/thermal/thermal_zone1/type", "x86_pkg_temp\n")
    write(r, "sys/class/thermal/thermal_zone1/temp", "55000\n")
    assert sysinfo.cpu_model(r) == "Intel(R) Core(TM) i7"
    assert sysinfo.temperature_c(r) == 55.0  # the package sensor, not the ACPI zone


def test_decode_throttled():
    assert sysinfo.decode_throttled("0x0") == []
    assert sysinfo.decode_throttled(None) == [] and sysinfo.decode_throttled("junk") == []
    assert sysinfo.decode_throttled("0x50005") == ["under-voltage detected", "currently throttled",
                                                    "under-voltage has occurred", "throttling has occurred"]


def test_vcgencmd_garbage_is_ignored(tmp_path):
    exe = tmp_path / "vcgencmd"
    exe.write_text("#!/bin/sh\necho 'VCHI initialization failed'\n")
    exe.chmod(0o755)
    assert sysinfo.throttled(str(exe)) is None


def test_peak_rss_and_emulated(monkeypatch):
    rss = sysinfo.peak_rss_mb()
    assert rss is None or 5 < rss < 100_000
    monkeypatch.setenv("EDGEPIPE_EMULATED", "1")
    assert sysinfo.emulated()
    monkeypatch.setenv("EDGEPIPE_EMULATED", "0")
    assert not sysinfo.emulated()


def test_edgerun_info_json(edgerun, vcgencmd, backend):
    env = {"PATH": f"{vcgencmd.parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    out = edgerun("info", "--json", env=env)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["cores"] == os.cpu_count()
    assert data["throttled"] == "0x50005" and "currently throttled" in data["throttled_flags"]
    assert (data["backends"][0]["name"], data["backends"][0]["version"]) == backend
    assert set(data["delegates"]) == {"cpu", "edgetpu", "gpu"}
    assert out.stderr == ""


def test_edgerun_info_table(edgerun, backend):
    out = edgerun("info", env={"PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    keys = [ln.split()[0] for ln in lines]
    assert {"host", "cpu", "python", "backends"} <= set(keys)
    if not shutil.which("vcgencmd", path="/usr/bin:/bin"):
        assert "throttled" not in keys  # no vcgencmd here: simply absent
    assert any(ln.startswith("backends") and backend[0] in ln for ln in lines)
    assert "None" not in out.stdout
