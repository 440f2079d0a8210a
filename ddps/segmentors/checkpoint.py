"""Base segmentor checkpoints: weights + the flat config that built them + what they scored.

Written and read through :mod:`ddps.checkpoint_io`: a temporary name renamed, so a partial file never sits
under the final name, with a sha256 sidecar; read with ``torch.load(weights_only=True)``: only tensors and
plain Python values, never arbitrary pickles.
"""
from __future__ import annotations

from pathlib import Path

from ddps.checkpoint_io import read_state_file, write_checked
from ddps.errors import CheckpointError
from ddps.segmentors.base import BaseSegmentor, SegmentorSpec, check_state

KIND_BASE = "base_segmentor"


def base_payload(model: BaseSegmentor, *, config: dict, class_names, metrics: dict, history: list,
                 content_hash: str) -> dict:
    return {
        "kind": KIND_BASE, "spec": dict(model.spec.__dict__), "config": config,
        "class_names": list(class_names), "metrics": metrics, "history": history, "hash": content_hash,
        "model": model.state_dict(),
    }


def save_base(path: str | Path, model: BaseSegmentor, **kwargs) -> Path:
    return write_checked(path, base_payload(model, **kwargs))


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
