"""Checkpoint files on disk: written atomically with a sha256 sidecar, read back checked.

Every file ddps saves (base and refiner checkpoints, training states) goes through :func:`save_atomic`:
``torch.save`` to a temporary name in the same folder, then a rename, so a partial file never carries the
final name; with ``checksum`` a sidecar ``<name>.sha256`` holds the sha256 of its bytes. Reading is one
function, :func:`read_state_file` (``torch.load(weights_only=True)``: only tensors and plain Python values,
never arbitrary pickles), raising a one-line CheckpointError; :func:`read_checked` is its policy for
training states, where a damaged file is skipped (None) so that the one before it can be used.

Core layer: torch and ddps.errors only, never ray or mlflow.
"""
from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import torch

from ddps.errors import CheckpointError, reason


def digest(data: bytes) -> str:
    """sha256 of a checkpoint's bytes (its ``.sha256`` sidecar)."""
    return hashlib.sha256(data).hexdigest()


def sidecar(path: Path) -> Path:
    """The sha256 sidecar beside ``path``: ``<name>.sha256``."""
    return path.with_name(path.name + ".sha256")


def save_atomic(path: str | Path, payload, checksum: bool = False) -> Path:
    """torch.save to a temporary name in the same folder, then rename (and, with ``checksum``, a sha256
    sidecar ``<name>.sha256`` beside it): a partial file never carries the final name. A failed write (an
    unwritable folder, a full disk) is a one-line CheckpointError and leaves no temporary file behind."""
    path = Path(path)
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    data = buffer.getvalue()
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    side = sidecar(path)
    side_tmp = side.with_name(f".{side.name}.tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(data)
        if checksum:
            side_tmp.write_text(digest(data))
        os.replace(tmp, path)
        if checksum:
            os.replace(side_tmp, side)
    except OSError as e:
        for leftover in (tmp, side_tmp):
            try:
                leftover.unlink(missing_ok=True)
            except OSError:
                pass
        raise CheckpointError(f"cannot write {path}: {e.strerror or reason(e)}") from None
    return path


def write_checked(path: Path, payload) -> Path:
    """A training state: written atomically with a sha256 sidecar, read back by :func:`read_checked`."""
    return save_atomic(path, payload, checksum=True)


def read_state_file(path: str | Path, what: str, require_checksum: bool = False):
    """``torch.load(weights_only=True)`` of a file, with a one-line CheckpointError when it is missing or
    unreadable (truncated archive, pickled objects that are not plain tensors and values) or fails its
    sha256 sidecar. The sidecar is checked when it is there (ddps's own files); with ``require_checksum``
    a file without one is refused too (a training state always has one)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} {path} does not exist")
    side = sidecar(path)  # written beside ddps's own checkpoints (save_atomic)
    try:
        data = path.read_bytes()
        if require_checksum and not side.is_file():
            raise CheckpointError(f"{what} {path} has no sha256 checksum ({side.name})")
        if side.is_file() and side.read_text().strip() != digest(data):
            raise CheckpointError(f"{what} {path} fails its sha256 checksum ({side.name}): truncated or altered; "
                                  f"restore it, or delete it to train it again")
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"{what} {path} is unreadable ({type(e).__name__}: {reason(e)})") from None


def read_checked(path: Path):
    """The payload of a file written by :func:`write_checked`; None when it is missing, has no sidecar,
    fails its checksum or cannot be read (the training-state fallback then takes the one before it)."""
    try:
        return read_state_file(path, "training state", require_checksum=True)
    except CheckpointError:
        return None
