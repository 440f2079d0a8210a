"""mIoU and aAcc exactly as MMSegmentation's IoUMetric computes them.

Per image: drop pixels whose label is the ignore index; histogram the intersection, the prediction area
and the label area per class. Sum over the whole dataset; IoU_c = sum I_c / sum U_c with
U_c = area_pred_c + area_label_c - I_c; mIoU = nanmean over classes (a class absent from both prediction
and labels everywhere has U_c = 0 -> NaN and does not count); aAcc = sum I / sum area_label.
"""
from __future__ import annotations

import torch


class IoUAccumulator:
    """Dataset-level accumulation of per-class intersection and union, on the predictions' device."""

    def __init__(self, num_classes: int, ignore_index: int = 255):
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.intersection = torch.zeros(num_classes, dtype=torch.float64)
        self.area_pred = torch.zeros(num_classes, dtype=torch.float64)
        self.area_label = torch.zeros(num_classes, dtype=torch.float64)

    def update(self, pred: torch.Tensor, label: torch.Tensor) -> None:
        """pred, label: (B, H, W) or (H, W) integer class maps."""
        assert pred.shape == label.shape, f"prediction {tuple(pred.shape)} vs label {tuple(label.shape)}"
        valid = label != self.ignore_index
        p, g = pred[valid].long(), label[valid].long()
        k = self.num_classes
        device = p.device
        self.intersection = self.intersection.to(device)
        self.area_pred = self.area_pred.to(device)
        self.area_label = self.area_label.to(device)
        self.intersection += torch.bincount(p[p == g], minlength=k)[:k].double()
        self.area_pred += torch.bincount(p, minlength=k)[:k].double()
        self.area_label += torch.bincount(g, minlength=k)[:k].double()

    def per_class_iou(self) -> torch.Tensor:
        union = self.area_pred + self.area_label - self.intersection
        return self.intersection / union  # NaN where union == 0

    def compute(self) -> dict:
        iou = self.per_class_iou()
        return {"mIoU": 100 * float(torch.nanmean(iou)),
                "aAcc": 100 * float(self.intersection.sum() / self.area_label.sum()),
                "IoU": [100 * float(v) for v in iou.cpu()]}
