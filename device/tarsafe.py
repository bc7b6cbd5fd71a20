"""Extract a bundle tar without trusting it.

An upload could try to write outside the store (absolute paths, ``..``), plant
links that later redirect writes, create device nodes or FIFOs, or fill the
disk. Every member is checked before a single byte is written; only regular
files and directories are accepted, each written with a fresh ``O_EXCL`` open.
"""
from __future__ import annotations

import os
import posixpath
import tarfile
from pathlib import Path

from edgepipe.device.errors import EdgepipeError

DEFAULT_MAX_MEMBERS = 256


class UnsafeArchive(EdgepipeError):
    """The archive is refused; the message names the member (as the archive spells it) and the reason.

    ``status`` is the HTTP answer for an upload (422: well-formed but unusable);
    messages never hold a path on this machine.
    """

    status = 422


class ArchiveConflict(UnsafeArchive):
    """Two members claim one path as both a file and a directory (``a`` then ``a/b``)."""


def _clean_name(name: str) -> str:
    if not name or "\x00" in name:
        raise UnsafeArchive(f"member {name!r}: empty or NUL in name")
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        raise UnsafeArchive(f"member {name!r}: absolute paths are not allowed")
    parts = name.replace("\\", "/").split("/")
    if ".." in parts:
        raise UnsafeArchive(f"member {name!r}: '..' is not allowed")
    norm = posixpath.normpath("/".join(p for p in parts if p not in ("", ".")) or ".")
    return norm


def check_members(tar: tarfile.TarFile, *, max_bytes: int,
                  max_members: int = DEFAULT_MAX_MEMBERS) -> list:
    """Return the members to extract, or raise UnsafeArchive for the first bad one."""
    members, seen, explicit, total = [], {}, set(), 0
    for m in tar:
        if len(members) >= max_members:
            raise UnsafeArchive(f"more than {max_members} members")
        name = _clean_name(m.name)
        if m.issym() or m.islnk():
            raise UnsafeArchive(f"member {m.name!r}: links are not allowed")
        if m.ischr() or m.isblk() or m.isfifo() or m.isdev():
            raise UnsafeArchive(f"member {m.name!r}: device files and FIFOs are not allowed")
        if not (m.isreg() or m.isdir()):
            raise UnsafeArchive(f"member {m.name!r}: only regular files and directories are allowed")
        if name == ".":
            continue
        if name in explicit:
            raise UnsafeArchive(f"member {m.name!r}: appears twice")
        explicit.add(name)
        _claim(seen, name, m)
        if m.isreg():
            total += m.size
            if total > max_bytes:
                raise UnsafeArchive(f"unpacked size exceeds the limit of {max_bytes} bytes")
        members.append((name, m))
    return members


def _claim(seen: dict, name: str, m: tarfile.TarInfo) -> None:
    """Record ``name`` and its parents, refusing a path that is both a file and a directory."""
    parts = name.split("/")
    for i in range(1, len(parts)):
        parent = "/".join(parts[:i])
        if seen.setdefault(parent, "dir") == "file":
            raise ArchiveConflict(f"member {m.name!r}: {parent!r} is a file in this archive, not a directory")
    if m.isreg() and seen.get(name) == "dir":
        raise ArchiveConflict(f"member {m.name!r}: a directory of that name is already in this archive")
    seen[name] = "dir" if m.isdir() else "file"


def safe_extract(archive: os.PathLike, dest: os.PathLike, *, max_bytes: int,
                 max_members: int = DEFAULT_MAX_MEMBERS) -> Path:
    """Extract the tar (optionally gzip'd) at ``archive`` into the empty dir ``dest``."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(archive, mode="r:*") as tar:
            members = check_members(tar, max_bytes=max_bytes, max_members=max_members)
            written = 0
            for name, m in members:
                target = dest / name
                if m.isdir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                src = tar.extractfile(m)
                if src is None:
                    raise UnsafeArchive(f"member {m.name!r}: unreadable")
                fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                with os.fdopen(fd, "wb") as out:
                    while True:
                        chunk = src.read(1 << 16)
                        if not chunk:
                            break
                        written += len(chunk)
                        if written > max_bytes:  # belt and braces vs. lying headers
                            raise UnsafeArchive(f"unpacked size exceeds the limit of {max_bytes} bytes")
                        out.write(chunk)
    except tarfile.TarError as e:
        raise UnsafeArchive(f"not a readable tar archive: {e}") from None
    return dest
