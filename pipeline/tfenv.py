"""Importing TensorFlow quietly and keeping its native log noise away from users.

TensorFlow and the TFLite converter write to the process's file descriptors 1
and 2 from C++ (MLIR diagnostics, "Saved artifact at ..." from Keras export),
so Python-level redirection is not enough: `captured_output()` swaps the fds.
"""
from __future__ import annotations

import contextlib
import importlib.metadata
import os
import sys
import tempfile
from pathlib import Path
from typing import Iterator, Optional

_QUIET_ENV = {
    "TF_CPP_MIN_LOG_LEVEL": "3",
    # oneDNN kernels round floats differently from the reference kernels; keep
    # the float reference outputs that accuracy checks compare against stable.
    "TF_ENABLE_ONEDNN_OPTS": "0",
    "GRPC_VERBOSITY": "ERROR",
    "ABSL_MIN_LOG_LEVEL": "3",
    "KERAS_BACKEND": "tensorflow",
}


def tensorflow_version() -> str:
    """TensorFlow's version without importing it (cheap; used in cache keys)."""
    for dist in ("tensorflow-cpu", "tensorflow", "tf-nightly", "tensorflow-intel"):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "absent"


def import_tf():
    """Import TensorFlow with its start-up chatter silenced; returns the module."""
    for k, v in _QUIET_ENV.items():
        os.environ.setdefault(k, v)
    with captured_output():
        import tensorflow as tf  # noqa: WPS433 (lazy on purpose: heavy)
        import logging

        tf.get_logger().setLevel(logging.ERROR)
        try:
            import absl.logging

            absl.logging.set_verbosity(absl.logging.ERROR)
        except ImportError:  # pragma: no cover - absl ships with TF
            pass
    return tf


@contextlib.contextmanager
def captured_output(log_path: Optional[Path] = None) -> Iterator[Path]:
    """Send fds 1 and 2 to a log file for the duration; yields the log's path.

    The log is kept when the block raises (at ``log_path`` or a temp file), so a
    failure can point at it instead of dumping converter internals on the
    terminal; a temp log is deleted when the block succeeded, or raised
    without writing anything.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    own_log = log_path is None
    if own_log:
        fd, name = tempfile.mkstemp(prefix="edgepipe-tf-", suffix=".log")
        os.close(fd)
        log_path = Path(name)
    else:
        log_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with _fds_to(log_path):
            yield log_path
    except BaseException:
        if own_log and _is_empty(log_path):  # nothing to point at
            log_path.unlink(missing_ok=True)
        raise
    if own_log:
        log_path.unlink(missing_ok=True)


def _is_empty(path: Path) -> bool:
    try:
        return path.stat().st_size == 0
    except OSError:
        return False


@contextlib.contextmanager
def _fds_to(log_path: Path) -> Iterator[None]:
    """fds 1 and 2 (and Python's sys.stdout/stderr) into ``log_path``, restored on exit."""
    saved = (os.dup(1), os.dup(2))
    with open(log_path, "ab") as log, open(log_path, "a", encoding="utf-8", errors="replace") as text:
        try:
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
            # Python-level prints (Keras' "Saved artifact at ...") may go to a
            # replaced sys.stdout that is not fd 1 (e.g. under click's runner).
            with contextlib.redirect_stdout(text), contextlib.redirect_stderr(text):
                yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def last_error_line(log_path: Path, limit: int = 300) -> str:
    """The most telling line of a converter log, for a one-line error."""
    try:
        lines = [ln.strip() for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    for ln in reversed(lines):
        if "error" in ln.lower():
            return ln[:limit]
    return lines[-1][:limit] if lines else ""
