"""A board's stable identity: a random id made on first start and kept in its state directory.

Hostnames collide (every Raspberry Pi that keeps the default is ``raspberrypi``)
and two agents on one machine are two devices, so reports carry this id; the
hostname stays an attribute. ``name`` and ``tags`` are for people and fleets
(``edgepipe bench --devices tag:lab``).

The identity lives in ``identity.json`` in the state directory:
``$EDGERUN_STATE`` when set, else ``~/.local/state/edgerun``. An agent started
with its own store keeps its identity there, so each agent is its own device.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Tuple

from edgepipe.device.errors import EdgepipeError
from edgepipe.device.paths import user_dir

STATE_ENV = "EDGERUN_STATE"
FILE = "identity.json"
MAX_FILE = 64 << 10
_ID = re.compile(r"^[a-z0-9][a-z0-9-]{7,63}$")
_TAG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")


class IdentityError(EdgepipeError):
    """An identity file that cannot be read or written, or a bad name/tag."""


@dataclass(frozen=True)
class DeviceIdentity:
    """Who a board is: ``id`` never changes; ``name`` and ``tags`` may."""

    id: str
    name: Optional[str] = None
    tags: Tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict:
        """The report's ``device`` fields (``name``/``tags`` only when set)."""
        out: dict = {"id": self.id}
        if self.name:
            out["name"] = self.name
        if self.tags:
            out["tags"] = list(self.tags)
        return out


def state_dir() -> Path:
    """``$EDGERUN_STATE`` or ``~/.local/state/edgerun``."""
    return user_dir("state", "edgerun", env=STATE_ENV)


def new_id() -> str:
    """A fresh device id: ``ep-`` and 16 random hex digits."""
    return "ep-" + secrets.token_hex(8)


def check_tags(tags: Sequence[str]) -> Tuple[str, ...]:
    """Tags as a sorted, de-duplicated tuple; one-line error for a malformed tag."""
    out = set()
    for t in tags:
        if not _TAG.match(t or ""):
            raise IdentityError(f"bad tag {t!r}: use letters, digits and _.:- (at most 64 characters)")
        out.add(t)
    return tuple(sorted(out))


def _read(path: Path) -> Optional[dict]:
    try:
        if path.stat().st_size > MAX_FILE:
            raise IdentityError(f"{path} is too large to be an identity file")
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise IdentityError(f"cannot read the device identity {path}: {e}") from None
    if not isinstance(doc, dict) or not _ID.match(str(doc.get("id", ""))):
        raise IdentityError(f"{path} is not a device identity file (no valid id); move it aside to make a new one")
    return doc


def _write(path: Path, doc: dict, *, exclusive: bool = False) -> bool:
    """Atomically write ``doc``; with ``exclusive`` never replace an existing file (False then)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".identity-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        if not exclusive:
            os.replace(tmp, path)
            return True
        try:
            os.link(tmp, path)  # two first starts at once: one id wins, the other reads it
            return True
        except FileExistsError:
            return False
    finally:
        Path(tmp).unlink(missing_ok=True)


def load_identity(directory: Optional[os.PathLike] = None, *, name: Optional[str] = None,
                  tags: Optional[Sequence[str]] = None, create: bool = True) -> Optional[DeviceIdentity]:
    """The identity kept in ``directory`` (default :func:`state_dir`), made on first use.

    ``name``/``tags`` given here replace the stored ones (and are saved). With
    ``create=False`` a missing file gives ``None`` instead of a new identity.
    """
    path = Path(directory or state_dir()) / FILE
    doc = _read(path)
    if doc is None and not create:
        return None
    if doc is None:
        doc = _create(path)
    if _apply(doc, name, tags):
        _save(path, doc)
    return DeviceIdentity(id=doc["id"], name=doc.get("name"), tags=check_tags(doc.get("tags") or ()))


def _save(path: Path, doc: dict, *, exclusive: bool = False) -> bool:
    try:
        return _write(path, doc, exclusive=exclusive)
    except OSError as e:
        raise IdentityError(f"cannot save the device identity in {path.parent}: {e.strerror or e}") from None


def _create(path: Path) -> dict:
    """A new identity file, or the one a concurrent first start wrote a moment before."""
    created = _save(path, {"id": new_id()}, exclusive=True)
    doc = _read(path) if created or path.exists() else None
    if doc is None:
        raise IdentityError(f"cannot read back the device identity {path}")
    return doc


def _apply(doc: dict, name: Optional[str], tags: Optional[Sequence[str]]) -> bool:
    """Put ``name``/``tags`` (when given) into ``doc``; True when that changed it."""
    changed = False
    if name is not None and doc.get("name") != (name or None):
        if len(name) > 128 or "\n" in name:
            raise IdentityError("a device name is one line of at most 128 characters")
        doc["name"], changed = name or None, True
    if tags is not None and tuple(doc.get("tags") or ()) != check_tags(tags):
        doc["tags"], changed = list(check_tags(tags)), True
    return changed


def current_identity() -> Optional[DeviceIdentity]:
    """This process's identity for reports, or ``None`` when it cannot be had (read-only home)."""
    try:
        return load_identity()
    except IdentityError:
        return None
