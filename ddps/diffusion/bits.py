"""Gaussian diffusion on analog bits (Chen et al. 2022, "Analog Bits"), DDPS App. A / Table 8.

A class index k is written as ceil(log2 K) binary digits, each mapped to {-scale, +scale}; the bits are
diffused as real numbers, q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I) (DDPM Eq. 4), and
sampled back with deterministic DDIM steps (Song et al. 2021, Eq. 12 with eta = 0) from the expected analog
bits of the denoiser's softmax, sum_k p_k code_k.

Time convention, as in the rest of ddps: t = 0 is the clean mask, t = T is pure noise.
"""
from __future__ import annotations

import math

import torch

from ddps.diffusion.process import MaskInput, NoiseProcess
from ddps.diffusion.rng import SampleRNG
from ddps.diffusion.schedules import alpha_bar as schedule_alpha_bar
from ddps.errors import ConfigError


def bit_codes(num_classes: int, bits: int, scale: float) -> torch.Tensor:
    """code_k[j] = scale * (2 * ((k >> j) & 1) - 1), least significant bit first: float32 (K, bits)."""
    k = torch.arange(num_classes)[:, None]
    digits = (k >> torch.arange(bits)[None, :]) & 1                      # (K, bits) in {0, 1}
    return scale * (2.0 * digits.float() - 1.0)


class BitDiffusion(NoiseProcess):
    """Gaussian diffusion over analog-bit masks (B, bits, H, W); no parameters."""

    def __init__(self, num_classes: int, steps: int, schedule: str = "cosine", scale: float = 0.1):
        if int(num_classes) < 1:
            raise ConfigError(f"num_classes={num_classes!r} is out of range: >= 1")
        if not scale > 0:
            raise ConfigError(f"bit scale={scale!r} is out of range: > 0")
        self.num_classes = int(num_classes)
        self.steps = int(steps)
        self.scale = float(scale)
        self.bits = max(1, math.ceil(math.log2(self.num_classes)))
        alpha_bar = torch.from_numpy(schedule_alpha_bar(schedule, steps))  # (T + 1,) float64
        self.alpha_bar = alpha_bar
        self._sqrt = torch.stack([alpha_bar.sqrt(), (1 - alpha_bar).sqrt()])  # (2, T + 1) float64
        self.codes = bit_codes(self.num_classes, self.bits, self.scale)   # (K, bits)

    def _coefficients(self, t, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """sqrt(alpha_bar_t), sqrt(1 - alpha_bar_t) per sample, shaped (B, 1, 1, 1) like `like`."""
        batch = like.shape[0]
        if not torch.is_tensor(t) or t.dim() == 0:
            t = torch.full((batch,), int(t), dtype=torch.long)
        t = t.to(torch.long).cpu()
        assert t.shape == (batch,) and bool(((t >= 0) & (t <= self.steps)).all()), f"times outside 0..{self.steps}"
        coef = self._sqrt[:, t].to(device=like.device, dtype=like.dtype)  # (2, B)
        return coef[0].view(-1, 1, 1, 1), coef[1].view(-1, 1, 1, 1)

    def encode(self, labels: torch.Tensor) -> torch.Tensor:
        """Class map (B, H, W) long -> analog bits (B, bits, H, W) in {-scale, +scale}."""
        assert labels.dim() == 3, f"labels must be (B, H, W), got {tuple(labels.shape)}"
        return self.codes.to(labels.device)[labels].permute(0, 3, 1, 2)  # (B, H, W, bits) -> (B, bits, H, W)

    def encode_probs(self, probs: torch.Tensor) -> torch.Tensor:
        """Expected analog bits sum_k p_k code_k: (B, K, H, W) -> (B, bits, H, W)."""
        assert probs.dim() == 4 and probs.shape[1] == self.num_classes, f"probs {tuple(probs.shape)}"
        return torch.einsum("bkhw,kn->bnhw", probs, self.codes.to(probs.device, probs.dtype))

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Nearest valid code: argmin_k ||x - code_k||^2 = argmax_k <x, code_k> (all codes have one norm)."""
        codes = self.codes.to(x.device, x.dtype)
        return torch.einsum("bnhw,kn->bkhw", x, codes).argmax(dim=1)     # (B, K, H, W) -> (B, H, W)

    def q_sample(self, x0_bits: torch.Tensor, t, generator: torch.Generator | None = None,
                 noise: torch.Tensor | None = None) -> torch.Tensor:
        """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps, eps ~ N(0, I) (DDPM Eq. 4);
        ``noise``: eps itself (B, bits, H, W), e.g. keyed by sample (SampleRNG)."""
        keep, scale = self._coefficients(t, x0_bits)
        eps = noise if noise is not None else torch.randn(x0_bits.shape, generator=generator,
                                                          device=x0_bits.device, dtype=x0_bits.dtype)
        assert eps.shape == x0_bits.shape, f"noise {tuple(eps.shape)} for bits {tuple(x0_bits.shape)}"
        return keep * x0_bits + scale * eps

    def prior(self, shape: tuple[int, int, int], generator: torch.Generator | None = None,
              device=None, noise: torch.Tensor | None = None) -> torch.Tensor:
        """x_T ~ N(0, I): (B, bits, H, W) for shape = (B, H, W); ``noise``: that sample itself."""
        batch, height, width = shape
        if noise is not None:
            assert noise.shape == (batch, self.bits, height, width), tuple(noise.shape)
            return noise.to(device) if device is not None else noise
        return torch.randn((batch, self.bits, height, width), generator=generator, device=device)

    def draw_noise(self, rng: SampleRNG, h: int, w: int, stream: int) -> torch.Tensor:
        """eps ~ N(0, I) of one (h, w) draw, for :meth:`prior` or :meth:`q_sample_labels`: (B, bits, h, w)."""
        return rng.randn((self.bits, h, w), stream)

    def ddim_step(self, x_t: torch.Tensor, x0_pred_bits: torch.Tensor, t, s) -> torch.Tensor:
        """Deterministic DDIM (eta = 0) from t to s < t (Song et al. 2021, Eq. 12):

        eps_hat = (x_t - sqrt(alpha_bar_t) x0_hat) / sqrt(1 - alpha_bar_t),
        x_s = sqrt(alpha_bar_s) x0_hat + sqrt(1 - alpha_bar_s) eps_hat;  s = 0 gives x0_hat exactly.
        """
        keep_t, noise_t = self._coefficients(t, x_t)
        keep_s, noise_s = self._coefficients(s, x_t)
        assert bool((noise_t > 0).all()), "ddim_step needs t >= 1"
        eps_hat = (x_t - keep_t * x0_pred_bits) / noise_t
        return keep_s * x0_pred_bits + noise_s * eps_hat

    # ----------------------------------------------------------------------------------- the denoiser's side

    @property
    def mask_input(self) -> MaskInput:
        """x_t enters the denoiser as ``bits`` real channels (DDPS Table 8)."""
        return MaskInput("bits", bits=self.bits)

    def q_sample_labels(self, x0: torch.Tensor, t, generator: torch.Generator | None = None,
                        noise: torch.Tensor | None = None) -> torch.Tensor:
        """x_t = sqrt(alpha_bar_t) bits(x_0) + sqrt(1 - alpha_bar_t) eps (DDPM Eq. 4) for a class map x0
        (B, H, W): (B, bits, H, W); ``noise``: eps as in :meth:`q_sample`."""
        return self.q_sample(self.encode(x0), t, generator=generator, noise=noise)

    def _expected_bits(self, logits: torch.Tensor) -> torch.Tensor:
        """x̂_0 = sum_k softmax(logits)_k code_k: (B, K, H, W) -> (B, bits, H, W)."""
        return self.encode_probs(logits.float().softmax(1))

    def free_step(self, logits: torch.Tensor, s: torch.Tensor,
                  generator: torch.Generator | None = None) -> torch.Tensor:
        """x_s = sqrt(alpha_bar_s) x̂_0 + sqrt(1 - alpha_bar_s) eps (free re-noising of the expected bits)."""
        return self.q_sample(self._expected_bits(logits), s, generator=generator)

    def posterior_step(self, x_t: torch.Tensor, logits: torch.Tensor, t: torch.Tensor, s: torch.Tensor,
                       generator: torch.Generator | None = None) -> torch.Tensor:
        """The deterministic DDIM step (:meth:`ddim_step`) from t to s with the expected bits x̂_0; no draw."""
        return self.ddim_step(x_t, self._expected_bits(logits), t, s)
