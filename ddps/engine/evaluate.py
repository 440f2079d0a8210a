"""Evaluation of a base segmentor: single-scale and multi-scale + flip mIoU / aAcc / mBIoU; the loader and
the device-and-precision context that every evaluation shares."""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset

from ddps.config import EvalConfig
from ddps.data import SegmentationDataset
from ddps.engine.record import Scores
from ddps.errors import ConfigError, choices
from ddps.metrics import SegMetrics
from ddps.segmentors import BaseSegmentor
from ddps.segmentors.inference import predict, predict_multiscale


PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device, precision: str = "fp32"):
    """The context an evaluation's forward passes run in: fp32 as they are, bf16 / fp16 under torch.autocast
    on ``device``'s type (metrics and probabilities are always computed in float32 from its outputs)."""
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}; choose from: {choices(PRECISIONS)}")
    if PRECISIONS[precision] is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=PRECISIONS[precision])


def collate_sizes(items: list[dict]) -> list[dict]:
    """Stack items into batches of one size: one batch when all images match (fashion-scenes), else one
    batch per distinct size (ADE20K, Cityscapes and folders of mixed sizes)."""
    by_size: dict[tuple, list[dict]] = {}
    for item in items:
        by_size.setdefault((tuple(item["image"].shape), tuple(item["mask"].shape)), []).append(item)
    return [{"image": torch.stack([i["image"] for i in group]), "mask": torch.stack([i["mask"] for i in group])}
            for group in by_size.values()]


def eval_loader(dataset: SegmentationDataset, cfg: EvalConfig) -> DataLoader:
    if cfg.max_images and cfg.max_images < len(dataset):
        dataset = Subset(dataset, range(cfg.max_images))
    return DataLoader(dataset, batch_size=cfg.batch_size, shuffle=False, num_workers=0, collate_fn=collate_sizes)


@torch.no_grad()
def evaluate_base(model: BaseSegmentor, dataset: SegmentationDataset, cfg: EvalConfig,
                  multiscale: bool = False, device: str | torch.device = "cpu", precision: str = "fp32") -> Scores:
    """Scores over ``dataset`` (its test transform), single-scale or multi-scale + flip."""
    was_training = model.training
    model.eval()
    metrics = SegMetrics(dataset.num_classes, dataset.ignore_index)
    for batch in (b for batches in eval_loader(dataset, cfg) for b in batches):
        x, label = batch["image"].to(device), batch["mask"].to(device)  # (B, 3, H, W), (B, h, w)
        with autocast(device, precision):
            if multiscale:
                scores = predict_multiscale(model.segment, x, cfg.scales, cfg.flip, cfg.mode, cfg.crop, cfg.stride,
                                            model.pad_multiple)
            else:
                scores = predict(model.segment, x, cfg.mode, cfg.crop, cfg.stride, model.pad_multiple)
        scores = scores.float()
        if scores.shape[-2:] != label.shape[-2:]:  # test-time resize: score at the label's resolution
            scores = F.interpolate(scores, size=label.shape[-2:], mode="bilinear", align_corners=False)
        metrics.update(scores.argmax(1), label)
    model.train(was_training)
    return Scores.from_metrics(metrics.compute())
