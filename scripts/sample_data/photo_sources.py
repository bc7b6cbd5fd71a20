"""Where ``export_photos.py`` finds its photos in the unpacked Debian packages, and under which licence.

Readers for the two container formats involved (Qt's binary ``.rcc`` resource
bundle, which GCompris ships its pictures in, and Debian's machine-readable
``copyright`` file, DEP-5) and the explicit lists of photos taken from each
package. The lists were made by looking at every picture: renders, drawings,
paintings and cut-outs on a flat background were left out.
"""
from __future__ import annotations

import fnmatch
import json
import re
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional


@dataclass(frozen=True)
class Candidate:
    """One photo in a package: where it is, what it will be called, and how to read it."""

    name: str                 # output file name, <source>_<group>_<name>.jpg
    package: str
    source_path: str          # path in the package (rcc bundle:resource path for GCompris)
    copyright_path: str       # the path as the package's copyright file names it
    read: Callable[[], bytes]
    credit: Optional[tuple] = None  # (licence, credit) from an upstream per-photo statement
    note: str = ""


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


# ---------------------------------------------------------------- Qt .rcc


def read_rcc(path: Path) -> dict:
    """Every file in a Qt binary resource bundle: {resource path: bytes} (zlib-compressed entries inflated)."""
    b = path.read_bytes()
    if b[:4] != b"qres":
        raise ValueError(f"{path}: not a Qt resource bundle")
    version, tree, data, names = struct.unpack(">IIII", b[4:20])
    node_size = 22 if version >= 2 else 14  # version 2 added an 8-byte modification time

    def name_at(off: int) -> str:
        (n,) = struct.unpack(">H", b[names + off:names + off + 2])
        return b[names + off + 6:names + off + 6 + 2 * n].decode("utf-16-be")

    out = {}
    stack = [(0, "")]
    while stack:
        index, prefix = stack.pop()
        p = tree + index * node_size
        name_off, flags = struct.unpack(">IH", b[p:p + 6])
        path_here = prefix + name_at(name_off) if index else ""
        if flags & 2:  # directory: child count, first child index
            count, first = struct.unpack(">II", b[p + 6:p + 14])
            stack.extend((first + c, path_here + "/" if index else "") for c in range(count))
            continue
        (off,) = struct.unpack(">I", b[p + 10:p + 14])
        (size,) = struct.unpack(">I", b[data + off:data + off + 4])
        raw = b[data + off + 4:data + off + 4 + size]
        if flags & 1:  # qCompress: 4-byte length, then zlib
            raw = zlib.decompress(raw[4:])
        elif flags & 4:
            raise ValueError(f"{path}:{path_here}: zstd-compressed entries are not supported")
        out[path_here] = raw
    return out


# ---------------------------------------------------------------- DEP-5 copyright


def dep5_stanzas(text: str) -> list:
    """The ``Files:`` stanzas of a machine-readable copyright file, as dicts of field -> value."""
    out = []
    for block in re.split(r"\n\s*\n", text):
        fields, key = {}, None
        for line in block.splitlines():
            if line[:1] in (" ", "\t") and key:
                fields[key] += "\n" + line.strip()
            elif ":" in line:
                key, _, value = line.partition(":")
                key = key.strip()
                fields[key] = value.strip()
        if "Files" in fields:
            out.append(fields)
    return out


def dep5_match(stanzas: list, path: str) -> Optional[dict]:
    """The stanza governing ``path`` (the last matching one, as DEP-5 says).

    GCompris's copyright file names the source pictures (.jpg/.png/.svg) that its
    build turned into the shipped .webp files, so any of those extensions matches.
    """
    stem = path.rsplit(".", 1)[0]
    names = [path] + [stem + e for e in (".webp", ".jpg", ".jpeg", ".JPG", ".png", ".svg")]
    best = None
    for st in stanzas:
        if any(fnmatch.fnmatchcase(n, pat) for pat in st["Files"].split() for n in names):
            best = st
    return best


# ---------------------------------------------------------------- GCompris

RCC_DIR = "usr/share/gcompris-qt/rcc"
ACT = "gcompris/src/activities"
# (group, bundle, folder inside it, nested): preferred groups first, since the first copy of a
# picture that appears twice is the one kept. Categorization's pictures each have their own
# stanza in the copyright file; erase's have upstream credits; explore_monuments' only the catch-all.
GCOMPRIS_GROUPS = (
    ("fishes", "categorization.rcc", f"{ACT}/categorization/resource/images/fishes", False),
    ("landmarks", "categorization.rcc", f"{ACT}/categorization/resource/images/monuments", False),
    ("objects", "categorization.rcc", f"{ACT}/categorization/resource/images/others", False),
    ("energy", "categorization.rcc", f"{ACT}/categorization/resource/images/renewable", False),
    ("tools", "categorization.rcc", f"{ACT}/categorization/resource/images/tools", False),
    ("erase", "erase.rcc", f"{ACT}/erase/resource", False),
    ("worldanimals", "explore_world_animals.rcc", f"{ACT}/explore_world_animals/resource/animals", False),
    ("farm", "explore_farm_animals.rcc", f"{ACT}/explore_farm_animals/resource/animals", False),
    ("sea", "clickgame.rcc", f"{ACT}/clickgame/resource", False),
    ("monuments", "explore_monuments.rcc", f"{ACT}/explore_monuments/resource", True),
)
# clickgame's folder also holds fish sprites (drawings): only its six underwater photos.
ONLY = {"sea": {f"sea{i}" for i in range(1, 7)}}
# The activity whose ActivityInfo.qml credits a picture: {(activity, file stem): credit title}.
CREDIT_TITLES = {
    ("erase", "alpaca"): "Alpaca", ("erase", "bee"): "Pollinationn", ("erase", "butterfly"): "Butterfly",
    ("erase", "calf"): "Calf", ("erase", "camels"): "Camels", ("erase", "caterpillar"): "Caterpillar",
    ("erase", "chamaeleon"): "Chamaeleo chamaeleon Samos Griechenland", ("erase", "cheetah"): "Cheetah",
    ("erase", "dolphin"): "Dolphin", ("erase", "flying_fox"): "Flying fox",
    ("erase", "gibbon"): "Hylobates lar - Kaeng Krachan WB", ("erase", "goat"): "Goat", ("erase", "gorilla"): "Gorilla",
    ("erase", "gosling"): "Gosling", ("erase", "heron"): "Heron", ("erase", "horse"): "Horse",
    ("erase", "kitten"): "A posing kitten", ("erase", "long_nosed_monkey"): "Long nosed monkey",
    ("erase", "macaque"): "Macaque", ("erase", "meerkats"): "Meerkats",
    ("erase", "northern_harrier"): "Northern harrier", ("erase", "nubian_ibex"): "Nubian ibex",
    ("erase", "penguin"): "Penguin", ("erase", "rhinoceros"): "Rhinoceros",
    ("erase", "spoonbills"): "Spoonbills", ("erase", "squirrel"): "Squirrel", ("erase", "swans"): "Swans",
    ("erase", "toucan"): "Toucan",
    ("explore_monuments", "chichenItza"): "Chichen Itza 3",
    ("explore_monuments", "christTheRedeemer"): "1 cristor redentor 2014",
    ("explore_monuments", "tajMahal"): "Taj Mahal, Agra, India",
}


def qml_credits(qml: str) -> dict:
    """{title: (licence, credit line)} from an ActivityInfo.qml ``credit`` of '"Title" by ... (URL), CC BY-SA 4.0'."""
    out = {}
    for line in re.findall(r"'(\"[^']*)'", qml):
        m = re.match(r'"([^"]+)"', line)
        lic = re.search(r"\), (CC[- ]BY(?:[- ]SA)?[- ][0-9.]+)", line)
        if m and lic:
            out[m.group(1)] = ("CC-" + lic.group(1)[3:].replace(" ", "-"), line)
    return out


def gcompris_candidates(root: Path) -> list:
    """The natural photos in GCompris's activity bundles, preferred groups first."""
    bundles, credits, cands = {}, {}, []
    for group, bundle, folder, nested in GCOMPRIS_GROUPS:
        if bundle not in bundles:
            bundles[bundle] = read_rcc(root / RCC_DIR / bundle)
            activity = folder.split("/")[3]
            credits[activity] = qml_credits(bundles[bundle].get(f"{ACT}/{activity}/ActivityInfo.qml", b"")
                                            .decode("utf-8"))
        files = bundles[bundle]
        activity = folder.split("/")[3]
        for path in sorted(files):
            rel = path[len(folder) + 1:] if path.startswith(folder + "/") else None
            if rel is None or not rel.endswith(".webp") or rel.count("/") != (1 if nested else 0):
                continue
            stem = rel.rsplit(".", 1)[0].split("/")[-1]
            if group in ONLY and stem not in ONLY[group]:
                continue
            title = CREDIT_TITLES.get((activity, stem))
            credit = credits[activity].get(title) if title else None
            if title and credit is None:
                raise ValueError(f"{activity}/ActivityInfo.qml no longer credits {title!r}")
            cands.append(Candidate(
                name=f"gcompris_{group}_{slug(rel.rsplit('.', 1)[0])}.jpg", package="gcompris-qt-data",
                source_path=f"{RCC_DIR}/{bundle}:/{path}", copyright_path=path[len("gcompris/"):],
                read=(lambda d=files[path]: d), credit=credit,
                note="credit from the activity's ActivityInfo.qml" if credit else ""))
    return cands


# ---------------------------------------------------------------- wallpapers

BACKGROUNDS = "usr/share/backgrounds"
LOMIRI = {
    "lomiri-wallpapers-16.04": ("16.04", (
        "Bridge_by_Sander_Klootwijk.jpg", "Dragonfly_by_Bolly.jpg", "Picture_0B_by_freespace.jpg",
        "Picture_1A_by_freespace.jpg", "Wine_by_Jakkub_Mede.jpg", "aitzgorri_by_Aitzol_Berasategi.jpg",
        "free_by_Peter_Nerlich.jpg", "friends_by_Aitzol_Berasategi.jpg", "life_by_Aitzol_Berasategi.jpg",
        "picosdeeuropa_by_Aitzol_Berasategi.jpg", "seeding_by_Clements_Engelhardt.jpg",
        "sunset_by_Aitzol_Berasategi.jpg")),
    "lomiri-wallpapers-20.04": ("20.04", ("Kleiber_by_Lukas_Baubkus.jpg",)),
}
MATE_NATURE = ("Aqua.jpg", "Blinds.jpg", "Dune.jpg", "FreshFlower.jpg", "Garden.jpg", "GreenMeadow.jpg",
               "LadyBird.jpg", "RainDrops.jpg", "Storm.jpg", "TwoWings.jpg", "Wood.jpg", "YellowFlower.jpg")
PLASMA = ("BytheWater", "ColdRipple", "ColorfulCups", "DarkestHour", "EveningGlow", "FallenLeaf", "Grey",
          "Kite", "OneStandsOut", "Path", "summer_1am")


def _file(root: Path, rel: str) -> Callable[[], bytes]:
    return lambda: (root / rel).read_bytes()


def wallpaper_candidates(roots: dict) -> list:
    """The wallpapers that are photos (Lomiri, MATE 'nature', Plasma)."""
    cands = []
    for package, (series, names) in LOMIRI.items():
        for n in names:
            rel = f"{BACKGROUNDS}/{n}"
            cands.append(Candidate(f"lomiri_{slug(n.rsplit('.', 1)[0])}.jpg", package, rel, f"{series}/{n}",
                                   _file(roots[package], rel)))
    for n in MATE_NATURE:
        rel = f"{BACKGROUNDS}/mate/nature/{n}"
        cands.append(Candidate(f"mate_{slug(n.rsplit('.', 1)[0])}.jpg", "mate-backgrounds", rel, f"nature/{n}",
                               _file(roots["mate-backgrounds"], rel)))
    root = roots["plasma-workspace-wallpapers"]
    for n in PLASMA:
        cands.append(_plasma(root, n))
    return cands


def _plasma(root: Path, name: str) -> Candidate:
    folder = root / "usr/share/wallpapers" / name
    # The largest size is the original framing; the others are crops and rescales of it.
    images = sorted((folder / "contents/images").glob("*.jpg"),
                    key=lambda p: int(p.stem.split("x")[0]) * int(p.stem.split("x")[1]))
    rel = str(images[-1].relative_to(root))
    meta = json.loads((folder / "metadata.json").read_text(encoding="utf-8"))["KPlugin"]
    authors = ", ".join(a.get("Name", "") for a in meta.get("Authors", []))
    licence = {"LGPLv3": "LGPL-3.0"}.get(meta.get("License", ""), meta.get("License", ""))
    return Candidate(f"plasma_{slug(name)}.jpg", "plasma-workspace-wallpapers", rel, rel, _file(root, rel),
                     credit=(licence, f"{authors} (metadata.json)"),
                     note="licence and author from the wallpaper's metadata.json")


# ---------------------------------------------------------------- scikit-image

SKIMAGE_DATA = "usr/lib/python3/dist-packages/skimage/data"
# (file, licence, what skimage.data's docstring says about the photo)
SKIMAGE = (
    ("chelsea.png", "CC0-1.0", "Stefan van der Walt: 'No copyright restrictions. CC0 by the photographer'"),
    ("coffee.png", "CC0-1.0", "Rachel Michetti, courtesy of Pikolo Espresso Bar: 'No copyright restrictions. "
                              "CC0 by the photographer'"),
    ("rocket.jpg", "public-domain", "SpaceX, launch of DSCOVR on Falcon 9, released into the public domain"),
)


def skimage_candidates(root: Path) -> list:
    """scikit-image's colour photos whose docstrings state CC0 / public domain."""
    return [Candidate(f"skimage_{slug(f.rsplit('.', 1)[0])}.jpg", "python3-skimage", f"{SKIMAGE_DATA}/{f}",
                      f"skimage/data/{f}", _file(root, f"{SKIMAGE_DATA}/{f}"), credit=(lic, who),
                      note="licence as stated in the skimage.data docstring")
            for f, lic, who in SKIMAGE]


# ---------------------------------------------------------------- scikit-learn

SKLEARN_IMAGES = "usr/lib/python3/dist-packages/sklearn/datasets/images"
# (file, credit) as sklearn/datasets/images/README.txt states them (both CC BY 2.0, from Flickr).
SKLEARN = (
    ("china.jpg", "danielbuechele, https://www.flickr.com/photos/danielbuechele/6061409035/ "
                  "(retrieved 2011-08-21 by Robert Layton)"),
    ("flower.jpg", "vultilion, https://www.flickr.com/photos/vultilion/6056698931/ "
                   "(retrieved 2011-08-21 by Robert Layton; the README's attribution line repeats danielbuechele)"),
)


def sklearn_candidates(root: Path) -> list:
    """scikit-learn's two sample photos (``load_sample_images``), CC BY 2.0."""
    return [Candidate(f"sklearn_{slug(f.rsplit('.', 1)[0])}.jpg", "python3-sklearn", f"{SKLEARN_IMAGES}/{f}",
                      f"sklearn/datasets/images/{f}", _file(root, f"{SKLEARN_IMAGES}/{f}"),
                      credit=("CC-BY-2.0", who), note="licence and credit from sklearn/datasets/images/README.txt")
            for f, who in SKLEARN]
