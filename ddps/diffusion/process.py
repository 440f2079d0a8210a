"""The interface every noise process over masks offers the objective (Alg. 1) and the sampler (Alg. 2).

A process owns q(x_t | x_0), its prior q(x_T) and the reverse step from t to s < t given the denoiser's
clean-mask logits; callers never ask which process they hold. Time convention, as everywhere in ddps:
t = 0 is the clean mask, t = T is pure noise; ``t``/``s`` tensors are long (B,) per-sample times.

A process has ``num_classes`` (K, the classes the denoiser predicts) and ``steps`` (T), and implements:

- ``prior(shape, generator, device, noise)``       x_T ~ q(x_T) for shape = (B, h, w)
- ``draw_noise(rng, h, w, stream)``                 the per-sample noise ``prior(noise=)`` and
                                                    ``q_sample_labels(noise=)`` consume, keyed by SampleRNG
- ``q_sample_labels(x0, t, generator, noise)``      x_t ~ q(x_t | x_0) for a clean class map x0 (B, h, w)
- ``mask_input``                                    how x_t enters the denoiser (a :class:`MaskInput`)
- ``free_step(logits, s, generator)``               x_s ~ q(x_s | x̂_0), free re-noising (DDPS Alg. 2)
- ``posterior_step(x_t, logits, t, s, generator)``  x_s from q(x_s | x_t, x̂_0) (DDPS Eq. 3), optional
- ``supports_vlb`` / ``vlb_term(...)``              the hybrid loss's variational-bound term, optional

:meth:`NoiseProcess.step` dispatches Algorithm 2's re-noising modes onto these.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import NamedTuple

import torch

from ddps.diffusion.rng import SampleRNG

RENOISE_MODES = ("free", "posterior", "fresh")


class MaskInput(NamedTuple):
    """How the noisy mask x_t enters the denoiser (the keywords of ddps.refiner.model.MaskDenoiser):
    ``embed`` a long state map through Embedding(num_states, E); ``bits`` ``bits`` real channels;
    ``none`` no mask at all (the UNet-as-head baseline, no process)."""
    mask_input: str
    num_states: int | None = None
    bits: int = 0


class NoiseProcess(ABC):
    """A noise process over masks with K = ``num_classes`` predicted classes and T = ``steps``; see the module."""

    num_classes: int
    steps: int
    supports_vlb: bool = False   # whether vlb_term gives the hybrid loss's L_{t-1} (D3PM Eq. 5)

    @abstractmethod
    def prior(self, shape: tuple[int, int, int], generator: torch.Generator | None = None,
              device=None, noise: torch.Tensor | None = None) -> torch.Tensor:
        """x_T ~ q(x_T) (the start of DDPS Alg. 2) for shape = (B, h, w); ``noise``: a draw_noise sample."""

    @abstractmethod
    def draw_noise(self, rng: SampleRNG, h: int, w: int, stream: int) -> torch.Tensor:
        """The noise of one draw of ``prior`` or ``q_sample_labels`` at mask size (h, w), keyed by sample."""

    @abstractmethod
    def q_sample_labels(self, x0: torch.Tensor, t, generator: torch.Generator | None = None,
                        noise: torch.Tensor | None = None) -> torch.Tensor:
        """x_t ~ q(x_t | x_0) (DDPS Eq. 2) for a clean class map x0, long (B, h, w): the denoiser's input."""

    @property
    @abstractmethod
    def mask_input(self) -> MaskInput:
        """How x_t enters the denoiser."""

    @abstractmethod
    def free_step(self, logits: torch.Tensor, s: torch.Tensor,
                  generator: torch.Generator | None = None) -> torch.Tensor:
        """x_s ~ q(x_s | x̂_0) from the prediction's logits (B, K, h, w): free re-noising (DDPS Alg. 2)."""

    def posterior_step(self, x_t: torch.Tensor, logits: torch.Tensor, t: torch.Tensor, s: torch.Tensor,
                       generator: torch.Generator | None = None) -> torch.Tensor:
        """x_s from q(x_s | x_t, x̂_0) for s < t (DDPS Eq. 3), where the process defines it."""
        raise NotImplementedError(f"{type(self).__name__} has no posterior step; re-noise 'free' or 'fresh'")

    def vlb_term(self, x0: torch.Tensor, x_t: torch.Tensor, t, pred_x0_logits: torch.Tensor,
                 valid: torch.Tensor | None = None) -> torch.Tensor:
        """L_{t-1} of the hybrid loss (D3PM Eq. 5), nats per pixel (B,), when ``supports_vlb``."""
        raise NotImplementedError(f"{type(self).__name__} has no variational-bound term")

    def step(self, x_t: torch.Tensor, logits: torch.Tensor, t: int, s: int, renoise: str = "free",
             generator: torch.Generator | None = None) -> torch.Tensor:
        """The denoiser's input at time s < t from its prediction ``logits`` (B, K, h, w) at time t (DDPS Alg. 2):

        free:      x_s ~ q(x_s | x̂_0)         (free re-noising; the paper's default)
        posterior: x_s from q(x_s | x_t, x̂_0)  (exact Bayes over the stride, Eq. 3; DDIM for analog bits)
        fresh:     x_s ~ q(x_T), x̂_0 ignored  (the mask-reliance diagnostic's control)
        """
        batch, _, h, w = logits.shape
        if renoise == "fresh":
            return self.prior((batch, h, w), generator=generator, device=logits.device)
        s_batch = torch.full((batch,), s, device=logits.device, dtype=torch.long)
        t_batch = torch.full((batch,), t, device=logits.device, dtype=torch.long)
        if renoise == "free":
            return self.free_step(logits, s_batch, generator)
        if renoise == "posterior":
            return self.posterior_step(x_t, logits, t_batch, s_batch, generator)
        raise ValueError(f"unknown re-noising {renoise!r}; choose from: {', '.join(RENOISE_MODES)}")
