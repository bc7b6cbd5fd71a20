"""`edgepipe ablate`'s full reports: kept beside the points, and in the results store with ``--db``.

Each measured point's bench report (and the eval report of its bundle) is
written to ``<out>/reports/<point>.json``, so a point reused from the resume
cache still has its reports: a later run with ``--db`` stores them too. The
store ignores a report it already has (same id), so re-running never
duplicates; the eval report shared by a bundle's points is stored once.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from edgepipe.pipeline.ablate import slug

REPORTS_DIR = "reports"
MAX_FILE = 16 << 20  # a point's reports are a few KB; a larger file is not ours


@dataclass
class Tally:
    """What the store got: new reports, ones it had already, and the first failure."""

    new: int = 0
    known: int = 0
    failed: int = 0
    error: Optional[str] = None


class PointReports:
    """The ``keep`` callback of :func:`edgepipe.pipeline.ablate.run_ablation`."""

    def __init__(self, out_dir: os.PathLike, store=None):
        """``store``: an open results store (``store.open_store``), or None to keep the files only."""
        self.dir = Path(out_dir) / REPORTS_DIR
        self.store = store
        self.tally = Tally()
        self._seen: set = set()  # ids handled this run: a bundle's eval report comes with each of its points

    def path(self, key: str) -> Path:
        # The slug keeps it readable, the digest keeps two keys that slug alike apart.
        return self.dir / f"{slug(key)[:80]}-{hashlib.sha256(key.encode()).hexdigest()[:10]}.json"

    def __call__(self, key: str, reports: Optional[list]) -> None:
        if reports is None:
            reports = self.load(key)
        else:
            self.save(key, reports)
        if self.store is not None:
            for r in reports:
                if r.get("id") not in self._seen:
                    self._seen.add(r.get("id"))
                    self._add(r)

    def save(self, key: str, reports: list) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.path(key)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"key": key, "reports": reports}) + "\n", encoding="utf-8")
        tmp.replace(path)

    def load(self, key: str) -> list:
        """The reports kept for ``key``; none when the file is missing, too large, or not ours."""
        path = self.path(key)
        try:
            if path.stat().st_size > MAX_FILE:
                return []
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return []
        if not isinstance(doc, dict) or doc.get("key") != key or not isinstance(doc.get("reports"), list):
            return []
        return [r for r in doc["reports"] if isinstance(r, dict)]

    def _add(self, report: dict) -> None:
        from edgepipe.device.errors import EdgepipeError

        try:
            if self.store.add(report):
                self.tally.new += 1
            else:
                self.tally.known += 1
        except EdgepipeError as e:  # one report the store refuses: count it, keep the study going
            self.tally.failed += 1
            self.tally.error = self.tally.error or str(e)


__all__ = ["PointReports", "REPORTS_DIR", "Tally"]
