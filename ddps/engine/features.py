"""The frozen base segmentor's side of refiner training and evaluation: features and its own prediction.

The base is frozen, so for a split without augmentation its features never change: ``FeatureCache``
computes them once (and those of the horizontally flipped images, when flips are on) and holds them as
float16; ``stored_cache`` keeps them in a file addressed by what determines them (base hash, data, mask
size, flips) and memory-maps it, so every later training on that base — and every data-parallel worker —
reads them instead of running the base again. Where augmentation is wanted, ``base_batch`` computes them
per batch.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from ddps.engine.device import autocast, loader_options, to_device
from ddps.errors import DataError
from ddps import storage
from ddps.refiner.codecs import ResizeCodec
from ddps.refiner.objective import Batch
from ddps.segmentors import BaseSegmentor
from ddps.segmentors.inference import pad


def stack_pairs(items: list[dict]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DataLoader collate: (images (B, 3, H, W), masks (B, H, W), dataset indices (B,))."""
    return (torch.stack([i["image"] for i in items]), torch.stack([i["mask"] for i in items]),
            torch.tensor([i["index"] for i in items]))


@torch.no_grad()
def base_batch(base: BaseSegmentor, images: torch.Tensor, labels: torch.Tensor, codec: ResizeCodec,
               keys: torch.Tensor | None = None) -> Batch:
    """Features and argmax of the frozen base at the mask size, for images (B, 3, H, W) with labels (B, H, W)."""
    H, W = images.shape[-2:]
    out = base(pad(images, base.pad_multiple))  # 32 for the smp bases, 16 for mmseg-segformer
    h4, w4 = -(-H // 4), -(-W // 4)
    features, logits = out.features[..., :h4, :w4], out.logits[..., :h4, :w4]  # (B, C, H/4, W/4)
    size = codec.mask_size(H, W)
    logits = codec.features(logits, size)
    return Batch(features=codec.features(features, size), labels=labels, base_pred=logits.argmax(1),
                 base_logits=logits, keys=keys)


def conditioning(batch: Batch, residual: bool) -> Batch:
    """The batch as the denoiser takes it: with ``denoiser.residual`` the base's logits follow the features."""
    if not residual:
        return batch
    return replace(batch, features=torch.cat([batch.features, batch.base_logits.to(batch.features.dtype)], 1))


@dataclass
class FeatureCache:
    """Every image of a split through the frozen base, once: features (N, C, h, w) and base logits
    (N, K, h, w) in float16, labels (N, H, W) uint8 — the flipped copies follow the originals when ``flip``."""
    features: torch.Tensor
    base_logits: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.features)

    def batch(self, index: torch.Tensor, device="cpu", keys: torch.Tensor | None = None) -> Batch:
        """The rows ``index`` on ``device`` (copied from pinned memory to a GPU), in float32 and long."""
        logits = to_device(self.base_logits[index], device).float()
        return Batch(features=to_device(self.features[index], device).float(),
                     labels=to_device(self.labels[index], device).long(), base_pred=logits.argmax(1),
                     base_logits=logits, keys=keys)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.features, self.base_logits, self.labels))


@torch.no_grad()
def compute_cache(base: BaseSegmentor, dataset: Dataset, codec: ResizeCodec, *, flip: bool = False,
                  batch_size: int = 64, device="cpu", precision: str = "fp32") -> FeatureCache:
    """Run the frozen base over ``dataset`` (its test transform) once, on ``device`` in ``precision``; all
    images must share one size. The cache is allocated once its shapes are known and filled in place (no
    second copy at the end)."""
    base.eval()
    n, copies = len(dataset), (2 if flip else 1)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0, collate_fn=stack_pairs,
                        **loader_options(device))
    cache, size, start = None, None, 0
    for images, masks, _ in loader:
        if size is None:
            size = images.shape[-2:]
        elif images.shape[-2:] != size:
            raise DataError(f"{getattr(dataset, 'name', 'dataset')}: images of different sizes "
                            f"({tuple(size)} and {tuple(images.shape[-2:])}) cannot share a feature cache; "
                            f"set train.feature_cache=false")
        stop = start + len(images)
        for copy in range(copies):  # originals first, then the flipped copies, in dataset order
            x, y = (images.flip(-1), masks.flip(-1)) if copy else (images, masks)
            with autocast(device, precision, "train.precision"):
                b = base_batch(base, to_device(x, device), y, codec)
            if cache is None:
                cache = FeatureCache(torch.empty((copies * n, *b.features.shape[1:]), dtype=torch.float16),
                                     torch.empty((copies * n, *b.base_logits.shape[1:]), dtype=torch.float16),
                                     torch.empty((copies * n, *y.shape[1:]), dtype=torch.uint8))
            rows = slice(copy * n + start, copy * n + stop)
            cache.features[rows] = b.features.half().cpu()
            cache.base_logits[rows] = b.base_logits.half().cpu()
            cache.labels[rows] = y.to(torch.uint8)
        start = stop
    if cache is None:
        raise DataError(f"{getattr(dataset, 'name', 'dataset')} is empty: nothing to cache")
    return cache


def stored_cache(path: Path, compute, expected: int, shared=None) -> tuple[FeatureCache, bool]:
    """The feature cache in ``path`` (memory-mapped: the pages are shared by every process that reads it),
    else ``compute()`` written there first (atomically: a reader never sees half a file); (cache, reused).
    A file that does not load, or holds another number of images than ``expected``, is computed again.
    With ``shared`` (its place in the storage, ddps.storage), a node without the file fetches it from there
    rather than compute it, and a file computed (or held) here is published there for the other nodes."""
    try:
        storage.fetch(shared, path)
    except OSError:  # the store's copy is a saving, not a need: compute it here
        pass
    if path.exists():
        try:
            blob = torch.load(path, mmap=True, weights_only=True)
            cache = FeatureCache(blob["features"], blob["base_logits"], blob["labels"])
            if len(cache) == expected == len(cache.base_logits) == len(cache.labels):
                _publish(path, shared)  # a node that has it and a storage that lacks it: the others need it
                return cache, True
        except Exception:  # noqa: BLE001 - a damaged or foreign file is replaced below
            pass
    cache = compute()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"features": cache.features, "base_logits": cache.base_logits, "labels": cache.labels}, tmp)
        os.replace(tmp, path)
    except OSError:  # a full or read-only disk costs the reuse, not the training
        tmp.unlink(missing_ok=True)
        return cache, False
    _publish(path, shared)
    return cache, False


def _publish(path: Path, shared) -> None:
    """Copy the node's feature cache to the storage when the storage lacks it; an unreachable store costs the
    other nodes a recomputation, not this training."""
    try:
        storage.publish(path, shared)
    except OSError:
        pass
