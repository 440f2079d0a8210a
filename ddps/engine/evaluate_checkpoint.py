"""``ddps eval CHECKPOINT``: dispatch on what the checkpoint is and print its result row.

- a ddps base-segmentor checkpoint: rebuilt from the config it carries, evaluated on its own dataset;
- a ddps refiner checkpoint: its base and denoiser, evaluated at the base's own prediction, step 1 and the
  last step (every step with ``all_steps``), with the mask-reliance diagnostic;
- any other state-dict file (a user's weights): the model is built from ``--preset`` / ``--set`` and the
  file is loaded strictly, with a one-line error on missing / unexpected keys or shape mismatches.
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Iterable, Sequence

from ddps.config import from_flat, parse_set, resolve
from ddps.data import build_dataset
from ddps.engine.evaluate import evaluate_base
from ddps.engine.rows import HEADER, result_row
from ddps.checkpoint_io import read_state_file
from ddps.segmentors import apply_state, create_base
from ddps.segmentors.checkpoint import base_from_payload, is_checkpoint
from ddps.refiner.checkpoint import KIND_REFINER, load_refiner
from ddps.engine.evaluate_refiner import evaluate_refiner
from ddps.engine.record import Evaluation


def evaluate_checkpoint(path: str | Path, overrides: Iterable[str] = (), multiscale: bool = True,
                        preset: str = "cpu", all_steps: bool = False, split: str | None = None,
                        as_json: bool = False, device="cpu") -> str:
    """Evaluate single-scale (and multi-scale + flip) on ``device`` and return the header and the row, or with
    ``as_json`` every score at full precision as one JSON object (Evaluation.to_json, or the base's scores).
    ``split``: val or holdout; by default the config's eval.split (val unless set)."""
    overrides = list(overrides)
    payload = read_state_file(path, "checkpoint")  # read once, whichever kind it is
    if is_checkpoint(payload) and payload["kind"] == KIND_REFINER:
        return evaluate_refiner_checkpoint(path, payload, overrides, all_steps=all_steps, split=split,
                                           device=device, as_json=as_json)
    if is_checkpoint(payload):
        cfg = from_flat({**payload["config"], **parse_set(overrides)})
        val_set = evaluation_split(cfg, split or cfg.eval.split)
        model = base_from_payload(payload, path, num_classes=val_set.num_classes)
    else:  # a user's weights: the config says what model it is
        cfg = resolve(preset, None, overrides)
        val_set = evaluation_split(cfg, split or cfg.eval.split)
        model = create_base(cfg.base.arch, cfg.base.backbone, val_set.num_classes,
                            feature_channels=cfg.base.feature_channels)
        apply_state(model, payload, f"{cfg.base.arch}-{cfg.base.backbone} weights in {path}")
    model = model.to(device)
    ss = evaluate_base(model, val_set, cfg.eval, device=device)
    ms = evaluate_base(model, val_set, cfg.eval, multiscale=True, device=device) if multiscale else None
    if as_json:
        return json.dumps({"kind": "base", "base": ss.to_json(), "multiscale": ms.to_json() if ms else None})
    row = result_row(model.spec.arch, model.spec.backbone, model.num_params(), ss.mIoU,
                     ms.mIoU if ms else None, ss.mBIoU)
    return f"{HEADER}\n{row}"


def evaluation_split(cfg, split: str):
    """The val split, or the holdout split (data.holdout) for choosing hyper-parameters."""
    from ddps.config.schema import EVAL_SPLITS
    from ddps.errors import ConfigError, choices
    if split not in EVAL_SPLITS:
        raise ConfigError(f"unknown evaluation split {split!r}; choose from: {choices(EVAL_SPLITS)}")
    return build_dataset(cfg.data, split)


REFINER_HEADER = ("| Method | Backbone | Denoiser | #P(M) | mIoU (base / step 1 / last) "
                  "| mBIoU (base / step 1 / last) |\n|---|---|---|---|---|---|")


def evaluate_refiner_checkpoint(path, payload: dict, overrides: Iterable[str] = (), all_steps: bool = False,
                                split: str | None = None, device="cpu", as_json: bool = False) -> str:
    """Evaluate a refiner on its dataset's val split, or on the training scenes it held out for choosing
    hyper-parameters (``split='holdout'``; by default the config's eval.split); ``overrides`` may change
    infer.* / eval.* keys."""
    cfg = from_flat({**payload["config"], **parse_set(list(overrides))})
    result, base = evaluate_refiner_file(path, cfg, split=split or cfg.eval.split, payload=payload, device=device)
    if as_json:
        return json.dumps(result.to_json())
    return refiner_report(result, cfg, base, all_steps)


def evaluate_refiner_file(path, cfg, *, split: str = "val", payload: dict | None = None, reliance: bool = True,
                          multiscale: bool = False, examples: Sequence[int] = (), device="cpu",
                          precision: str | None = None):
    """A refiner checkpoint (its EMA weights when infer.ema) evaluated on ``split`` of its dataset, as
    evaluate_refiner does, with the #P(M) of base and denoiser: (record, base). The dataset must
    have the classes the checkpoint predicts."""
    from ddps.denoiser import count_params
    from ddps.errors import CheckpointError
    denoiser, process, base, _ = load_refiner(path, use_ema=cfg.infer.ema, payload=payload)
    dataset = evaluation_split(cfg, split)
    if dataset.num_classes != base.num_classes:
        raise CheckpointError(f"checkpoint {path} predicts {base.num_classes} classes but {dataset.name} has "
                              f"{dataset.num_classes}")
    base, denoiser = base.to(device), denoiser.to(device)
    result = evaluate_refiner(denoiser, process, None, cfg, reliance=reliance, multiscale=multiscale,
                              examples=examples, base=base, dataset=dataset, device=device, precision=precision)
    params = {"base": base.num_params(), "denoiser": count_params(denoiser)}
    return replace(result, params=params), base


def refiner_report(result: Evaluation, cfg, base, all_steps: bool = False) -> str:
    from ddps.engine.rows import ARCH_NAMES, backbone_name
    initial, first, last = result.base, result.steps[0], result.last
    method = "UNet head" if cfg.denoiser.method == "head" else f"DDPS ({len(result.steps)} steps)"
    if cfg.denoiser.method != "head" and cfg.infer.times != "even":  # the official list: K test steps, more calls
        method = f"DDPS ({cfg.infer.steps} steps, {cfg.infer.times} list: {len(result.steps)} calls)"
    params = sum(result.params.values()) / 1e6
    row = (f"| {method} | {ARCH_NAMES.get(base.spec.arch, base.spec.arch)} {backbone_name(base.spec.backbone)} | "
           f"UNet-{cfg.denoiser.size} | {params:.2f} | {initial.mIoU:.2f} / {first.mIoU:.2f} / "
           f"{last.mIoU:.2f} | {initial.mBIoU:.2f} / {first.mBIoU:.2f} / {last.mBIoU:.2f} |")
    lines = [REFINER_HEADER, row]
    if result.reliance:
        r = result.reliance
        lines.append(f"mask reliance (mIoU): (a) own trajectory {r.own:.2f} | (b) oracle ground truth "
                     f"re-noised at t={r.oracle_t} {r.oracle:.2f} | (c) fresh random mask {r.random:.2f}")
    if all_steps:
        lines += ["", "| step | t | mIoU | mBIoU | aAcc |", "|---|---|---|---|---|",
                  f"| base | - | {initial.mIoU:.2f} | {initial.mBIoU:.2f} | {initial.aAcc:.2f} |"]
        for k, (t, scores) in enumerate(zip(result.times, result.steps), 1):
            lines.append(f"| {k} | {t} | {scores.mIoU:.2f} | {scores.mBIoU:.2f} | {scores.aAcc:.2f} |")
    return "\n".join(lines)

