"""Progress bars with an ETA for long work, when a person is watching.

On only when the stream is a terminal and the output is not JSON; tqdm draws
the bars when it is installed (the host always has it), and without it the
bars are silent: a Raspberry Pi needs nothing extra. ``EDGEPIPE_PROGRESS=0``
turns bars off, ``=1`` forces them on (for logs that want them, and tests).
Used by `edgerun bench` and `run`, and by the host's convert, ablate and fleet
bench (the host may import the device package, never the other way round).
"""
from __future__ import annotations

import os
import re
import sys
from typing import Optional, Sequence, TextIO

ENV = "EDGEPIPE_PROGRESS"
FORMAT = "{desc}: {percentage:3.0f}%|{bar:24}| {n_fmt}/{total_fmt} [{elapsed}, ETA {remaining}]{postfix}"
FORMAT_OPEN = "{desc}: {n_fmt} {unit} [{elapsed}, {rate_fmt}]{postfix}"
# "[3/6] int8 ..." : the step lines convert and ablate already print.
_STEP = re.compile(r"^\[(\d+)/(\d+)\]\s*(.*)$")


def _tqdm():
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm


def enabled(stream: Optional[TextIO] = None, *, as_json: bool = False) -> bool:
    """True when bars should be drawn on ``stream`` (stderr by default)."""
    forced = os.environ.get(ENV, "").strip()
    if forced == "0" or as_json or _tqdm() is None:
        return False
    if forced == "1":
        return True
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


class Bar:
    """One bar: ``with Bar(total, "convert") as b: ...; b.update(); b.note("int8")``.

    A disabled bar accepts every call and draws nothing, so callers never branch.
    ``total=None`` counts without a percentage (open-ended work).
    """

    def __init__(self, total: Optional[int], desc: str, *, unit: str = "it", on: Optional[bool] = None,
                 stream: Optional[TextIO] = None, position: Optional[int] = None, leave: bool = True):
        stream = sys.stderr if stream is None else stream
        self._bar = None
        if on if on is not None else enabled(stream):
            tqdm = _tqdm()
            if tqdm is not None:
                self._bar = tqdm(total=total, desc=desc, unit=unit, file=stream, position=position, leave=leave,
                                 bar_format=FORMAT if total else FORMAT_OPEN, dynamic_ncols=True,
                                 mininterval=0.2, smoothing=0.1)

    @property
    def active(self) -> bool:
        return self._bar is not None

    @property
    def count(self) -> int:
        return int(self._bar.n) if self._bar is not None else 0

    def message(self, msg: str, *, at_start: bool = True) -> None:
        """Drive the bar from a progress line: ``[i/N] what`` moves it, anything else prints above it.

        ``at_start``: the line announces step i (i-1 done), else it reports step i finished.
        """
        m = _STEP.match(msg)
        if m is None or self._bar is None:
            self.write(msg)
            return
        i, n = int(m.group(1)), int(m.group(2))
        if self._bar.total != n:
            self._bar.total = n
            self._bar.bar_format = FORMAT
        self.to(i - 1 if at_start else i)
        self.note(m.group(3))

    def finish(self) -> None:
        """All steps done (the last ``[N/N]`` line announced a start)."""
        if self._bar is not None and self._bar.total:
            self.to(int(self._bar.total))

    def update(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def to(self, n: int) -> None:
        """Move to ``n`` done (for callbacks that report a running count)."""
        if self._bar is not None and n > self._bar.n:
            self._bar.update(n - self._bar.n)

    def set_total(self, total: Optional[int]) -> None:
        """Change the total, keeping the count (work found on the way, e.g. devices joining)."""
        if self._bar is not None:
            self._bar.total = total
            self._bar.bar_format = FORMAT if total else FORMAT_OPEN
            self._bar.refresh()

    def reset(self, total: Optional[int], desc: Optional[str] = None) -> None:
        """Start a new phase on the same line (warm-up, then timed runs)."""
        if self._bar is not None:
            self._bar.reset(total=total)
            self._bar.bar_format = FORMAT if total else FORMAT_OPEN
            if desc is not None:
                self._bar.set_description_str(desc, refresh=False)
            self._bar.refresh()

    def note(self, text: str) -> None:
        """What is happening now, after the counts (e.g. the recipe or job)."""
        if self._bar is not None:
            self._bar.set_postfix_str(text[:60])

    def write(self, line: str) -> None:
        """Print a line above the bar (or plainly when there is no bar)."""
        if self._bar is not None:
            self._bar.write(line, file=self._bar.fp)
        else:
            print(line, file=sys.stderr)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> "Bar":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Board:
    """One line per worker (e.g. per device in a fleet bench) plus an overall line."""

    def __init__(self, names: Sequence[str], totals: Sequence[int], desc: str = "all", *,
                 on: Optional[bool] = None, stream: Optional[TextIO] = None, unit: str = "job"):
        on = enabled(stream) if on is None else on
        self.total = Bar(sum(totals), desc, unit=unit, on=on, stream=stream, position=0)
        self.lines = {name: Bar(t, name, unit=unit, on=on, stream=stream, position=i + 1)
                      for i, (name, t) in enumerate(zip(names, totals))}

    def start(self, name: str, what: str) -> None:
        """``name`` began ``what`` (shown on its line)."""
        self.lines[name].note(what)

    def done(self, name: str, what: str = "") -> None:
        self.lines[name].update()
        self.lines[name].note(what)
        self.total.update()

    def close(self) -> None:
        for b in self.lines.values():
            b.close()
        self.total.close()

    def __enter__(self) -> "Board":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
