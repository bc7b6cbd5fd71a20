#!/usr/bin/env python3
"""Export a few hundred real photos from pinned Debian packages into ``sample_data/photos/``.

Sources (see ``PACKAGES``): GCompris's educational photos (``gcompris-qt-data``,
read out of its Qt ``.rcc`` resource bundles), desktop wallpapers that are photos
(``lomiri-wallpapers-16.04``/``-20.04``, ``mate-backgrounds``,
``plasma-workspace-wallpapers``), scikit-image's CC0 / public-domain colour
photos (``python3-skimage``) and scikit-learn's two CC BY sample photos (``python3-sklearn``). Only the listed natural photos are taken; renders,
drawings and cut-outs on flat backgrounds are not. Each package is fetched with
``apt-get download NAME=VERSION`` (unless its .deb is already in ``--debs``), its
version is checked and it is unpacked with ``dpkg -x`` into a temporary folder:
nothing is installed.

Every photo: EXIF orientation applied, converted to sRGB when it carries an ICC
profile, alpha flattened on white, downscaled (Lanczos) to a longest side of
320 px, saved as baseline JPEG q85 with no metadata, named ``<source>_<group>_<name>.jpg``.
Near-duplicates (the same photo in two activities) are dropped by a 64-bit
difference hash. When more candidates than ``--limit`` remain, a seeded random
subset is kept. Per-file provenance (package, version, path, licence, copyright
holder or credit) goes to ``sample_data/photos_sources.tsv``; the licence of each
file is looked up in its package's machine-readable ``copyright`` file, with the
upstream per-photo credit where the package ships one.

Usage: .venv/bin/python scripts/sample_data/export_photos.py [--debs DIR] [--limit N] [--seed S]
Needs: apt-get and dpkg (Debian), Pillow.
"""
from __future__ import annotations

import argparse
import io
import random
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image, ImageCms, ImageOps

sys.path.insert(0, str(Path(__file__).resolve().parent))
from photo_sources import (Candidate, dep5_match, dep5_stanzas, gcompris_candidates,  # noqa: E402
                           skimage_candidates, sklearn_candidates, wallpaper_candidates)

REPO = Path(__file__).resolve().parents[2]
OUT_DIR = REPO / "sample_data" / "photos"
MANIFEST = REPO / "sample_data" / "photos_sources.tsv"
PACKAGES = {
    "gcompris-qt-data": "3.1-2",
    "lomiri-wallpapers-16.04": "20.04.0-2",
    "lomiri-wallpapers-20.04": "20.04.0-2",
    "mate-backgrounds": "1.26.0-1",
    "plasma-workspace-wallpapers": "4:5.27.5-2",
    "python3-skimage": "0.19.3-8",
    "python3-sklearn": "1.2.1+dfsg-1",
}
MAX_SIDE = 320
QUALITY = 85
DEFAULT_LIMIT = 400
DEFAULT_SEED = 20240615
# Two photos are the same picture when their 64-bit dHashes differ in at most DUP_BITS bits and
# their 16x16 grey thumbnails by at most DUP_MEAN_DIFF grey levels on average (the hash alone
# confuses smooth, low-contrast pictures such as a dune and a misty lake).
DUP_BITS = 6
DUP_MEAN_DIFF = 20


def fetch_and_unpack(debs: Path, root: Path) -> dict:
    """Download (if missing) and unpack every pinned package; returns {package: unpacked root}."""
    debs.mkdir(parents=True, exist_ok=True)
    roots = {}
    for name, version in PACKAGES.items():
        found = sorted(debs.glob(f"{name}_*.deb"))
        found = [d for d in found if _deb_field(d, "Version") == version]
        if not found:
            subprocess.run(["apt-get", "download", f"{name}={version}"], cwd=debs, check=True)
            found = [d for d in sorted(debs.glob(f"{name}_*.deb")) if _deb_field(d, "Version") == version]
        if not found:
            sys.exit(f"{name} {version}: no such .deb after apt-get download")
        dest = root / name
        subprocess.run(["dpkg", "-x", str(found[0]), str(dest)], check=True)
        roots[name] = dest
    return roots


def _deb_field(deb: Path, field: str) -> str:
    return subprocess.run(["dpkg-deb", "-f", str(deb), field], check=True, capture_output=True,
                          text=True).stdout.strip()


def to_rgb(data: bytes) -> Image.Image:
    """Decode, orient, convert to sRGB and flatten alpha on white; a fresh image with no metadata."""
    im = Image.open(io.BytesIO(data))
    im.load()
    im = ImageOps.exif_transpose(im)
    icc = im.info.get("icc_profile")
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        flat = Image.new("RGBA", im.size, (255, 255, 255, 255))
        flat.alpha_composite(im)
        im = flat
    im = im.convert("RGB")
    if icc:
        try:
            src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            im = ImageCms.profileToProfile(im, src, ImageCms.createProfile("sRGB"), outputMode="RGB")
        except (ImageCms.PyCMSError, OSError):
            pass  # a broken profile: keep the pixels as they are
    clean = Image.new("RGB", im.size)
    clean.paste(im)
    return clean


def downscale(im: Image.Image) -> Image.Image:
    scale = MAX_SIDE / max(im.size)
    if scale >= 1:
        return im
    size = (max(1, round(im.width * scale)), max(1, round(im.height * scale)))
    return im.resize(size, Image.Resampling.LANCZOS)


def signature(im: Image.Image) -> tuple:
    """(64-bit difference hash, 16x16 grey thumbnail bytes) for finding the same picture twice."""
    px = im.convert("L").resize((9, 8), Image.Resampling.LANCZOS).tobytes()
    bits = 0
    for row in range(8):
        for col in range(8):
            bits = (bits << 1) | (px[row * 9 + col] > px[row * 9 + col + 1])
    return bits, im.convert("L").resize((16, 16), Image.Resampling.LANCZOS).tobytes()


def same_picture(a: tuple, b: tuple) -> bool:
    if bin(a[0] ^ b[0]).count("1") > DUP_BITS:
        return False
    return sum(abs(x - y) for x, y in zip(a[1], b[1])) / len(a[1]) <= DUP_MEAN_DIFF


def licence_of(c: Candidate, stanzas: dict) -> tuple:
    """(licence, copyright holder or credit, the copyright file's stanza in one line) for a candidate.

    The licence is the most specific statement there is: the upstream per-photo credit
    when the package ships one, else the package copyright file's stanza for the file.
    """
    st = dep5_match(stanzas[c.package], c.copyright_path)
    if st is None:
        sys.exit(f"{c.package}: no copyright stanza covers {c.copyright_path}")
    holders = [x.strip() for x in st.get("Copyright", "").split("\n") if x.strip()]
    holder = "; ".join(holders[:3]) + ("; and others" if len(holders) > 3 else "")
    lic = st["License"].split("\n")[0].strip()
    catch_all = " (Files: *)" if st["Files"].split() == ["*"] else ""
    debian = f"{lic}, {holder}{catch_all}"
    if c.credit:
        return c.credit[0], c.credit[1], debian
    return lic, holder, debian


def collect(roots: dict) -> list:
    cands = gcompris_candidates(roots["gcompris-qt-data"])
    cands += wallpaper_candidates(roots)
    cands += skimage_candidates(roots["python3-skimage"])
    cands += sklearn_candidates(roots["python3-sklearn"])
    return cands


def export(cands: list, roots: dict, limit: int, seed: int) -> list:
    """Decode, dedupe, pick and write the photos; returns the manifest rows."""
    stanzas = {p: dep5_stanzas((roots[p] / "usr/share/doc" / p / "copyright").read_text(encoding="utf-8"))
               for p in roots}
    kept, hashes = [], []
    for c in cands:
        im = downscale(to_rgb(c.read()))
        h = signature(im)
        dup = next((k for k, hk in zip(kept, hashes) if same_picture(h, hk)), None)
        if dup is not None:
            print(f"skip {c.name}: same picture as {dup[0].name}")
            continue
        kept.append((c, im))
        hashes.append(h)
    if len(kept) > limit:
        idx = sorted(random.Random(seed).sample(range(len(kept)), limit))
        kept = [kept[i] for i in idx]
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    for old in OUT_DIR.glob("*.jpg"):
        old.unlink()
    rows = []
    for c, im in kept:
        im.save(OUT_DIR / c.name, "JPEG", quality=QUALITY, optimize=True)
        lic, holder, debian = licence_of(c, stanzas)
        rows.append((c.name, c.package, PACKAGES[c.package], c.source_path, lic, holder, debian, c.note))
    return rows


def write_manifest(rows: list) -> None:
    header = ("file", "package", "version", "path_in_package", "licence", "copyright_or_credit",
              "debian_copyright_file", "note")
    clean = [[re.sub(r"[\t\n]+", " ", str(v)) for v in r] for r in [header] + sorted(rows)]
    MANIFEST.write_text("".join("\t".join(r) + "\n" for r in clean), encoding="utf-8")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--debs", type=Path, default=REPO / ".cache" / "debs",
                    help="folder for the downloaded .deb files (reused when present)")
    ap.add_argument("--limit", type=int, default=DEFAULT_LIMIT)
    ap.add_argument("--seed", type=int, default=DEFAULT_SEED)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="edgepipe-photos-") as tmp:
        roots = fetch_and_unpack(args.debs, Path(tmp))
        cands = collect(roots)
        rows = export(cands, roots, args.limit, args.seed)
    write_manifest(rows)
    total = sum((OUT_DIR / r[0]).stat().st_size for r in rows)
    by_source = {}
    for r in rows:
        by_source[r[0].split("_")[0]] = by_source.get(r[0].split("_")[0], 0) + 1
    print(f"{len(rows)} photos from {len(cands)} candidates, {total / 1e6:.2f} MB in {OUT_DIR}: {by_source}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
