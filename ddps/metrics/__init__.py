"""Segmentation metrics: mIoU / aAcc (MMSegmentation) and semantic boundary IoU (DDPS)."""
from ddps.metrics.boundary import BoundaryIoUAccumulator, boundary_bands, boundary_width, erode
from ddps.metrics.iou import IoUAccumulator


class SegMetrics:
    """mIoU, aAcc and mBIoU accumulated together."""

    def __init__(self, num_classes: int, ignore_index: int = 255):
        self.iou = IoUAccumulator(num_classes, ignore_index)
        self.biou = BoundaryIoUAccumulator(num_classes, ignore_index)

    def update(self, pred, label) -> None:
        self.iou.update(pred, label)
        self.biou.update(pred, label)

    def compute(self) -> dict:
        return {**self.iou.compute(), **self.biou.compute()}


__all__ = ["BoundaryIoUAccumulator", "IoUAccumulator", "SegMetrics", "boundary_bands", "boundary_width", "erode"]
