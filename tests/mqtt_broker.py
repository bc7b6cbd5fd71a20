"""A private Mosquitto on loopback for tests and benchmarks, with authentication on.

Debian's ``mosquitto`` (scripts/setup-services.sh installs it) listens on
127.0.0.1 on a free port; anonymous clients are refused and one user is made
with ``mosquitto_passwd``; persistence and the log live in a temp directory
that goes away on :meth:`stop`. :meth:`kill` / :meth:`start` restart it on the
same port with the same persistence (the fault tests).
"""
from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Optional

from ports import free_port

USER, PASSWORD = "edgepipe-test", "broker-secret"


def mosquitto_bin() -> Optional[str]:
    return shutil.which("mosquitto") or next((p for p in ("/usr/sbin/mosquitto",) if os.access(p, os.X_OK)), None)


def missing_reason() -> Optional[str]:
    """Why a broker cannot start here (None when it can)."""
    if mosquitto_bin() is None or shutil.which("mosquitto_passwd") is None:
        return "Mosquitto not installed (apt-get install mosquitto; scripts/setup-services.sh does it)"
    try:
        import paho.mqtt  # noqa: F401
    except ImportError:
        return "paho-mqtt is not installed (pip install paho-mqtt)"
    return None


class Mosquitto:
    """``with Mosquitto() as mq: mq.url`` -> mqtt://edgepipe-test:…@127.0.0.1:PORT."""

    def __init__(self, autosave_interval: int = 1800):
        self.dir = Path(tempfile.mkdtemp(prefix="edgepipe-mosquitto-"))
        self.port = free_port()
        self.proc: Optional[subprocess.Popen] = None
        pw = self.dir / "passwd"
        subprocess.run(["mosquitto_passwd", "-c", "-b", str(pw), USER, PASSWORD], check=True,
                       capture_output=True, timeout=30)
        os.chmod(pw, 0o600)
        (self.dir / "data").mkdir()
        (self.dir / "mosquitto.conf").write_text("\n".join([
            f"listener {self.port} 127.0.0.1",
            "allow_anonymous false",
            f"password_file {pw}",
            "persistence true",
            f"persistence_location {self.dir / 'data'}/",
            f"autosave_interval {autosave_interval}",
            f"user {pwd.getpwuid(os.geteuid()).pw_name}",
            "max_queued_messages 100000",
            "max_inflight_messages 100",
            f"log_dest file {self.dir / 'mosquitto.log'}",
            "log_type error", "log_type warning", "log_type notice",
            "",
        ]))

    @property
    def url(self) -> str:
        return f"mqtt://{USER}:{PASSWORD}@127.0.0.1:{self.port}"

    @property
    def anonymous_url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self, timeout: float = 15.0) -> "Mosquitto":
        self.proc = subprocess.Popen([mosquitto_bin(), "-c", str(self.dir / "mosquitto.conf")],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited: {self.proc.stderr.read().decode(errors='replace')[-500:]}"
                                   f"{self.log()[-500:]}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"mosquitto did not listen on {self.port} within {timeout:g} s")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Stop the broker abruptly (SIGKILL: no goodbye, unsaved state lost)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(15)
        self.proc = None

    def log(self) -> str:
        try:
            return (self.dir / "mosquitto.log").read_text(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        self.kill(signal.SIGTERM)
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "Mosquitto":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
