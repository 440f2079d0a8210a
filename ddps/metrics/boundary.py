"""Semantic mean boundary IoU, as DDPS evaluates it (after Cheng et al., Boundary IoU, CVPR 2021).

d = max(1, round(0.02 x image diagonal)). For each class c, the boundary band of a binary mask M is
B(M) = M minus M eroded d times by a 3x3 kernel, with the image border padded as background (so the border
counts as contour). Over the dataset, I_c += |B(G_c) n B(P_c)| and U_c += |B(G_c) u B(P_c)|; then
mBIoU = nanmean_c I_c / U_c. Pixels whose label is the ignore index are dropped from both bands after the
bands are computed (they count neither as intersection nor as union).

Erosion d times by a 3x3 square equals one erosion by a (2d+1) x (2d+1) square, computed as a separable
max-pool of the complement over a background-padded mask: vectorised over batch and classes.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def boundary_width(height: int, width: int, ratio: float = 0.02) -> int:
    return max(1, int(round(ratio * math.hypot(height, width))))


def erode(masks: torch.Tensor, d: int) -> torch.Tensor:
    """Erode binary masks (N, H, W) d times by a 3x3 kernel, outside the image = background."""
    background = F.pad((~masks).float().unsqueeze(1), (d, d, d, d), value=1.0)  # (N, 1, H+2d, W+2d)
    grown = F.max_pool2d(background, kernel_size=(1, 2 * d + 1), stride=1)
    grown = F.max_pool2d(grown, kernel_size=(2 * d + 1, 1), stride=1)
    return grown.squeeze(1) < 0.5


def boundary_bands(classmap: torch.Tensor, num_classes: int, d: int) -> torch.Tensor:
    """(B, H, W) class map -> (B, K, H, W) bool bands B(M_c) of every class."""
    b, h, w = classmap.shape
    onehot = classmap.unsqueeze(1) == torch.arange(num_classes, device=classmap.device).view(1, -1, 1, 1)
    flat = onehot.reshape(b * num_classes, h, w)
    return (flat & ~erode(flat, d)).reshape(b, num_classes, h, w)


class BoundaryIoUAccumulator:
    """Dataset-level per-class boundary intersection and union."""

    def __init__(self, num_classes: int, ignore_index: int = 255, ratio: float = 0.02):
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.ratio = ratio
        self.intersection = torch.zeros(num_classes, dtype=torch.float64)
        self.union = torch.zeros(num_classes, dtype=torch.float64)

    def update(self, pred: torch.Tensor, label: torch.Tensor) -> None:
        """pred, label: (B, H, W) integer class maps of the same size."""
        if pred.ndim == 2:
            pred, label = pred[None], label[None]
        assert pred.shape == label.shape, f"prediction {tuple(pred.shape)} vs label {tuple(label.shape)}"
        d = boundary_width(*label.shape[-2:], ratio=self.ratio)
        valid = (label != self.ignore_index).unsqueeze(1)  # (B, 1, H, W)
        gt = boundary_bands(label.long(), self.num_classes, d) & valid
        pr = boundary_bands(pred.long(), self.num_classes, d) & valid
        self.intersection = self.intersection.to(pred.device) + (gt & pr).sum((0, 2, 3)).double()
        self.union = self.union.to(pred.device) + (gt | pr).sum((0, 2, 3)).double()

    def compute(self) -> dict:
        biou = self.intersection / self.union
        return {"mBIoU": 100 * float(torch.nanmean(biou)), "BIoU": [100 * float(v) for v in biou.cpu()]}
