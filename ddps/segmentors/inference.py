"""Test-time inference: whole image or sliding window, single scale or multi-scale + flip (as MMSegmentation).

Every function takes a batch of normalised images (B, 3, H, W) and returns class scores at (H, W).
Inputs are padded at the bottom and right to the multiple the base needs (``multiple``: its
``BaseSegmentor.pad_multiple``, 32 for the smp bases, 16 for mmseg-segformer), and the padding is cropped
off the output.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from ddps.errors import ConfigError
from ddps.segmentors.base import PAD_MULTIPLE

MODES = ("whole", "slide")
MS_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)

Segment = Callable[[torch.Tensor], torch.Tensor]  # (B, 3, H, W) -> (B, K, H, W) logits


MIN_SIDE = 32  # no base takes a side below 32 px (MiT's first spatial reduction: an 8x8 conv at 1/4)


def pad(x: torch.Tensor, multiple: int = PAD_MULTIPLE) -> torch.Tensor:
    """Zero-pad (B, C, H, W) at the bottom/right up to multiples of ``multiple``, and to at least
    ``MIN_SIDE`` (which a multiple of 32 always is; with 16, a 16 px side becomes 32)."""
    h, w = x.shape[-2:]
    return F.pad(x, (0, max(-w % multiple, MIN_SIDE - w), 0, max(-h % multiple, MIN_SIDE - h)))


def predict_whole(segment: Segment, x: torch.Tensor, multiple: int = PAD_MULTIPLE) -> torch.Tensor:
    """Logits (B, K, H, W) of the whole image, padded to ``multiple``."""
    h, w = x.shape[-2:]
    return segment(pad(x, multiple))[..., :h, :w]


def predict_slide(segment: Segment, x: torch.Tensor, crop: int, stride: int, multiple: int = PAD_MULTIPLE
                  ) -> torch.Tensor:
    """Average of logits over overlapping crop x crop windows at the given stride (mmseg slide_inference)."""
    b, _, h, w = x.shape
    rows = max(h - crop + stride - 1, 0) // stride + 1
    cols = max(w - crop + stride - 1, 0) // stride + 1
    total, count = None, x.new_zeros(1, 1, h, w)
    for r in range(rows):
        for c in range(cols):
            y1, x1 = min(r * stride, max(h - crop, 0)), min(c * stride, max(w - crop, 0))
            y2, x2 = min(y1 + crop, h), min(x1 + crop, w)
            logits = predict_whole(segment, x[..., y1:y2, x1:x2], multiple)
            if total is None:
                total = x.new_zeros(b, logits.shape[1], h, w)
            total[..., y1:y2, x1:x2] += logits
            count[..., y1:y2, x1:x2] += 1
    return total / count


def predict(segment: Segment, x: torch.Tensor, mode: str = "whole", crop: int = 512, stride: int = 341,
            multiple: int = PAD_MULTIPLE) -> torch.Tensor:
    """Single-scale logits (B, K, H, W) in the chosen mode."""
    if mode == "whole":
        return predict_whole(segment, x, multiple)
    if mode == "slide":
        return predict_slide(segment, x, crop, stride, multiple)
    raise ConfigError(f"unknown inference mode {mode!r}; choose from: {', '.join(MODES)}")


def predict_multiscale(segment: Segment, x: torch.Tensor, scales: Sequence[float] = MS_SCALES,
                       flip: bool = True, mode: str = "whole", crop: int = 512, stride: int = 341,
                       multiple: int = PAD_MULTIPLE) -> torch.Tensor:
    """Mean softmax probabilities (B, K, H, W) over rescaled (and flipped) copies of the batch."""
    size = x.shape[-2:]
    probs = 0
    n = 0
    for s in scales:
        xs = x if s == 1.0 else F.interpolate(x, scale_factor=s, mode="bilinear", align_corners=False)
        for flipped in ((False, True) if flip else (False,)):
            xi = xs.flip(-1) if flipped else xs
            logits = predict(segment, xi, mode, crop, stride, multiple)
            if flipped:
                logits = logits.flip(-1)
            logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
            probs = probs + logits.softmax(1)
            n += 1
    return probs / n
