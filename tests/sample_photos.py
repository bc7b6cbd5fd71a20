"""Folders of the committed sample photos for tests that run on real files."""
from __future__ import annotations

import shutil
from pathlib import Path

IMAGES = Path(__file__).resolve().parents[1] / "sample_data" / "images"


def copy_photos(dest: Path, n: int) -> Path:
    """``dest`` (created) with the first ``n`` sample photos in name order; fails when fewer exist."""
    dest.mkdir(parents=True, exist_ok=True)
    src = sorted(IMAGES.glob("*.jpg"))[:n]
    assert len(src) == n, f"needs {n} sample photos in {IMAGES}"
    for p in src:
        shutil.copy(p, dest / p.name)
    return dest
