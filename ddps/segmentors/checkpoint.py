"""Base segmentor checkpoints: weights + the flat config that built them + what they scored.

Written to a temporary name and renamed, so a partial file never sits under the final name; read with
``torch.load(weights_only=True)``: only tensors and plain Python values, never arbitrary pickles.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from ddps.errors import CheckpointError
from ddps.segmentors.base import BaseSegmentor, SegmentorSpec, check_state

KIND_BASE = "base_segmentor"


def save_base(path: str | Path, model: BaseSegmentor, *, config: dict, class_names, metrics: dict,
              history: list, content_hash: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "kind": KIND_BASE, "spec": dict(model.spec.__dict__), "config": config,
        "class_names": list(class_names), "metrics": metrics, "history": history, "hash": content_hash,
        "model": model.state_dict(),
    }
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


def read_checkpoint(path: str | Path) -> dict:
    """The checkpoint's dict; a one-line CheckpointError when it is missing, corrupt or not ours."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CheckpointError(f"checkpoint {path} is unreadable ({type(e).__name__}: {first[:160]})") from None
    if not isinstance(payload, dict) or "kind" not in payload:
        raise CheckpointError(f"{path} is not a ddps checkpoint (no 'kind'); for bare weights use "
                              f"base.encoder_weights or load_state()")
    return payload


def load_base(path: str | Path, num_classes: int | None = None) -> tuple[BaseSegmentor, dict]:
    """Rebuild a base segmentor from its checkpoint; check it against ``num_classes`` when given."""
    payload = read_checkpoint(path)
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
    return model, payload
