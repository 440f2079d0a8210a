"""Evaluation of a base segmentor: single-scale and multi-scale + flip mIoU / aAcc / mBIoU; the loader and
the device-and-precision context that every evaluation shares."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset

from ddps.config import EvalConfig
from ddps.engine.record import Scores
from ddps.metrics import SegMetrics
from ddps.segmentors import BaseSegmentor
from ddps.engine.device import autocast, loader_options, to_device
from ddps.segmentors.inference import predict, predict_multiscale

if TYPE_CHECKING:  # evaluation reads any dataset of that interface; ddps.data imports albumentations
    from ddps.data import SegmentationDataset


def collate_sizes(items: list[dict]) -> list[dict]:
    """Stack items into batches of one size: one batch when all images match (fashion-scenes), else one
    batch per distinct size (ADE20K, Cityscapes and folders of mixed sizes)."""
    by_size: dict[tuple, list[dict]] = {}
    for item in items:
        by_size.setdefault((tuple(item["image"].shape), tuple(item["mask"].shape)), []).append(item)
    return [{"image": torch.stack([i["image"] for i in group]), "mask": torch.stack([i["mask"] for i in group])}
            for group in by_size.values()]


def eval_loader(dataset: SegmentationDataset, cfg: EvalConfig, device="cpu") -> DataLoader:
    """Batches of eval.batch_size test images (each a list of one-size groups), pinned for a GPU."""
    if cfg.max_images and cfg.max_images < len(dataset):
        dataset = Subset(dataset, range(cfg.max_images))
    return DataLoader(dataset, batch_size=cfg.batch_size, shuffle=False, num_workers=0, collate_fn=collate_sizes,
                      **loader_options(device))


@torch.no_grad()
def evaluate_base(model: BaseSegmentor, dataset: SegmentationDataset, cfg: EvalConfig,
                  multiscale: bool = False, device: str | torch.device = "cpu", precision: str | None = None) -> Scores:
    """Scores over ``dataset`` (its test transform), single-scale or multi-scale + flip, on ``device`` in
    ``precision`` (default: eval.precision)."""
    precision = precision or cfg.precision
    was_training = model.training
    model.eval()
    metrics = SegMetrics(dataset.num_classes, dataset.ignore_index)
    for batch in (b for batches in eval_loader(dataset, cfg, device) for b in batches):
        x, label = to_device(batch["image"], device), to_device(batch["mask"], device)  # (B, 3, H, W), (B, h, w)
        with autocast(device, precision, "eval.precision"):
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
