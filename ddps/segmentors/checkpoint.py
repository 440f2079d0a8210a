"""Base segmentor checkpoints: weights + the flat config that built them + what they scored.

Written to a temporary name and renamed, so a partial file never sits under the final name; read with
``torch.load(weights_only=True)``: only tensors and plain Python values, never arbitrary pickles.
"""
from __future__ import annotations

import io
import os
from pathlib import Path

import torch

from ddps.errors import CheckpointError, reason
from ddps.segmentors.base import BaseSegmentor, SegmentorSpec, check_state, digest, read_state_file

KIND_BASE = "base_segmentor"


def base_payload(model: BaseSegmentor, *, config: dict, class_names, metrics: dict, history: list,
                 content_hash: str) -> dict:
    return {
        "kind": KIND_BASE, "spec": dict(model.spec.__dict__), "config": config,
        "class_names": list(class_names), "metrics": metrics, "history": history, "hash": content_hash,
        "model": model.state_dict(),
    }


def save_base(path: str | Path, model: BaseSegmentor, **kwargs) -> Path:
    return save_atomic(path, base_payload(model, **kwargs), checksum=True)


def save_atomic(path: str | Path, payload, checksum: bool = False) -> Path:
    """torch.save to a temporary name in the same folder, then rename (and, with ``checksum``, a sha256
    sidecar ``<name>.sha256`` beside it): a partial file never carries the final name. A failed write (an
    unwritable folder, a full disk) is a one-line CheckpointError and leaves no temporary file behind."""
    path = Path(path)
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    data = buffer.getvalue()
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    side = path.with_name(path.name + ".sha256")
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


def is_checkpoint(payload) -> bool:
    """Whether a loaded file is a ddps checkpoint (rather than a bare state dict)."""
    return isinstance(payload, dict) and "kind" in payload


def read_checkpoint(path: str | Path) -> dict:
    """The checkpoint's dict; a one-line CheckpointError when it is missing, corrupt or not ours."""
    payload = read_state_file(path, "checkpoint")
    if not is_checkpoint(payload):
        raise CheckpointError(f"{path} is not a ddps checkpoint (no 'kind'); for bare weights use "
                              f"base.encoder_weights or load_state()")
    return payload


def load_base(path: str | Path, num_classes: int | None = None) -> tuple[BaseSegmentor, dict]:
    """Rebuild a base segmentor from its checkpoint file; check it against ``num_classes`` when given."""
    payload = read_checkpoint(path)
    return base_from_payload(payload, path, num_classes), payload


def base_from_payload(payload: dict, path: str | Path, num_classes: int | None = None) -> BaseSegmentor:
    """Rebuild a base segmentor from an already-read checkpoint."""
    if payload["kind"] != KIND_BASE:
        raise CheckpointError(f"checkpoint {path} holds a {payload['kind']}, not a base segmentor")
    try:
        spec = SegmentorSpec(**{**payload["spec"], "encoder_weights": ""})
        state = payload["model"]
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"checkpoint {path} is incomplete or from another version ({e})") from None
    if num_classes is not None and spec.num_classes != num_classes:
        raise CheckpointError(f"checkpoint {path} predicts {spec.num_classes} classes but the dataset has "
                              f"{num_classes}")
    model = BaseSegmentor(spec)
    check_state(model, state, f"checkpoint {path}")
    model.load_state_dict(state)
    return model
