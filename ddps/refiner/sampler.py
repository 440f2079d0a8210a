"""Refinement, Algorithm 2 of the paper: one sampler for every variant.

Time runs t = 0 (clean) ... T (pure noise). With K test steps (stride sampling, Δ = T // K) the denoiser
is called at t_k = T - k·Δ for k = 0 ... K-1, starting from a sample of q(x_T) (a uniform random mask for
the replace-only transition). After each call the prediction x̂0 = argmax is re-noised to t_{k+1}:

- ``free``:      x_{t_{k+1}} ~ q(x_{t_{k+1}} | x̂0)                (free re-noising; the paper's default)
- ``posterior``: x_{t_{k+1}} ~ q(x_{t_{k+1}} | x_{t_k}, x̂0)       (exact Bayes over the stride, Eq. 3)
- ``fresh``:     x_{t_{k+1}} ~ q(x_T), ignoring x̂0                 (the mask-reliance diagnostic's control)

``times`` "official" is the official code's step list: their index i = 0, Δ, 2Δ, … < T (i = T − t: the even
list's K calls when K divides T, more when it does not) and then always the almost clean step i = T − 1
(t = 1): K + 1 calls when K divides T and K < T, e.g. 26 for T = 50, K = 20.

The process takes the step (``NoiseProcess.step``); for Gaussian bit diffusion x̂0 is the expected analog
bits of softmax(logits), and ``posterior`` is DDIM's step (η = 0).
Classifier-free guidance: ℓ = (s + 1)·ℓ(features) − s·ℓ(zero features), with s = 0 the conditional output.
The base features are computed once by the caller; every step's logits are returned (the trajectory),
so one pass gives every step's metrics.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ddps.diffusion.process import RENOISE_MODES, NoiseProcess
from ddps.refiner.steps import STEP_LISTS, step_times  # noqa: F401  (re-exported: the sampler's step lists)


@dataclass
class Trajectory:
    times: list[int]
    logits: list[torch.Tensor]  # after each call: (B, K, h, w)

    @property
    def final(self) -> torch.Tensor:
        return self.logits[-1]


def guided_logits(denoiser, features, x_t, t, cfg_scale: float) -> torch.Tensor:
    """Classifier-free guidance; s = 0 is exactly the conditional output (one call)."""
    cond = denoiser(features, x_t, t)
    if cfg_scale == 0:
        return cond
    uncond = denoiser(torch.zeros_like(features), x_t, t)
    return (cfg_scale + 1) * cond - cfg_scale * uncond


@torch.no_grad()
def refine(denoiser, process: NoiseProcess, features: torch.Tensor, steps: int,
           renoise: str = "free", cfg_scale: float = 0.0, generator: torch.Generator | None = None,
           start: torch.Tensor | None = None, start_t: int | None = None, times: str = "even") -> Trajectory:
    """Run Algorithm 2 on ``features`` (B, C, h, w) and return the trajectory of ``steps`` predictions.

    ``start``/``start_t``: begin from a given noisy mask at time ``start_t`` instead of q(x_T) (used by the
    oracle of the mask-reliance diagnostic); the stride then spans ``start_t``. ``times``: the step list
    (:func:`step_times`).
    """
    if renoise not in RENOISE_MODES:
        raise ValueError(f"unknown re-noising {renoise!r}; choose from: {', '.join(RENOISE_MODES)}")
    B, _, h, w = features.shape
    top = process.steps if start_t is None else start_t
    calls = step_times(top, min(steps, top), times)
    x = process.prior((B, h, w), generator=generator, device=features.device) if start is None else start
    logits_seen = []
    for k, t in enumerate(calls):
        t_batch = torch.full((B,), t, device=features.device, dtype=torch.long)
        logits = guided_logits(denoiser, features, x, t_batch, cfg_scale)  # (B, K, h, w)
        logits_seen.append(logits)
        if k + 1 == len(calls):
            break
        s = calls[k + 1]
        x = process.step(x, logits, t, s, renoise, generator)
    return Trajectory(calls, logits_seen)

