"""Per-user locations: environment override, XDG variables, home-directory defaults."""
from pathlib import Path

from edgepipe.device.paths import user_dir


def test_env_override_wins(monkeypatch, tmp_path):
    monkeypatch.setenv("EDGERUN_SPOOL", str(tmp_path / "spool"))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    assert user_dir("state", "edgerun", "spool", env="EDGERUN_SPOOL") == tmp_path / "spool"


def test_xdg_variable_then_home_default(monkeypatch, tmp_path):
    monkeypatch.delenv("EDGEPIPE_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "c"))
    assert user_dir("cache", "edgepipe", env="EDGEPIPE_CACHE") == tmp_path / "c" / "edgepipe"
    monkeypatch.delenv("XDG_DATA_HOME", raising=False)
    monkeypatch.delenv("EDGEPIPE_DB", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert user_dir("data", "edgepipe", "results.db", env="EDGEPIPE_DB") == \
        Path(tmp_path / "home" / ".local" / "share" / "edgepipe" / "results.db")
