"""The persistent work folder (DDPS_HOME) that holds caches, checkpoints and the embedded MLflow store."""
from __future__ import annotations

import os
from pathlib import Path


def ddps_home() -> Path:
    """DDPS_HOME, else $XDG_CACHE_HOME/ddps, else ~/.cache/ddps; created on first use."""
    root = os.environ.get("DDPS_HOME")
    if root:
        home = Path(root).expanduser()
    else:
        cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
        home = Path(cache).expanduser() / "ddps"
    home = home.resolve()
    home.mkdir(parents=True, exist_ok=True)
    return home


def cache_dir(kind: str) -> Path:
    """A sub-folder of DDPS_HOME, e.g. cache_dir('datasets')."""
    path = ddps_home() / kind
    path.mkdir(parents=True, exist_ok=True)
    return path
