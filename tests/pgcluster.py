"""A private PostgreSQL server on loopback for tests and benchmarks.

Debian's server binaries (``/usr/lib/postgresql/N/bin``) build a throw-away
cluster in a temp directory, listening on 127.0.0.1 on a free port with its
socket in that directory, and remove it when stopped. initdb refuses to run
as root, so as root the cluster belongs to the ``postgres`` user (``runuser``).
"""
from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Optional

from ports import free_port


def pg_bin() -> Optional[Path]:
    """The newest installed PostgreSQL server bin directory, or None."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: [int(x) for x in
                                                                          p.split("/")[-2].split(".") if x.isdigit()])
    for d in reversed(found):
        if os.access(os.path.join(d, "initdb"), os.X_OK):
            return Path(d)
    return None


def missing_reason() -> Optional[str]:
    """Why a cluster cannot start here (None when it can)."""
    if pg_bin() is None:
        return "PostgreSQL server binaries not found (/usr/lib/postgresql/*/bin; scripts/setup-services.sh installs them)"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and there is no postgres user to own the test cluster"
        if shutil.which("runuser") is None:
            return "running as root without runuser to start the test cluster as postgres"
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg 3 is not installed (pip install 'psycopg[binary]')"
    return None


class PgCluster:
    """``with PgCluster() as pg: pg.url`` -> postgresql://postgres@127.0.0.1:PORT/edgepipe."""

    def __init__(self, fast: bool = True, dbname: str = "edgepipe"):
        self.fast, self.dbname = fast, dbname
        self.dir: Optional[Path] = None
        self.port = 0
        self.url = ""

    def _run(self, *cmd: str, timeout: float = 60) -> subprocess.CompletedProcess:
        argv = list(cmd)
        if os.geteuid() == 0:
            argv = ["runuser", "-u", "postgres", "--"] + argv
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=str(self.dir))

    def start(self) -> "PgCluster":
        why = missing_reason()
        if why:
            raise RuntimeError(why)
        b = pg_bin()
        self.dir = Path(tempfile.mkdtemp(prefix="edgepipe-pg-"))
        if os.geteuid() == 0:
            pw = pwd.getpwnam("postgres")
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
        data = self.dir / "data"
        res = self._run(str(b / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8",
                        "--no-sync", "--no-instructions")
        if res.returncode:
            raise RuntimeError(f"initdb failed: {res.stderr.strip()[-500:]}")
        opts = ["-c listen_addresses=127.0.0.1", f"-k {self.dir}", "-c max_connections=100"]
        if self.fast:  # throw-away data: durability is not what the tests measure
            opts += ["-c fsync=off", "-c synchronous_commit=off", "-c full_page_writes=off"]
        for _ in range(3):  # a free port can be taken between the probe and the bind
            self.port = free_port()
            res = self._run(str(b / "pg_ctl"), "-D", str(data), "-l", str(self.dir / "server.log"), "-w",
                            "-t", "60", "-o", " ".join([f"-p {self.port}"] + opts), "start", timeout=90)
            if res.returncode == 0:
                break
        else:
            log = (self.dir / "server.log").read_text(errors="replace")[-800:]
            self.stop()
            raise RuntimeError(f"PostgreSQL did not start: {res.stderr.strip()[-300:]} {log}")
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/{self.dbname}"
        self.create_db(self.dbname)
        return self

    def create_db(self, name: str) -> str:
        """Create database ``name``; returns its URL."""
        import psycopg

        with psycopg.connect(f"postgresql://postgres@127.0.0.1:{self.port}/postgres", autocommit=True) as c:
            c.execute(f'CREATE DATABASE "{name}"')
        return f"postgresql://postgres@127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        if self.dir is None:
            return
        data = self.dir / "data"
        if (data / "postmaster.pid").exists():
            try:
                self._run(str(pg_bin() / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop", timeout=60)
            except subprocess.TimeoutExpired:
                self._run(str(pg_bin() / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop", timeout=30)
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir = None

    def __enter__(self) -> "PgCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def wait_port(port: int, secs: float = 10) -> bool:
    end = time.monotonic() + secs
    while time.monotonic() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return True
        except OSError:
            time.sleep(0.1)
    return False
