"""Augmentation with albumentations: MMSegmentation's training pipeline and its test-time resize.

Training (mmseg's ADE20K / Cityscapes pipeline):
  resize the short side to ``resize`` (0 = keep) -> random scale by a ratio in [ratio_min, ratio_max]
  -> random crop of ``crop`` x ``crop`` whose most frequent class covers < cat_max_ratio of it (10 tries)
  -> horizontal flip (p = 0.5)
  -> photometric distortion: brightness +-32, contrast 0.5-1.5, saturation 0.5-1.5, hue +-18 of 180,
     each drawn independently with p = 0.5 (albumentations' saturation blends with the grey image
     rather than scaling S in HSV; mmseg also randomises whether contrast comes first)
  -> per batch (:meth:`TrainTransform.collate`, as MMSegmentation 1.x's SegDataPreProcessor): pad to the
     crop size and normalise with the ImageNet mean/std, the padding 0 (= the mean colour after
     normalisation, as ``segmentors.inference.pad`` at test time; mask = ignore index).
A training item is therefore the augmented crop as uint8 (3, h, w), h, w <= crop, and its mask (h, w);
normalising and padding 32 crops at once costs a fraction of doing it per image, where albumentations'
per-call overhead dominates at 64 pixels (so is the whole per-image chain one Compose call). Albumentations
has no category-balanced crop: :class:`CatMaxRatioCrop` is one, on its crop base class. Test: resize the
short side to ``test_resize`` and normalise, per image (image only: metrics use the original labels).
"""
from __future__ import annotations

import random

import albumentations as A
import numpy as np
import torch
from albumentations.augmentations.crops.transforms import BaseCrop

from ddps.config import DataConfig

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
MEAN_255 = torch.tensor(MEAN).view(1, 3, 1, 1) * 255.0
INV_STD_255 = 1.0 / (torch.tensor(STD).view(1, 3, 1, 1) * 255.0)


def cat_max_ratio_window(mask: np.ndarray, crop: int, cat_max_ratio: float, ignore_index: int,
                         rng: random.Random, tries: int = 10) -> tuple[int, int, int, int]:
    """(y1, y2, x1, x2) of a random crop whose largest class (ignoring ``ignore_index``) covers less than
    ``cat_max_ratio`` of its labelled pixels and which holds more than one class; the last try otherwise."""
    h, w = mask.shape
    ch, cw = min(crop, h), min(crop, w)
    if (ch, cw) == (h, w):  # no smaller than the image: the one window there is
        return 0, h, 0, w
    for _ in range(tries):
        y1, x1 = rng.randint(0, h - ch), rng.randint(0, w - cw)
        if cat_max_ratio >= 1.0:
            break
        counts = np.bincount(mask[y1:y1 + ch, x1:x1 + cw].ravel())
        if ignore_index < len(counts):
            counts[ignore_index] = 0
        if np.count_nonzero(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
            break
    return y1, y1 + ch, x1, x1 + cw


class CatMaxRatioCrop(BaseCrop):
    """MMSegmentation's RandomCrop with ``cat_max_ratio`` as an albumentations transform: a ``crop`` x ``crop``
    window (the whole side where the image is smaller) chosen by :func:`cat_max_ratio_window` with this
    transform's seeded random stream."""

    def __init__(self, crop: int, cat_max_ratio: float, ignore_index: int, p: float = 1.0):
        super().__init__(p=p)
        self.crop, self.cat_max_ratio, self.ignore_index = crop, cat_max_ratio, ignore_index

    def get_params_dependent_on_data(self, params: dict, data: dict) -> dict:
        y1, y2, x1, x2 = cat_max_ratio_window(data["mask"], self.crop, self.cat_max_ratio, self.ignore_index,
                                              self.py_random)
        return {"crop_coords": (x1, y1, x2, y2)}


def to_tensors(image: np.ndarray, mask: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """(H, W, 3) float32 normalised, (H, W) int -> (3, H, W) float32, (H, W) int64."""
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))), torch.from_numpy(mask.astype(np.int64))


class TrainTransform:
    """Random resize -> category-balanced crop -> flip -> photometric distortion, per image (uint8);
    :meth:`collate` pads and normalises a batch of them."""

    def __init__(self, cfg: DataConfig, seed: int | None = None):
        self.cfg = cfg
        steps = [A.SmallestMaxSize(max_size=cfg.resize, p=1.0)] if cfg.resize else []
        low, high = cfg.ratio_min - 1.0, cfg.ratio_max - 1.0
        if (low, high) != (0.0, 0.0):
            steps.append(A.RandomScale(scale_limit=(low, high), p=1.0))
        steps.append(CatMaxRatioCrop(cfg.crop, cfg.cat_max_ratio, cfg.ignore_index))
        if cfg.flip:
            steps.append(A.HorizontalFlip(p=0.5))
        if cfg.photometric:
            keep = (1.0, 1.0)
            steps += [
                A.RandomBrightnessContrast(brightness_limit=32 / 255, contrast_limit=0.0, p=0.5),
                A.RandomBrightnessContrast(brightness_limit=0.0, contrast_limit=0.5, p=0.5),
                A.ColorJitter(brightness=keep, contrast=keep, saturation=(0.5, 1.5), hue=0.0, p=0.5),
                A.ColorJitter(brightness=keep, contrast=keep, saturation=keep, hue=0.1, p=0.5),  # 0.1 turn = 18/180
            ]
        # one Compose call per image (its per-call overhead is a large part of a 64-pixel image's cost);
        # image and mask sizes are checked when the dataset reads them
        self.steps = A.Compose(steps, seed=seed, is_check_shapes=False)

    def reseed(self, seed: int) -> None:
        """Give this copy its own random stream (call it in each DataLoader worker)."""
        self.steps.set_random_seed(seed % 2**32)

    def _random_parts(self) -> list:
        """The Compose and every step in it, each with its own random generators."""
        parts, todo = [], [self.steps]
        while todo:
            part = todo.pop(0)
            parts.append(part)
            if isinstance(part, A.BaseCompose):
                todo += list(part.transforms)
        return parts

    def random_state(self) -> list:
        """Where this copy's random streams are (each albumentations step has its own python and numpy
        generator): plain values a training state keeps, so that a resumed run draws what an uninterrupted
        one would."""
        return [(part.py_random.getstate(), part.random_generator.bit_generator.state)
                for part in self._random_parts()]

    def set_random_state(self, state: list) -> None:
        for part, (py_state, np_state) in zip(self._random_parts(), state, strict=True):
            part.py_random.setstate(py_state)
            part.random_generator.bit_generator.state = np_state

    def __call__(self, image: np.ndarray, mask: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(H, W, 3) uint8, (H, W) -> the augmented crop (3, h, w) uint8 (a view of (h, w, 3)), its mask (h, w)."""
        out = self.steps(image=image, mask=mask)
        return (torch.from_numpy(np.ascontiguousarray(out["image"])).permute(2, 0, 1),
                torch.from_numpy(np.ascontiguousarray(out["mask"])))

    def collate(self, items: list[dict]) -> dict:
        """DataLoader collate of training items: {"image": (B, 3, crop, crop) float32 normalised, padded with
        0 bottom/right, "mask": (B, crop, crop) int64 padded with the ignore index, "index": (B,)}."""
        crop, n = self.cfg.crop, len(items)
        images = np.zeros((n, crop, crop, 3), np.uint8)
        masks = np.full((n, crop, crop), self.cfg.ignore_index, np.int64)
        padded = []
        for k, item in enumerate(items):
            h, w = item["mask"].shape
            images[k, :h, :w] = item["image"].numpy().transpose(1, 2, 0)
            masks[k, :h, :w] = item["mask"].numpy()
            if h < crop or w < crop:
                padded.append((k, h, w))
        x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous().float().sub_(MEAN_255).mul_(INV_STD_255)
        for k, h, w in padded:
            x[k, :, h:] = 0.0
            x[k, :, :, w:] = 0.0
        return {"image": x, "mask": torch.from_numpy(masks), "index": torch.tensor([i["index"] for i in items])}


class EvalTransform:
    """Resize the image's short side to ``test_resize`` (0 = keep) and normalise; the mask is untouched."""

    def __init__(self, cfg: DataConfig):
        steps = [A.SmallestMaxSize(max_size=cfg.test_resize, p=1.0)] if cfg.test_resize else []
        self.image = A.Compose(steps + [A.Normalize(mean=MEAN, std=STD, max_pixel_value=255.0)])

    def __call__(self, image: np.ndarray, mask: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return to_tensors(self.image(image=image)["image"], mask)
