"""Mask codecs (paper §3.1): how a label map becomes the denoiser's mask and its logits become labels again.

The resize codec holds masks at 1/scale of the input (1/4 by default, where the base features live):
labels go down by nearest sampling at the centre of each scale x scale cell, logits come back up bilinearly
to the label's size (where the loss and the metrics are computed).

``state_offset`` 1 is the official DDPS checkpoints' layout (``diffusion.ignore_state``): the ignore region is
diffusion state 0 with a logit of its own and class c is state c + 1. :meth:`ResizeCodec.states` maps class
labels to states and :meth:`ResizeCodec.classes` state logits to class logits (the state-0 logit dropped:
scores are over the dataset's classes, while the sampler's re-noising keeps every state). The bit codec of Gaussian diffusion
on analog bits belongs to that noise process (:mod:`ddps.diffusion.bits`, ``encode`` / ``encode_probs``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


class ResizeCodec:
    def __init__(self, scale: int = 4, state_offset: int = 0):
        assert scale >= 1 and state_offset in (0, 1), (scale, state_offset)
        self.scale, self.state_offset = scale, state_offset

    def states(self, labels: torch.Tensor) -> torch.Tensor:
        """Class labels (no ignore pixels left) -> diffusion states."""
        return labels + self.state_offset if self.state_offset else labels

    def classes(self, logits: torch.Tensor) -> torch.Tensor:
        """(B, S, h, w) state logits -> (B, K, h, w) class logits."""
        return logits[:, self.state_offset:] if self.state_offset else logits

    def mask_size(self, height: int, width: int) -> tuple[int, int]:
        return -(-height // self.scale), -(-width // self.scale)  # ceil: a padded input's features cover it

    def encode(self, labels: torch.Tensor) -> torch.Tensor:
        """(B, H, W) labels -> (B, ceil(H/s), ceil(W/s)) labels: the centre pixel of each s x s cell."""
        assert labels.ndim == 3, f"expected (B, H, W) labels, got {tuple(labels.shape)}"
        offset = self.scale // 2
        rows = torch.arange(offset, labels.shape[1] + self.scale - 1, self.scale, device=labels.device)
        cols = torch.arange(offset, labels.shape[2] + self.scale - 1, self.scale, device=labels.device)
        rows = rows.clamp(max=labels.shape[1] - 1)[: self.mask_size(*labels.shape[1:])[0]]
        cols = cols.clamp(max=labels.shape[2] - 1)[: self.mask_size(*labels.shape[1:])[1]]
        return labels[:, rows][:, :, cols]

    def decode(self, logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """(B, K, h, w) mask logits -> (B, K, H, W) logits at the label size, bilinearly."""
        if tuple(logits.shape[-2:]) == tuple(size):
            return logits
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)

    def features(self, features: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Base features (at 1/4) resized to the mask size (identity at the default scale)."""
        if tuple(features.shape[-2:]) == tuple(size):
            return features
        return F.interpolate(features, size=size, mode="bilinear", align_corners=False)
