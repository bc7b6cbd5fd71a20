"""edgepipe.device.bundle: the manifest is checked against its schema, paths stay inside the bundle, reads are bounded."""
from __future__ import annotations

import json
import os
import threading
import time

import pytest

from edgepipe.device import bundle as bundle_mod
from edgepipe.device.bundle import (EDGETPU_MODEL, LABELS, MANIFEST, MODEL, BundleError, load_bundle, read_labels)
from edgepipe.device.errors import EdgepipeError


@pytest.fixture
def good(make_bundle, uint8_io_model):
    return make_bundle(uint8_io_model, name="tiny", recipe="int8-io", labels=["a", "b", "c", "d"])


def edit_manifest(d, **changes):
    m = json.loads((d / MANIFEST).read_text())
    m.update(changes)
    (d / MANIFEST).write_text(json.dumps(m))
    return m


def refused(d, match):
    with pytest.raises(BundleError, match=match) as ei:
        load_bundle(d)
    msg = str(ei.value)
    assert "\n" not in msg and len(msg) < 400 and "--" not in msg
    return msg


def test_good_bundle_loads_with_labels(good):
    b = load_bundle(good)
    assert b.labels == ("a", "b", "c", "d") and b.model_path == good / MODEL and b.manifest.model_file == MODEL
    assert b.edgetpu_model_path() is None


# --------------------------------------------------------------------------- schema


@pytest.mark.parametrize("change, where", [
    (dict(inputs=[]), "inputs"),
    (dict(task="segmentation-ish"), "task"),
    (dict(name=""), "name"),
    (dict(model={"file": MODEL, "sha256": "x" * 64, "size": 1}), "model.sha256"),
    (dict(preprocess={"height": 8, "width": 8, "color": "rgb", "resize": "stretch", "mean": [0], "std": [0]}),
     r"preprocess.std\[0\]"),
    (dict(outputs=[{"name": "y", "shape": [1, "4"], "dtype": "float32"}]), r"outputs\[0\].shape\[1\]"),
])
def test_manifest_breaking_its_schema_is_refused_with_the_path(good, change, where):
    edit_manifest(good, **change)
    msg = refused(good, "invalid manifest: " + where)
    assert str(good / MODEL) not in msg


def test_unknown_schema_and_bad_json_are_one_line(good):
    edit_manifest(good, schema="edgepipe.bundle/9")
    refused(good, "unsupported bundle schema 'edgepipe.bundle/9'")
    (good / MANIFEST).write_text("{not json")
    refused(good, "unreadable manifest")
    (good / MANIFEST).write_text("[" * 100_000 + "]" * 100_000)
    refused(good, "unreadable manifest|invalid manifest")


# --------------------------------------------------------------------------- confinement


def test_dev_zero_labels_are_refused_without_reading(good):
    edit_manifest(good, labels="/dev/zero")
    t0 = time.monotonic()
    refused(good, "not a plain path inside the bundle")
    assert time.monotonic() - t0 < 10  # generous: reading /dev/zero would never end


@pytest.mark.parametrize("field, value", [
    ("labels", "../labels.txt"), ("labels", "sub/../../x"), ("labels", "/etc/hostname"),
    ("model", {"file": "/etc/hostname"}), ("model", {"file": "../model.tflite"}),
])
def test_manifest_paths_outside_the_bundle_are_refused(good, field, value):
    m = json.loads((good / MANIFEST).read_text())
    if field == "model":
        value = {**m["model"], **value}
    (good.parent / "labels.txt").write_text("outside\n")
    edit_manifest(good, **{field: value})
    refused(good, "not a plain path inside the bundle")


def test_symlinks_leading_out_are_refused_and_inside_ones_kept(good, tmp_path):
    outside = tmp_path / "secret.txt"
    outside.write_text("secret\n")
    (good / LABELS).unlink()
    (good / LABELS).symlink_to(outside)
    refused(good, "points outside the bundle")
    (good / LABELS).unlink()
    (good / "real-labels.txt").write_text("x\ny\n")
    (good / LABELS).symlink_to("real-labels.txt")
    assert load_bundle(good).labels == ("x", "y")


@pytest.mark.parametrize("name", [MODEL, MANIFEST, EDGETPU_MODEL])
def test_model_manifest_and_edgetpu_symlinks_out_are_refused(good, tmp_path, name):
    target = tmp_path / f"elsewhere-{name}"
    if (good / name).exists():
        os.replace(good / name, target)
    else:
        target.write_bytes(b"TFL3")
    (good / name).symlink_to(target)
    refused(good, "points outside the bundle")


def test_non_regular_files_are_refused_without_blocking(good):
    (good / LABELS).unlink()
    os.mkfifo(good / LABELS)  # a reader would block forever waiting for a writer
    errors = []

    def load():
        try:
            load_bundle(good)
        except BundleError as e:
            errors.append(str(e))

    t = threading.Thread(target=load, daemon=True)
    t.start()
    t.join(timeout=20)
    assert not t.is_alive(), "load_bundle blocked on a fifo"
    assert errors and "not a regular file" in errors[0]
    os.unlink(good / LABELS)
    os.mkdir(good / LABELS)
    refused(good, "not a regular file")


# --------------------------------------------------------------------------- sizes


def test_oversized_manifest_is_refused(good, monkeypatch):
    m = json.loads((good / MANIFEST).read_text())
    m["extra"] = {"pad": "x" * (bundle_mod.MAX_MANIFEST_BYTES + 10)}
    (good / MANIFEST).write_text(json.dumps(m))
    refused(good, "manifest is .* over the 1048576-byte limit")


def test_oversized_labels_are_refused(good, monkeypatch):
    (good / LABELS).write_bytes(b"x" * (bundle_mod.MAX_LABELS_BYTES + 1))
    refused(good, "labels file is .* over the 4194304-byte limit")
    (good / LABELS).write_text("a\n" * (bundle_mod.MAX_LABELS_LINES + 1))
    refused(good, "over the 100000 limit")
    (good / LABELS).write_bytes(b"caf\xe9\n")
    refused(good, "not UTF-8")


def test_read_labels_bound_holds_on_a_growing_file(tmp_path, monkeypatch):
    # The size is checked on the open file and the read itself stops at limit + 1.
    monkeypatch.setattr(bundle_mod, "MAX_LABELS_BYTES", 10)
    p = tmp_path / "l.txt"
    p.write_text("a\nb\n")
    assert read_labels(p) == ["a", "b"]
    p.write_text("a\r\nb\r\n\n  \n")
    assert read_labels(p) == ["a", "b"]
    p.write_text("0123456789abc")
    with pytest.raises(BundleError, match="over the 10-byte limit") as ei:
        read_labels(p)
    assert isinstance(ei.value, EdgepipeError)
