"""The one root of every expected failure in edgepipe.

Library code raises a subclass of :class:`EdgepipeError` with a one-line
message that names the problem and, where it helps, what to do about it; it
never names a CLI flag (the ``cli_*`` modules add those hints). Anything else
that escapes is a bug, and the agent and CLIs tell the two apart by class.
"""
from __future__ import annotations


class EdgepipeError(Exception):
    """An expected failure: bad input, a missing runtime, an unreachable peer.

    ``str(err)`` is one line; newlines in the message are folded so a log line
    or an HTTP reason never spans several lines.
    """

    def __str__(self) -> str:
        text = super().__str__()
        return " ".join(text.split()) if "\n" in text else text


def one_line(exc: BaseException) -> str:
    """``str(exc)`` folded to one line, falling back to the class name when empty."""
    text = " ".join(str(exc).split())
    return text or type(exc).__name__
