"""Refiner checkpoints: self-contained (the frozen base travels inside), so `ddps refine` needs one file.

Written to a temporary name and renamed; read with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ddps.config import from_flat
from ddps.errors import CheckpointError
from ddps.refiner.build import build_denoiser, build_process
from ddps.segmentors.base import check_state
from ddps.segmentors.checkpoint import base_from_payload, read_checkpoint

KIND_REFINER = "refiner"


def refiner_payload(*, denoiser, ema_state: dict | None, config: dict, base_payload: dict, stage: str,
                    metrics: dict, history: list, content_hash: str, class_names) -> dict:
    return {
        "kind": KIND_REFINER, "stage": stage, "config": config, "class_names": list(class_names),
        "metrics": metrics, "history": history, "hash": content_hash,
        "model": denoiser.state_dict(), "ema": ema_state,
        "base": {k: base_payload[k] for k in ("kind", "spec", "config", "class_names", "hash", "model", "metrics")},
    }


def load_refiner(path: str | Path, use_ema: bool = True, payload: dict | None = None):
    """(denoiser, process, base, payload) from a refiner checkpoint; the EMA weights when present."""
    payload = payload or read_checkpoint(path)
    if payload["kind"] != KIND_REFINER:
        raise CheckpointError(f"checkpoint {path} holds a {payload['kind']}, not a refiner")
    try:
        cfg = from_flat(payload["config"])
        base = base_from_payload(payload["base"], f"{path} (its base)")
        state = payload["ema"] if (use_ema and payload.get("ema")) else payload["model"]
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"checkpoint {path} is incomplete or from another version ({e})") from None
    process = build_process(cfg, base.num_classes)
    denoiser = build_denoiser(cfg, base.num_classes, base.feature_channels, process)
    check_state(denoiser, state, f"checkpoint {path}")
    denoiser.load_state_dict(state)
    return denoiser.eval(), process, base.freeze(), payload
