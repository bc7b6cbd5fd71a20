"""Plain-text tables and human-readable sizes for terminal output (both CLIs)."""
from __future__ import annotations

from typing import Sequence


def format_table(headers: Sequence[str], rows: Sequence[Sequence], right: Sequence[int] = ()) -> str:
    """Aligned columns; numbers and the indexes in ``right`` are right-aligned."""
    cells = [[("" if c is None else str(c)) for c in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        for i, c in enumerate(row):
            widths[i] = max(widths[i], len(c))
    numeric = set(right) | _numeric_columns(len(headers), rows)

    def fmt(row):
        return "  ".join((c.rjust(widths[i]) if i in numeric else c.ljust(widths[i]))
                         for i, c in enumerate(row)).rstrip()

    lines = [fmt(list(headers)), "  ".join("-" * w for w in widths)]
    lines += [fmt(row) for row in cells]
    return "\n".join(lines)


def _numeric_columns(n: int, rows: Sequence[Sequence]) -> set:
    """Indexes of the columns whose filled cells are all numbers."""
    numeric = set()
    for i in range(n):
        col = [row[i] for row in rows if i < len(row) and row[i] not in (None, "", "-")]
        if col and all(isinstance(c, (int, float)) for c in col):
            numeric.add(i)
    return numeric


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover
