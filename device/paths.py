"""Where per-user files live: an environment override, else the XDG base directories.

Nothing is ever written into the current directory unless the user names it.
"""
from __future__ import annotations

import os
from pathlib import Path

_XDG = {
    "data": ("XDG_DATA_HOME", (".local", "share")),
    "state": ("XDG_STATE_HOME", (".local", "state")),
    "cache": ("XDG_CACHE_HOME", (".cache",)),
}


def user_dir(kind: str, *parts: str, env: str) -> Path:
    """``$env`` when set, else ``$XDG_<KIND>_HOME/<parts>`` (``~/.local/share`` etc.)."""
    override = os.environ.get(env)
    if override:
        return Path(override)
    var, default = _XDG[kind]
    base = os.environ.get(var) or os.path.join(os.path.expanduser("~"), *default)
    return Path(base).joinpath(*parts)
