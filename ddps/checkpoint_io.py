"""Checkpoint files on disk: written atomically with a sha256 sidecar, read back checked.

Every file ddps saves (base and refiner checkpoints, training states) goes through :func:`save_atomic`:
``torch.save`` to a temporary name in the same folder, then a rename, so a partial file never carries the
final name; with ``checksum`` a sidecar ``<name>.sha256`` holds the sha256 of its bytes. Reading is one
function, :func:`read_state_file` (``torch.load(weights_only=True)``: only tensors and plain Python values,
never arbitrary pickles), raising a one-line CheckpointError; :func:`read_checked` is its policy for
training states, where a damaged file is skipped (None) so that the one before it can be used.
:func:`read_foreign_checkpoint` reads other tools' files (mmcv / MMSeg) as weights-only, allowing numpy's
scalar and array reconstructors that their ``meta`` holds and refusing any other global by name.

Core layer: torch, numpy and ddps.errors only, never ray or mlflow.
"""
from __future__ import annotations

import hashlib
import io
import os
import pickle
import re
from pathlib import Path

import torch

from ddps.errors import CheckpointError, reason
from ddps.storage import Location, StoragePath, location


def digest(data: bytes) -> str:
    """sha256 of a checkpoint's bytes (its ``.sha256`` sidecar)."""
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes, read in chunks (a published checkpoint can be large)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def mmcv_state_dict(payload, where: str) -> dict:
    """The state dict of tensors in a foreign checkpoint (mmcv's ``state_dict``, or the payload itself), with a
    DataParallel ``module.`` prefix dropped; a one-line CheckpointError when there is none."""
    state = payload.get("state_dict", payload) if isinstance(payload, dict) else payload
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{where} holds no state dict of tensors (an mmcv checkpoint has 'state_dict')")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}


def shape_of(state: dict, key: str, where: str, layout: str) -> tuple[int, ...]:
    """The shape of ``state[key]``; a one-line CheckpointError when the key is missing (not that ``layout``)."""
    if key not in state or not hasattr(state[key], "shape"):
        raise CheckpointError(f"{where} has no {key}: not {layout}")
    return tuple(state[key].shape)


def sidecar(path: Location) -> Location:
    """The sha256 sidecar beside ``path``: ``<name>.sha256``."""
    return path.with_name(path.name + ".sha256")


def save_atomic(path: str | Location, payload, checksum: bool = False) -> Location:
    """torch.save to a temporary name in the same folder, then rename (and, with ``checksum``, a sha256
    sidecar ``<name>.sha256`` beside it): a partial file never carries the final name. A failed write (an
    unwritable folder, a full disk) is a one-line CheckpointError and leaves no temporary file behind. In an
    object store (a URI) each file is one PUT, which is visible only once whole."""
    path = location(path)
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    data = buffer.getvalue()
    if isinstance(path, StoragePath):
        try:
            path.write_bytes(data)
            if checksum:
                sidecar(path).write_text(digest(data))
        except OSError as e:
            try:  # a checkpoint without its sidecar would pass for a finished one
                path.unlink(missing_ok=True)
            except OSError:
                pass
            raise CheckpointError(f"cannot write {path}: {reason(e).splitlines()[0]}") from None
        return path
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


def read_state_file(path: str | Location, what: str, require_checksum: bool = False):
    """``torch.load(weights_only=True)`` of a file, with a one-line CheckpointError when it is missing or
    unreadable (truncated archive, pickled objects that are not plain tensors and values) or fails its
    sha256 sidecar. The sidecar is checked when it is there (ddps's own files); with ``require_checksum``
    a file without one is refused too (a training state always has one). ``path`` may be a storage URI."""
    path = location(path)
    try:
        missing = not path.is_file()
    except OSError as e:  # a store that does not answer
        raise CheckpointError(f"{what} {path} cannot be read ({reason(e).splitlines()[0]})") from None
    if missing:
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


def _numpy_globals() -> list:
    """The numpy reconstructors an mmcv checkpoint's ``meta`` needs (numpy scalars such as an
    ``np.float64`` learning rate, small arrays, their dtypes), also under numpy 1.x's names
    (``numpy.core.multiarray.*``): nothing that runs code, and no object arrays (``ObjectDType`` is left out)."""
    import numpy as np
    multiarray = getattr(np, "_core", None)
    multiarray = multiarray.multiarray if multiarray is not None else np.core.multiarray
    scalar, rebuild = multiarray.scalar, multiarray._reconstruct
    dtypes = [getattr(np.dtypes, name) for name in dir(getattr(np, "dtypes", None))
              if name.endswith("DType") and name not in ("ObjectDType", "VoidDType", "StringDType")]
    return [scalar, rebuild, np.dtype, np.ndarray, *dtypes,
            (scalar, "numpy.core.multiarray.scalar"), (rebuild, "numpy.core.multiarray._reconstruct"),
            (scalar, "numpy._core.multiarray.scalar"), (rebuild, "numpy._core.multiarray._reconstruct")]


_UNSAFE_GLOBAL = re.compile(r"Unsupported global: GLOBAL (\S+)|got <class '([^']+)'>")


def read_foreign_checkpoint(path: str | Path, what: str) -> dict:
    """A checkpoint from elsewhere (mmcv / MMSeg: ``{"meta": …, "state_dict": …}``, sometimes ``optimizer``)
    read weights-only: ``torch.load(weights_only=True)`` with numpy's scalar, dtype and array reconstructors
    allowed and nothing else. A pickle that needs any other global (a foreign class, a function) is refused
    with one CheckpointError naming it; a missing or truncated file is one line as in :func:`read_state_file`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} {path} does not exist")
    try:
        with torch.serialization.safe_globals(_numpy_globals()):
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = _UNSAFE_GLOBAL.search(str(e))
        if not found:
            raise CheckpointError(f"{what} {path} is unreadable (UnpicklingError: {reason(e)})") from None
        name = found.group(1) or found.group(2)
        raise CheckpointError(f"{what} {path} needs {name}, which is not a tensor, plain value or numpy "
                              f"scalar or array: refused (weights-only loading)") from None
    except Exception as e:
        raise CheckpointError(f"{what} {path} is unreadable ({type(e).__name__}: {reason(e)})") from None
    if not isinstance(payload, dict):
        raise CheckpointError(f"{what} {path} holds a {type(payload).__name__}, not a dict of weights")
    return payload


def read_checked(path: Location):
    """The payload of a file written by :func:`write_checked`; None when it is missing, has no sidecar,
    fails its checksum or cannot be read (the training-state fallback then takes the one before it)."""
    try:
        return read_state_file(path, "training state", require_checksum=True)
    except CheckpointError:
        return None
