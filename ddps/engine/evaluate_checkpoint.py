"""``ddps eval CHECKPOINT``: dispatch on what the checkpoint is and print its result row."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

from ddps.config import from_flat, parse_set
from ddps.data import build_dataset
from ddps.engine.evaluate import evaluate_base
from ddps.engine.rows import HEADER, result_row
from ddps.errors import CheckpointError
from ddps.segmentors.checkpoint import KIND_BASE, load_base, read_checkpoint


def evaluate_checkpoint(path: str | Path, overrides: Iterable[str] = (), multiscale: bool = True) -> str:
    """Evaluate on the checkpoint's own dataset (``overrides`` may change data/eval keys); return the row."""
    payload = read_checkpoint(path)
    if payload["kind"] != KIND_BASE:
        raise CheckpointError(f"checkpoint {path} is a {payload['kind']!r}; ddps eval knows: {KIND_BASE}")
    cfg = from_flat({**payload["config"], **parse_set(overrides)})
    val_set = build_dataset(cfg.data, "val")
    model, _ = load_base(path, num_classes=val_set.num_classes)
    ss = evaluate_base(model, val_set, cfg.eval)
    ms = evaluate_base(model, val_set, cfg.eval, multiscale=True) if multiscale else None
    row = result_row(cfg.base.arch, cfg.base.backbone, model.num_params(), ss["mIoU"],
                     ms["mIoU"] if ms else None, ss["mBIoU"])
    return f"{HEADER}\n{row}"
