"""``ddps eval CHECKPOINT``: dispatch on what the checkpoint is and print its result row.

- a ddps base-segmentor checkpoint: rebuilt from the config it carries, evaluated on its own dataset;
- any other state-dict file (a user's weights): the model is built from ``--preset`` / ``--set`` and the
  file is loaded strictly, with a one-line error on missing / unexpected keys or shape mismatches.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

from ddps.config import from_flat, parse_set, resolve
from ddps.data import build_dataset
from ddps.engine.evaluate import evaluate_base
from ddps.engine.rows import HEADER, result_row
from ddps.segmentors import apply_state, create_base, read_state_file
from ddps.segmentors.checkpoint import base_from_payload, is_checkpoint


def evaluate_checkpoint(path: str | Path, overrides: Iterable[str] = (), multiscale: bool = True,
                        preset: str = "cpu") -> str:
    """Evaluate single-scale (and multi-scale + flip) and return the header and the row."""
    overrides = list(overrides)
    payload = read_state_file(path, "checkpoint")  # read once, whichever kind it is
    if is_checkpoint(payload):
        cfg = from_flat({**payload["config"], **parse_set(overrides)})
        val_set = build_dataset(cfg.data, "val")
        model = base_from_payload(payload, path, num_classes=val_set.num_classes)
    else:  # a user's weights: the config says what model it is
        cfg = resolve(preset, None, overrides)
        val_set = build_dataset(cfg.data, "val")
        model = create_base(cfg.base.arch, cfg.base.backbone, val_set.num_classes,
                            feature_channels=cfg.base.feature_channels)
        apply_state(model, payload, f"{cfg.base.arch}-{cfg.base.backbone} weights in {path}")
    ss = evaluate_base(model, val_set, cfg.eval)
    ms = evaluate_base(model, val_set, cfg.eval, multiscale=True) if multiscale else None
    row = result_row(model.spec.arch, model.spec.backbone, model.num_params(), ss["mIoU"],
                     ms["mIoU"] if ms else None, ss["mBIoU"])
    return f"{HEADER}\n{row}"
