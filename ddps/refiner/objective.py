"""The training objective, Algorithm 1 of the paper: one function for every variant the paper ablates.

Per batch (frozen base features F, ground truth y at the label size, y↓ at the mask size):
1. pick the time: t = T in stage 1 (single step at maximum noise), t ~ U{1..T} in stage 2 / multi-step;
2. pick what is noised, x0:  ``gt`` y↓ | ``initial`` the base's argmax | ``first`` the denoiser's own first
   prediction, argmax f(F, x_T, T) with x_T ~ q(x_T), computed without gradient;
3. x_t ~ q(x_t | x0) (Eq. 2) by the process (``q_sample_labels``; for analog bits √ᾱ·bits(x0) + √(1−ᾱ)·ε);
4. logits = f(F · keep, x_t, t), features zeroed with probability p (condition dropout, for CFG);
5. loss = CE(upsample(logits), y), the ground truth always; ``hybrid`` adds w · VLB (where the process has one).
Every random draw (t, x_T, the noise, the dropout) is keyed by sample (SampleRNG): the loss of a sample does
not depend on the batch it is in, so data-parallel workers reproduce single-process training.
The UNet-as-head baseline (Table 7) is f(F) with no mask input and plain CE.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ddps.diffusion.process import NoiseProcess
from ddps.diffusion.rng import SampleRNG
from ddps.refiner.codecs import ResizeCodec


@dataclass(frozen=True)
class Batch:
    features: torch.Tensor      # (B, C, h, w) frozen base features at the mask size
    labels: torch.Tensor        # (B, H, W) ground truth at the label size (ignore index allowed)
    base_pred: torch.Tensor     # (B, h, w) the base segmentor's argmax at the mask size
    base_logits: torch.Tensor | None = None  # (B, K, h, w) its logits, when the caller has them
    keys: torch.Tensor | None = None         # (B,) each sample's key for its random draws (SampleRNG)

    def split(self, parts: int) -> list["Batch"]:
        """Equal micro-batches (gradient accumulation)."""
        n = self.features.shape[0] // parts
        return [Batch(**{k: (v[i * n:(i + 1) * n] if v is not None else None) for k, v in self.__dict__.items()})
                for i in range(parts)]


# the streams of a sample's random draws (SampleRNG)
STREAM_T, STREAM_FIRST, STREAM_NOISE, STREAM_DROP = range(4)


def noised_input(denoiser, process: NoiseProcess, batch: Batch, codec: ResizeCodec, *, stage: int, target: str,
                 ignore_index: int, rng: SampleRNG):
    """Steps 1-3: (x0 at the mask size, t (B,), x_t) for one batch; every draw keyed by sample."""
    feats = batch.features
    B, _, h, w = feats.shape
    T = process.steps
    if stage == 1:
        t = torch.full((B,), T, dtype=torch.long)
    else:
        t = 1 + (rng.rand((), STREAM_T) * T).long().clamp(max=T - 1)      # uniform on 1..T
    t = t.to(feats.device)
    if target == "gt":
        x0 = codec.encode(batch.labels)                                    # (B, h, w)
        x0 = torch.where(x0 == ignore_index, batch.base_pred, x0)          # ignore pixels: the base's guess
    elif target == "initial":
        x0 = batch.base_pred
    elif target == "first":
        x0 = first_prediction(denoiser, process, feats, noise=process.draw_noise(rng, h, w, STREAM_FIRST))
    else:
        raise ValueError(f"unknown target {target!r}")
    noise = process.draw_noise(rng, h, w, STREAM_NOISE).to(feats.device)
    x_t = process.q_sample_labels(x0, t, noise=noise)                      # (B, h, w) states or (B, bits, h, w)
    return x0, t, x_t


@torch.no_grad()
def first_prediction(denoiser, process: NoiseProcess, features: torch.Tensor, generator=None,
                     noise=None) -> torch.Tensor:
    """argmax f(F, x_T, T) with x_T ~ q(x_T): the denoiser's own first guess, without gradient (Alg. 1)."""
    B, _, h, w = features.shape
    x_T = process.prior((B, h, w), generator=generator, device=features.device,
                        noise=None if noise is None else noise.to(features.device))
    t = torch.full((B,), process.steps, dtype=torch.long, device=features.device)
    return denoiser(features, x_T, t).argmax(1)


def refiner_loss(denoiser, process: NoiseProcess, batch: Batch, codec: ResizeCodec, *, stage: int, target: str,
                 rng: SampleRNG, loss: str = "ce", vlb_weight: float = 1.0, cond_dropout: float = 0.0,
                 ignore_index: int = 255) -> tuple[torch.Tensor, dict]:
    """Algorithm 1's loss for one batch; returns (loss, {'ce': ..., 'vlb': ...})."""
    feats = batch.features
    x0, t, x_t = noised_input(denoiser, process, batch, codec, stage=stage, target=target,
                              ignore_index=ignore_index, rng=rng)
    drop = None
    if cond_dropout > 0:
        drop = (rng.rand((), STREAM_DROP) < cond_dropout).to(feats.device)
    logits = denoiser(feats, x_t, t, drop)                                  # (B, K, h, w)
    ce = label_ce(logits, batch, codec, ignore_index)
    parts = {"ce": float(ce.detach())}
    total = ce
    if loss == "hybrid" and process.supports_vlb:
        valid = codec.encode(batch.labels) != ignore_index
        gt = torch.where(valid, codec.encode(batch.labels), x0)
        vlb = process.vlb_term(gt, x_t, t, logits.float(), valid=valid).mean()
        parts["vlb"] = float(vlb.detach())
        total = total + vlb_weight * vlb
    return total, parts


def head_loss(denoiser, batch: Batch, codec: ResizeCodec, ignore_index: int = 255) -> tuple[torch.Tensor, dict]:
    """The UNet-as-decode-head baseline: f(F) with plain CE."""
    ce = label_ce(denoiser(batch.features), batch, codec, ignore_index)
    return ce, {"ce": float(ce.detach())}


def label_ce(logits: torch.Tensor, batch: Batch, codec: ResizeCodec, ignore_index: int) -> torch.Tensor:
    """Cross-entropy of mask-size logits, decoded to the label size, against the ground truth."""
    return F.cross_entropy(codec.decode(logits, batch.labels.shape[-2:]).float(), batch.labels,
                           ignore_index=ignore_index)
