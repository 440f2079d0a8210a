"""The denoiser network of DDPS (paper §3.2): UNet(concat(base features, mask input), t) -> clean-mask logits.

The mask input is the embedding of a discrete mask (``Embedding(num_states, 16)``, frozen and random as in
the official code, or trainable), the analog bits of the Gaussian variant (Table 8), or nothing: the
"UNet as decode head" baseline of Table 7. Dropout 0.1 and a 1x1 classifier follow the UNet. Condition
dropout zeroes the features of chosen samples, which trains the unconditional branch that classifier-free
guidance needs (official code: the mask embedding stays, the features are zeroed).

``time_input`` "T-t" feeds the UNet's time embedding T − t instead of t (the official checkpoints count time
the other way: 0 is pure noise); ``out_dim`` sets the UNet's output width when it differs from its base width.

``residual`` (ours, not the paper's): the conditioning's last ``num_classes`` channels are the frozen base's
logits; the network's output is added to them and its classifier starts at zero, so an untrained refiner
predicts exactly what the base predicts and training learns corrections. Condition dropout and the
unconditional branch of guidance zero these channels with the features.
"""
from __future__ import annotations

import torch
from torch import nn

from ddps.config.schema import TIME_INPUTS
from ddps.denoiser import UNET_SIZES, create_unet

MASK_INPUTS = ("embed", "bits", "none")


class MaskDenoiser(nn.Module):
    def __init__(self, *, feature_channels: int, num_classes: int, size: str, mask_input: str = "embed",
                 num_states: int | None = None, bits: int = 0, embed_dim: int = 16,
                 embed_trainable: bool = False, dropout: float = 0.1, residual: bool = False, out_dim: int = 0,
                 time_input: str = "t", steps: int | None = None):
        super().__init__()
        assert mask_input in MASK_INPUTS, mask_input
        assert time_input in TIME_INPUTS and (time_input == "t" or steps), (time_input, steps)
        self.mask_input, self.num_classes, self.residual = mask_input, num_classes, residual
        self.time_input, self.steps = time_input, steps
        extra = 0
        if mask_input == "embed":
            self.embed = nn.Embedding(num_states or num_classes, embed_dim)
            self.embed.weight.requires_grad_(embed_trainable)
            extra = embed_dim
        elif mask_input == "bits":
            assert bits >= 1, bits
            extra = bits
        out_channels = out_dim or UNET_SIZES[size]["dim"]
        self.unet = create_unet(size, feature_channels + extra, out_channels=out_channels)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Conv2d(out_channels, num_classes, 1)
        if residual:
            nn.init.zeros_(self.classifier.weight)
            nn.init.zeros_(self.classifier.bias)

    def forward(self, features: torch.Tensor, x_t: torch.Tensor | None = None, t: torch.Tensor | None = None,
                drop_cond: torch.Tensor | None = None) -> torch.Tensor:
        """features (B, C, h, w) (with residual: the base's logits are its last num_classes channels); x_t (B, h, w) states or (B, bits, h, w) analog bits; t (B,);
        drop_cond (B,) bool: zero those samples' features. Returns clean-mask logits (B, K, h, w)."""
        B = features.shape[0]
        if drop_cond is not None:
            features = features * (~drop_cond).to(features.dtype).view(B, 1, 1, 1)
        parts = [features]
        if self.mask_input == "embed":
            assert x_t is not None and x_t.shape == (B, *features.shape[2:]), \
                f"mask {None if x_t is None else tuple(x_t.shape)} must be (B, h, w) = {(B, *features.shape[2:])}"
            parts.append(self.embed(x_t).permute(0, 3, 1, 2).to(features.dtype))  # (B, E, h, w)
        elif self.mask_input == "bits":
            assert x_t is not None and x_t.shape[0] == B and x_t.shape[2:] == features.shape[2:], tuple(x_t.shape)
            parts.append(x_t.to(features.dtype))
        if t is None:
            t = torch.zeros(B, device=features.device)
        if self.time_input == "T-t":
            t = self.steps - t  # the official time index: 0 = pure noise (t = T), T - 1 = almost clean (t = 1)
        h = self.unet(torch.cat(parts, 1), t.float())
        logits = self.classifier(self.dropout(h))
        return logits + features[:, -self.num_classes:] if self.residual else logits

    def unet_params(self) -> int:
        """Parameters of the UNet alone, from its input conv to its output conv (docs/design.md, "Parameter counts")."""
        return sum(p.numel() for p in self.unet.parameters())
