"""The one root of every expected failure in edgepipe.

Library code raises a subclass of :class:`EdgepipeError` with a one-line
message that names the problem and, where it helps, what to do about it; it
never names a CLI flag (the ``cli_*`` modules add those hints). Anything else
that escapes is a bug, and the agent and CLIs tell the two apart by class.
"""
from __future__ import annotations

from typing import Callable, Optional


# What a runtime's native code raises through its Python binding. pybind11 maps
# std::out_of_range to IndexError (a malformed model's tensor map lookups do
# that), std::overflow_error to OverflowError, std::bad_alloc to MemoryError and
# the rest to RuntimeError/ValueError: all of them mean "this model cannot run".
NATIVE_ERRORS = (RuntimeError, ValueError, IndexError, KeyError, OverflowError, MemoryError)


class EdgepipeError(Exception):
    """An expected failure: bad input, a missing runtime, an unreachable peer.

    ``str(err)`` is one line; newlines in the message are folded so a log line
    or an HTTP reason never spans several lines. ``param`` names the library
    parameter at fault (``"data"``, ``"runs"``): a CLI turns it into its own
    flag (``--data: ...``) with :func:`cli_hint`; the library never names flags.
    """

    def __init__(self, *args: object, param: Optional[str] = None):
        super().__init__(*args)
        self.param = param

    def __str__(self) -> str:
        text = super().__str__()
        return " ".join(text.split()) if "\n" in text else text


class StatusError(EdgepipeError):
    """An expected failure that carries an HTTP-style ``status`` with its one-line ``reason``.

    The job core raises it for refused jobs and the HTTP server for refused
    requests; both transports (HTTP, MQTT) turn it into the same answer.
    """

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status
        self.reason = reason


def one_line(exc: BaseException) -> str:
    """``str(exc)`` folded to one line, falling back to the class name when empty."""
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def cli_hint(exc: BaseException, flag_for: Callable[[str], Optional[str]]) -> str:
    """One line for a CLI: ``--flag: message`` when the error names a parameter the command has.

    ``flag_for`` maps a parameter name to the command's flag (or ``None``);
    click commands pass a lookup over their own parameters.
    """
    text = one_line(exc)
    param = getattr(exc, "param", None)
    flag = flag_for(param) if param else None
    return f"{flag}: {text}" if flag else text
