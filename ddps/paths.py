"""The persistent work folder (DDPS_HOME) that holds caches, checkpoints and the embedded MLflow store."""
from __future__ import annotations

import os
import re
from pathlib import Path


def ddps_home() -> Path:
    """DDPS_HOME, else $XDG_CACHE_HOME/ddps, else ~/.cache/ddps; created on first use."""
    root = os.environ.get("DDPS_HOME")
    if root:
        home = Path(root).expanduser()
    else:
        cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
        home = Path(cache).expanduser() / "ddps"
    return writable_folder(home.resolve(), "DDPS_HOME")


def cache_dir(kind: str) -> Path:
    """A sub-folder of DDPS_HOME, e.g. cache_dir('datasets')."""
    return writable_folder(ddps_home() / kind, "DDPS_HOME folder")


def writable_folder(path: Path, what: str, hint: str = "set DDPS_HOME to a writable folder") -> Path:
    """``path``, created if missing; a one-line ConfigError (ending in ``hint``) if it cannot be created or written."""
    from ddps.errors import ConfigError
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"{what} {path} cannot be created ({e.strerror or e}); {hint}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"{what} {path} is not writable; {hint}")
    return path


SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def is_safe_name(name: str) -> bool:
    return bool(SAFE_NAME.fullmatch(name)) and ".." not in name


def safe_name(name: str, what: str) -> str:
    """A name that becomes a file or folder name (an MLflow experiment, a table): letters, digits, '.', '_'
    and '-', starting with a letter or digit, so it cannot escape its folder; else a one-line ConfigError."""
    from ddps.errors import ConfigError
    if not is_safe_name(name):
        raise ConfigError(f"{what} {name!r} is not a safe name: use letters, digits, '.', '_' and '-' "
                          f"(at most 100, starting with a letter or digit, no '..')")
    return name
