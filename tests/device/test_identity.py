"""Stable device identity: made once, kept, per state directory; name and tags for people."""
import json
import subprocess
import sys

import pytest

from edgepipe.device.identity import IdentityError, load_identity
from edgepipe.device.sysinfo import device_info


def test_identity_is_created_once_and_kept(tmp_path):
    first = load_identity(tmp_path)
    again = load_identity(tmp_path)
    assert first == again and first.id.startswith("ep-") and len(first.id) == 19
    assert json.loads((tmp_path / "identity.json").read_text())["id"] == first.id


def test_two_state_directories_are_two_devices(tmp_path):
    a, b = load_identity(tmp_path / "a"), load_identity(tmp_path / "b")
    assert a.id != b.id


def test_name_and_tags_are_saved_and_the_id_survives(tmp_path):
    ident = load_identity(tmp_path)
    named = load_identity(tmp_path, name="bench-pi-3", tags=["lab", "pi4", "lab"])
    assert named.id == ident.id and named.name == "bench-pi-3" and named.tags == ("lab", "pi4")
    assert load_identity(tmp_path) == named
    assert named.to_dict() == {"id": ident.id, "name": "bench-pi-3", "tags": ["lab", "pi4"]}


@pytest.mark.parametrize("content", ["not json", "[]", '{"id": "../../etc"}'])
def test_a_broken_identity_file_is_refused_in_one_line(tmp_path, content):
    (tmp_path / "identity.json").write_text(content)
    with pytest.raises(IdentityError) as e:
        load_identity(tmp_path)
    assert "\n" not in str(e.value)
    assert (tmp_path / "identity.json").read_text() == content  # never overwritten


def test_bad_tag_is_refused(tmp_path):
    with pytest.raises(IdentityError, match="bad tag"):
        load_identity(tmp_path, tags=["has space"])


def test_no_create_gives_none(tmp_path):
    assert load_identity(tmp_path, create=False) is None
    assert not (tmp_path / "identity.json").exists()


def test_reports_carry_the_identity_and_keep_the_hostname(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGERUN_STATE", str(tmp_path))
    ident = load_identity(tmp_path, name="desk")
    dev = device_info()
    assert dev["id"] == ident.id and dev["name"] == "desk" and dev["hostname"]


def test_two_processes_sharing_a_state_dir_agree(tmp_path):
    code = ("from edgepipe.device.identity import load_identity; import sys; "
            "print(load_identity(sys.argv[1]).id)")
    ids = {subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True,
                          check=True).stdout.strip() for _ in range(2)}
    assert len(ids) == 1


def _agent_identity(store, env):
    import urllib.request

    proc = subprocess.Popen([sys.executable, "-m", "edgepipe.device.cli", "agent", "--port", "0", "--store", str(store)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert "agent listening on " in line, line + proc.stderr.read()
        with urllib.request.urlopen(line.split()[3] + "/v1/info", timeout=10) as r:
            return json.loads(r.read())["id"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.slow  # 10-45 s under arm64 emulation (process start-ups); nothing here depends on the CPU or runtime
def test_two_agents_on_one_machine_are_two_devices(tmp_path):
    import os

    env = {k: v for k, v in os.environ.items() if k not in ("EDGERUN_STATE", "EDGERUN_TOKEN")}
    env["HOME"] = str(tmp_path / "home")  # the default state dir, should anything fall back to it
    a = _agent_identity(tmp_path / "a", env)
    b = _agent_identity(tmp_path / "b", env)
    assert a != b and a == _agent_identity(tmp_path / "a", env)  # and each keeps its own across restarts
    assert json.loads((tmp_path / "a" / "identity.json").read_text())["id"] == a
