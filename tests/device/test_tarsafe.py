"""Bundle tars from the network are untrusted: traversal, links, devices, bombs."""
from __future__ import annotations

import io
import tarfile

import pytest

from edgepipe.device.tarsafe import UnsafeArchive, safe_extract


def make_tar(path, members):
    """members: list of (TarInfo kwargs, bytes or None)."""
    with tarfile.open(path, "w") as tar:
        for kw, data in members:
            info = tarfile.TarInfo(kw.pop("name"))
            for k, v in kw.items():
                setattr(info, k, v)
            if data is not None:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                tar.addfile(info)
    return path


def test_regular_files_and_dirs_are_extracted(tmp_path):
    tar = make_tar(tmp_path / "ok.tar", [
        ({"name": "b", "type": tarfile.DIRTYPE}, None),
        ({"name": "./b/model.tflite"}, b"abc"),
        ({"name": "manifest.json"}, b"{}"),
    ])
    out = safe_extract(tar, tmp_path / "x", max_bytes=100)
    assert (out / "b" / "model.tflite").read_bytes() == b"abc"
    assert (out / "manifest.json").read_bytes() == b"{}"


@pytest.mark.parametrize("name,reason", [
    ("/etc/evil", "absolute"),
    ("../evil", "'..'"),
    ("a/../../evil", "'..'"),
    ("a/../b", "'..'"),
])
def test_traversal_is_refused_and_nothing_written(tmp_path, name, reason):
    tar = make_tar(tmp_path / "t.tar", [({"name": "fine.txt"}, b"ok"), ({"name": name}, b"x")])
    with pytest.raises(UnsafeArchive, match=reason):
        safe_extract(tar, tmp_path / "x", max_bytes=100)
    # Checked before writing: not even the harmless first member landed.
    assert not (tmp_path / "x" / "fine.txt").exists()
    assert not (tmp_path / "evil").exists()


@pytest.mark.parametrize("kind", [tarfile.SYMTYPE, tarfile.LNKTYPE])
def test_links_are_refused(tmp_path, kind):
    tar = make_tar(tmp_path / "l.tar", [({"name": "model.tflite", "type": kind, "linkname": "/etc/passwd"},
                                         None)])
    with pytest.raises(UnsafeArchive, match="links"):
        safe_extract(tar, tmp_path / "x", max_bytes=100)
    assert not (tmp_path / "x" / "model.tflite").exists()


@pytest.mark.parametrize("kind", [tarfile.CHRTYPE, tarfile.BLKTYPE, tarfile.FIFOTYPE])
def test_devices_and_fifos_are_refused(tmp_path, kind):
    tar = make_tar(tmp_path / "d.tar", [({"name": "dev", "type": kind, "devmajor": 1, "devminor": 3}, None)])
    with pytest.raises(UnsafeArchive, match="device|FIFO"):
        safe_extract(tar, tmp_path / "x", max_bytes=100)


def test_size_cap_counts_all_members(tmp_path):
    tar = make_tar(tmp_path / "big.tar", [({"name": "a"}, b"x" * 60), ({"name": "b"}, b"y" * 60)])
    with pytest.raises(UnsafeArchive, match="exceeds"):
        safe_extract(tar, tmp_path / "x", max_bytes=100)
    safe_extract(tar, tmp_path / "y", max_bytes=120)


def test_gzip_bomb_is_capped_by_unpacked_size(tmp_path):
    path = tmp_path / "bomb.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo("model.tflite")
        info.size = 5 << 20
        tar.addfile(info, io.BytesIO(bytes(5 << 20)))
    assert path.stat().st_size < 100_000
    with pytest.raises(UnsafeArchive, match="exceeds"):
        safe_extract(path, tmp_path / "x", max_bytes=1 << 20)


def test_duplicate_member_and_garbage_are_refused(tmp_path):
    tar = make_tar(tmp_path / "dup.tar", [({"name": "a"}, b"1"), ({"name": "./a"}, b"2")])
    with pytest.raises(UnsafeArchive, match="twice"):
        safe_extract(tar, tmp_path / "x", max_bytes=100)
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"this is not a tar file at all" * 30)
    with pytest.raises(UnsafeArchive, match="not a readable tar"):
        safe_extract(junk, tmp_path / "y", max_bytes=100)


@pytest.mark.parametrize("members", [
    [({"name": "a"}, b"file"), ({"name": "a/b"}, b"x")],                      # a file, then a path under it
    [({"name": "a/b"}, b"x"), ({"name": "a"}, b"file")],                      # the other order
    [({"name": "a", "type": tarfile.DIRTYPE}, None), ({"name": "a/b"}, b"x"), ({"name": "a/b/c"}, b"y")],
])
def test_file_versus_directory_conflict_is_a_typed_422_without_local_paths(tmp_path, members):
    from edgepipe.device.errors import EdgepipeError
    from edgepipe.device.tarsafe import ArchiveConflict

    tar = make_tar(tmp_path / "c.tar", members)
    dest = tmp_path / "store" / "incoming"
    with pytest.raises(ArchiveConflict) as e:
        safe_extract(tar, dest, max_bytes=100)
    assert isinstance(e.value, EdgepipeError) and isinstance(e.value, UnsafeArchive)
    assert e.value.status == 422
    assert str(tmp_path) not in str(e.value) and "\n" not in str(e.value)
    assert "a" in str(e.value)
    assert list(dest.iterdir()) == []  # refused before anything was written


def test_directory_members_after_their_files_are_fine(tmp_path):
    tar = make_tar(tmp_path / "ok.tar", [({"name": "b/model.tflite"}, b"abc"),
                                         ({"name": "b", "type": tarfile.DIRTYPE}, None)])
    assert (safe_extract(tar, tmp_path / "x", max_bytes=100) / "b" / "model.tflite").read_bytes() == b"abc"
