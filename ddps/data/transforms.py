"""Augmentation with albumentations: MMSegmentation's training pipeline and its test-time resize.

Training (mmseg's ADE20K / Cityscapes pipeline):
  resize the short side to ``resize`` (0 = keep) -> random scale by a ratio in [ratio_min, ratio_max]
  -> random crop of ``crop`` x ``crop`` whose most frequent class covers < cat_max_ratio of it (10 tries)
  -> horizontal flip (p = 0.5)
  -> photometric distortion: brightness +-32, contrast 0.5-1.5, saturation 0.5-1.5, hue +-18 of 180,
     each drawn independently with p = 0.5 (albumentations' saturation blends with the grey image
     rather than scaling S in HSV; mmseg also randomises whether contrast comes first)
  -> normalise with the ImageNet mean/std -> pad to the crop size with 0 (= the mean colour after
     normalisation, as mmseg and as ``segmentors.inference.pad`` at test time; mask = ignore index).
Albumentations has no category-balanced crop; :func:`cat_max_ratio_window` picks the window and the crop
is a slice. Test: resize the short side to ``test_resize`` (image only: metrics use the original labels).
"""
from __future__ import annotations

import random

import albumentations as A
import cv2
import numpy as np
import torch

from ddps.config import DataConfig

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def cat_max_ratio_window(mask: np.ndarray, crop: int, cat_max_ratio: float, ignore_index: int,
                         rng: random.Random, tries: int = 10) -> tuple[int, int, int, int]:
    """(y1, y2, x1, x2) of a random crop whose largest class (ignoring ``ignore_index``) covers less than
    ``cat_max_ratio`` of its labelled pixels and which holds more than one class; the last try otherwise."""
    h, w = mask.shape
    ch, cw = min(crop, h), min(crop, w)
    for _ in range(tries):
        y1, x1 = rng.randint(0, h - ch), rng.randint(0, w - cw)
        window = mask[y1:y1 + ch, x1:x1 + cw]
        if cat_max_ratio >= 1.0:
            break
        counts = np.bincount(window[window != ignore_index].ravel())
        counts = counts[counts > 0]
        if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
            break
    return y1, y1 + ch, x1, x1 + cw


def to_tensors(image: np.ndarray, mask: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """(H, W, 3) float32 normalised, (H, W) int -> (3, H, W) float32, (H, W) int64."""
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))), torch.from_numpy(mask.astype(np.int64))


class TrainTransform:
    """Random resize -> category-balanced crop -> pad -> flip -> photometric distortion -> normalise."""

    def __init__(self, cfg: DataConfig, seed: int | None = None):
        self.cfg = cfg
        self.rng = random.Random(seed)
        scale = [A.SmallestMaxSize(max_size=cfg.resize, p=1.0)] if cfg.resize else []
        low, high = cfg.ratio_min - 1.0, cfg.ratio_max - 1.0
        if (low, high) != (0.0, 0.0):
            scale.append(A.RandomScale(scale_limit=(low, high), p=1.0))
        self.rescale = A.Compose(scale, seed=seed)
        after = [A.HorizontalFlip(p=0.5)] if cfg.flip else []
        if cfg.photometric:
            keep = (1.0, 1.0)
            after += [
                A.RandomBrightnessContrast(brightness_limit=32 / 255, contrast_limit=0.0, p=0.5),
                A.RandomBrightnessContrast(brightness_limit=0.0, contrast_limit=0.5, p=0.5),
                A.ColorJitter(brightness=keep, contrast=keep, saturation=(0.5, 1.5), hue=0.0, p=0.5),
                A.ColorJitter(brightness=keep, contrast=keep, saturation=keep, hue=0.1, p=0.5),  # 0.1 turn = 18/180
            ]
        after += [A.Normalize(mean=MEAN, std=STD, max_pixel_value=255.0),
                  A.PadIfNeeded(min_height=cfg.crop, min_width=cfg.crop, position="top_left",
                                border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=cfg.ignore_index)]
        self.after = A.Compose(after, seed=None if seed is None else seed + 1)

    def reseed(self, seed: int) -> None:
        """Give this copy its own random stream (call it in each DataLoader worker)."""
        self.rng.seed(seed)
        self.rescale.set_random_seed(seed % 2**32)
        self.after.set_random_seed((seed + 1) % 2**32)

    def __call__(self, image: np.ndarray, mask: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.rescale(image=image, mask=mask)
        image, mask = out["image"], out["mask"]
        y1, y2, x1, x2 = cat_max_ratio_window(mask, self.cfg.crop, self.cfg.cat_max_ratio,
                                              self.cfg.ignore_index, self.rng)
        out = self.after(image=image[y1:y2, x1:x2], mask=mask[y1:y2, x1:x2])
        return to_tensors(out["image"], out["mask"])


class EvalTransform:
    """Resize the image's short side to ``test_resize`` (0 = keep) and normalise; the mask is untouched."""

    def __init__(self, cfg: DataConfig):
        steps = [A.SmallestMaxSize(max_size=cfg.test_resize, p=1.0)] if cfg.test_resize else []
        self.image = A.Compose(steps + [A.Normalize(mean=MEAN, std=STD, max_pixel_value=255.0)])

    def __call__(self, image: np.ndarray, mask: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return to_tensors(self.image(image=image)["image"], mask)
