"""Evaluation of a base segmentor: single-scale and multi-scale + flip mIoU / aAcc / mBIoU."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset

from ddps.config import EvalConfig
from ddps.data import SegmentationDataset
from ddps.metrics import SegMetrics
from ddps.segmentors import BaseSegmentor
from ddps.segmentors.inference import predict, predict_multiscale


def eval_loader(dataset: SegmentationDataset, cfg: EvalConfig) -> DataLoader:
    if cfg.max_images and cfg.max_images < len(dataset):
        dataset = Subset(dataset, range(cfg.max_images))
    return DataLoader(dataset, batch_size=cfg.batch_size, shuffle=False, num_workers=0)


@torch.no_grad()
def evaluate_base(model: BaseSegmentor, dataset: SegmentationDataset, cfg: EvalConfig,
                  multiscale: bool = False, device: str | torch.device = "cpu") -> dict:
    """Metrics over ``dataset`` (its test transform): {'mIoU', 'aAcc', 'IoU', 'mBIoU', 'BIoU'}."""
    was_training = model.training
    model.eval()
    metrics = SegMetrics(dataset.num_classes, dataset.ignore_index)
    for batch in eval_loader(dataset, cfg):
        x, label = batch["image"].to(device), batch["mask"].to(device)  # (B, 3, H, W), (B, h, w)
        if multiscale:
            scores = predict_multiscale(model.segment, x, cfg.scales, cfg.flip, cfg.mode, cfg.crop, cfg.stride)
        else:
            scores = predict(model.segment, x, cfg.mode, cfg.crop, cfg.stride)
        if scores.shape[-2:] != label.shape[-2:]:  # test-time resize: score at the label's resolution
            scores = F.interpolate(scores, size=label.shape[-2:], mode="bilinear", align_corners=False)
        metrics.update(scores.argmax(1), label)
    model.train(was_training)
    return metrics.compute()
