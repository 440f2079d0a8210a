"""Discrete diffusion over segmentation masks (D3PM, Austin et al. 2021; VQ-Diffusion, Gu et al. 2022).

The noise process is not the network: `MaskDiffusion` has no parameters. It owns the schedule, the forward
process q(x_t | x_0) (DDPS Eq. 2), the posterior q(x_s | x_t, x_0) (DDPS Eq. 3), sampling, the prior
q(x_T) and the variational-bound term of the hybrid loss.

Time convention, the same everywhere in ddps: t = 0 is the clean mask, t = T is pure noise.

One structure serves the three transitions. From a real class i a step keeps i with probability `keep`,
replaces it by any of the K real classes (i itself included) with `replace` each, or masks it with
`masked`; the [MASK] state (index K, present unless the transition is "uniform") is absorbing:

    M(keep, replace, masked) = [ keep I_K + replace 1 1^T | masked 1 ]     rows = from-state
                               [          0^T             |    1     ]

This family is closed under products, so the one-step Q_t, the cumulative Q_bar_t = Q_1 ... Q_t and every
multi-step Q_{s->t} = Q_{s+1} ... Q_t are all M(.) with (keep + masked + K replace = 1)

    keep   = alpha_bar_t / alpha_bar_s
    masked = 1 - (1 - gamma_bar_t) / (1 - gamma_bar_s)
    replace = (1 - keep - masked) / K

where alpha_bar is the schedule's cumulative keep probability and gamma_bar the cumulative masked one:

    uniform       gamma_bar_t = 0                  Q_t = alpha_t I + (1 - alpha_t)/K 1 1^T  (D3PM App. A.2.1)
    mask          gamma_bar_t = 1 - alpha_bar_t    absorbing [MASK]                          (D3PM App. A.2.2)
    uniform+mask  gamma_bar_t = mask_max (1 - alpha_bar_t) / (1 - alpha_bar_T)   (VQ-Diffusion Sec. 3.2)

For uniform+mask the per-step replace probability beta_t = (1 - alpha_t - gamma_t)/K is >= 0 at every t
for any schedule exactly when mask_max <= 1 - alpha_bar_T; with the linear schedule gamma_bar_t is linear
in t from ~9e-6 to mask_max, as in VQ-Diffusion.

The process may diffuse over more states than the denoiser predicts classes (``num_states``; the published
DDPS checkpoints diffuse over 151 states for ADE20K's 150 classes): the K above is then the number of real
(non-[MASK]) states, ``num_categories``, and predicted class probabilities give the extra states zero mass.
"""
from __future__ import annotations

from functools import cached_property

import numpy as np
import torch

from ddps.diffusion.process import MaskInput, NoiseProcess
from ddps.diffusion.rng import SampleRNG
from ddps.diffusion.schedules import alpha_bar as schedule_alpha_bar
from ddps.errors import ConfigError, choices

TRANSITIONS = ("uniform", "mask", "uniform+mask")


def cumulative_masked(transition: str, alpha_bar: np.ndarray, mask_max: float) -> np.ndarray:
    """gamma_bar_t, the probability that a real class is [MASK] at time t (float64 (T + 1,), gamma_bar_0 = 0)."""
    if transition == "uniform":
        return np.zeros_like(alpha_bar)
    if transition == "mask":
        return 1.0 - alpha_bar
    return mask_max * (1.0 - alpha_bar) / (1.0 - alpha_bar[-1])


def per_step_replace(alpha_bar: np.ndarray, gamma_bar: np.ndarray) -> np.ndarray:
    """K beta_t = 1 - alpha_t - gamma_t, alpha_t = alpha_bar_t/alpha_bar_{t-1},
    gamma_t = 1 - (1 - gamma_bar_t)/(1 - gamma_bar_{t-1}), for t = 1..T (VQ-Diffusion Sec. 3.2): must be >= 0."""
    alpha = alpha_bar[1:] / alpha_bar[:-1]
    gamma = 1.0 - (1.0 - gamma_bar[1:]) / (1.0 - gamma_bar[:-1])
    return 1.0 - alpha - gamma


def structured_matrix(keep: torch.Tensor, replace: torch.Tensor, masked: torch.Tensor,
                      num_classes: int, absorbing: bool) -> torch.Tensor:
    """M(keep, replace, masked) of the module docstring, batched: (N,) scalars -> (N, S, S) row-stochastic."""
    k = num_classes
    eye = torch.eye(k, dtype=keep.dtype, device=keep.device)
    real = keep[:, None, None] * eye + replace[:, None, None]            # (N, K, K)
    if not absorbing:
        return real
    mask_col = masked[:, None, None].expand(-1, k, 1)                    # (N, K, 1)
    mask_row = torch.zeros(keep.shape[0], 1, k + 1, dtype=keep.dtype, device=keep.device)
    mask_row[:, 0, k] = 1.0                                              # [MASK] is absorbing
    return torch.cat([torch.cat([real, mask_col], dim=2), mask_row], dim=1)  # (N, S, S)


class MaskDiffusion(NoiseProcess):
    """Discrete diffusion q(x_t | x_0) = Cat(x_t; onehot(x_0) Q_bar_t) over K classes (+ [MASK]).

    t = 0 is the clean mask and t = T pure noise; `t` arguments are long tensors (B,) of per-sample times
    in 0..T, or ints. Masks are long (B, H, W) state maps; distributions are (B, S, H, W) probabilities
    over the S states. Inputs may live on any device; the matrices are rebuilt there from the schedule.
    ``num_states``: S, by default K (+ 1 for [MASK]); more adds real states no class maps to (module doc).
    """

    supports_vlb = True

    def __init__(self, num_classes: int, steps: int, transition: str = "uniform", schedule: str = "linear",
                 mask_max: float = 0.9, num_states: int | None = None):
        if transition not in TRANSITIONS:
            raise ConfigError(f"unknown transition {transition!r}; choose from: {choices(TRANSITIONS)}")
        if int(num_classes) < 1:
            raise ConfigError(f"num_classes={num_classes!r} is out of range: >= 1")
        absorbing = transition != "uniform"
        fewest = int(num_classes) + absorbing
        if num_states is not None and int(num_states) < fewest:
            raise ConfigError(f"num_states={num_states!r} is out of range: >= {fewest} (the classes"
                              f"{' + [MASK]' if absorbing else ''})")
        alpha_bar = schedule_alpha_bar(schedule, steps)                  # (T + 1,) float64
        if transition == "uniform+mask" and not 0.0 < mask_max <= 1.0 - alpha_bar[-1]:
            raise ConfigError(f"mask_max={mask_max!r} is out of range: in (0, {1.0 - alpha_bar[-1]:.6f}]")
        self.num_classes = int(num_classes)
        self.steps = int(steps)
        self.transition = transition
        self.schedule = schedule
        self.num_states = fewest if num_states is None else int(num_states)
        self.num_categories = self.num_states - absorbing               # the real states, K in the module doc
        self.mask_index = self.num_categories if absorbing else None     # [MASK] is the last state
        gamma_bar = cumulative_masked(transition, alpha_bar, mask_max)
        assert np.all(per_step_replace(alpha_bar, gamma_bar) >= -1e-12), "negative replace probability"
        self.alpha_bar = torch.from_numpy(alpha_bar)                     # (T + 1,) float64
        self.gamma_bar = torch.from_numpy(gamma_bar)                     # (T + 1,) float64
        log_unmasked = np.log(alpha_bar) if transition == "mask" else np.log1p(-gamma_bar)
        self._log_tables = torch.stack([torch.from_numpy(np.log(alpha_bar)), torch.from_numpy(log_unmasked)])
        self._tables_on: dict = {}
        self._between: dict = {}

    # ----------------------------------------------------------------------------------- matrices

    def _tables(self, device, dtype) -> torch.Tensor:
        """(2, T + 1): log alpha_bar_t and log(1 - gamma_bar_t), cached per device and dtype."""
        key = (torch.device(device), dtype)
        if key not in self._tables_on:
            self._tables_on[key] = self._log_tables.to(device=device, dtype=dtype)
        return self._tables_on[key]

    def _between_batch(self, s: torch.Tensor, t: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
        """Q_{s->t} = Q_{s+1} ... Q_t for each sample, s <= t: long (N,), (N,) -> (N, S, S)."""
        log_keep, log_unmasked = self._tables(t.device, dtype)
        d_keep = log_keep[t] - log_keep[s]                               # log(alpha_bar_t / alpha_bar_s)
        d_unmasked = log_unmasked[t] - log_unmasked[s]
        keep = d_keep.exp()
        masked = -torch.expm1(d_unmasked)                                # 1 - (1-gamma_bar_t)/(1-gamma_bar_s)
        replace = (-torch.expm1(d_keep) - masked).clamp_min(0) / self.num_categories
        return structured_matrix(keep, replace, masked, self.num_categories, self.mask_index is not None)

    def transition_between(self, s: int, t: int) -> torch.Tensor:
        """Q_{s->t} = Q_{s+1} Q_{s+2} ... Q_t (identity when s == t): float64 CPU (S, S), cached."""
        s, t = int(s), int(t)
        if not 0 <= s <= t <= self.steps:
            raise ValueError(f"transition_between needs 0 <= s <= t <= {self.steps}, got s={s}, t={t}")
        if (s, t) not in self._between:
            pair = torch.tensor([s]), torch.tensor([t])
            self._between[(s, t)] = self._between_batch(*pair, dtype=torch.float64)[0]
        return self._between[(s, t)]

    @cached_property
    def one_step_matrices(self) -> torch.Tensor:
        """Q_t for t = 0..T (Q_0 = I): float64 (T + 1, S, S), rows = from-state."""
        t = torch.arange(self.steps + 1)
        return self._between_batch((t - 1).clamp_min(0), t, dtype=torch.float64)

    @cached_property
    def cumulative_matrices(self) -> torch.Tensor:
        """Q_bar_t = Q_1 ... Q_t for t = 0..T (Q_bar_0 = I): float64 (T + 1, S, S)."""
        t = torch.arange(self.steps + 1)
        return self._between_batch(torch.zeros_like(t), t, dtype=torch.float64)

    # ----------------------------------------------------------------------------------- helpers

    def _times(self, t, batch: int, device) -> torch.Tensor:
        """An int or a long (B,) tensor of times in 0..T -> long (B,) on `device`."""
        if not torch.is_tensor(t) or t.dim() == 0:
            t = torch.full((batch,), int(t), dtype=torch.long)
        t = t.to(device=device, dtype=torch.long)
        assert t.shape == (batch,), f"times {tuple(t.shape)} for a batch of {batch}"
        assert bool(((t >= 0) & (t <= self.steps)).all()), f"times outside 0..{self.steps}"
        return t

    def _as_probs(self, x: torch.Tensor) -> torch.Tensor:
        """(B, K or S, H, W) probabilities -> (B, S, H, W), zero channels for the states after the classes
        (the extra states and [MASK]) appended when needed."""
        assert x.dim() == 4, f"probabilities must be (B, S, H, W), got {tuple(x.shape)}"
        if x.shape[1] == self.num_classes < self.num_states:
            x = torch.nn.functional.pad(x, (0, 0, 0, 0, 0, self.num_states - self.num_classes))
        assert x.shape[1] == self.num_states, f"{x.shape[1]} channels, expected {self.num_states} states"
        return x

    def _propagate(self, x: torch.Tensor, mats: torch.Tensor) -> torch.Tensor:
        """Row x of each sample's matrix: long (B, H, W) states or (B, S, H, W) probs, (B, S, S) -> (B, S, H, W)."""
        if x.dtype == torch.long:
            assert x.dim() == 3, f"state maps must be (B, H, W), got {tuple(x.shape)}"
            b = torch.arange(x.shape[0], device=x.device)[:, None, None]
            return mats[b, x].permute(0, 3, 1, 2)                        # (B, H, W, S) -> (B, S, H, W)
        return torch.einsum("bihw,bij->bjhw", self._as_probs(x).to(mats.dtype), mats)

    @staticmethod
    def _dtype(x: torch.Tensor) -> torch.dtype:
        """float64 inputs are computed in float64, everything else (long, half) in float32."""
        return x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32

    # ----------------------------------------------------------------------------------- forward process

    def q_probs(self, x0: torch.Tensor, t) -> torch.Tensor:
        """q(x_t | x_0) = Cat(x_0 Q_bar_t) (DDPS Eq. 2; D3PM Eq. 3): long (B, H, W) or probs -> (B, S, H, W)."""
        t = self._times(t, x0.shape[0], x0.device)
        mats = self._between_batch(torch.zeros_like(t), t, self._dtype(x0))  # (B, S, S) = Q_bar_t
        return self._propagate(x0, mats)

    def q_sample(self, x0: torch.Tensor, t, generator: torch.Generator | None = None,
                 noise: torch.Tensor | None = None) -> torch.Tensor:
        """x_t ~ q(x_t | x_0) (DDPS Eq. 2): (B, H, W) long; ``noise`` as in :meth:`sample`."""
        return self.sample(self.q_probs(x0, t), generator, noise)

    def renoise(self, x_s: torch.Tensor, s, t, generator: torch.Generator | None = None) -> torch.Tensor:
        """x_t ~ q(x_t | x_s) = Cat(x_s Q_{s->t}) for s <= t, multi-step forward (free re-noising, DDPS Alg. 2)."""
        s = self._times(s, x_s.shape[0], x_s.device)
        t = self._times(t, x_s.shape[0], x_s.device)
        assert bool((s <= t).all()), "renoise goes forward in time: needs s <= t"
        return self.sample(self._propagate(x_s, self._between_batch(s, t, self._dtype(x_s))), generator)

    # ----------------------------------------------------------------------------------- posterior

    def _posterior_log(self, x_t: torch.Tensor, x0: torch.Tensor, t, s=None) -> torch.Tensor:
        """log q(x_s | x_t, x_0), normalised over states: (B, S, H, W).

        Bayes (DDPS Eq. 3; D3PM Eq. 4): q(x_s | x_t, x_0) = q(x_t | x_s) q(x_s | x_0) / q(x_t | x_0)
        ∝ Q_{s->t}[:, x_t] ⊙ (x_0 Q_bar_s). With x_0 given as probabilities p̂ this is D3PM's
        x0-parameterised p(x_s | x_t) ∝ Q_{s->t}[:, x_t] ⊙ (p̂ Q_bar_s). Computed in log space; zero
        factors are clamped to the dtype's smallest normal number, so nothing is NaN.
        """
        assert x_t.dtype == torch.long and x_t.dim() == 3, f"x_t must be long (B, H, W), got {tuple(x_t.shape)}"
        batch, device = x_t.shape[0], x_t.device
        t = self._times(t, batch, device)
        s = t - 1 if s is None else self._times(s, batch, device)
        assert bool((s < t).all()) and bool((s >= 0).all()), "posterior needs 0 <= s < t (t = 0 is clean)"
        dtype = self._dtype(x0)
        forward = self._between_batch(s, t, dtype)                       # (B, S, S) = Q_{s->t}
        b = torch.arange(batch, device=device)[:, None, None]
        likelihood = forward.transpose(1, 2)[b, x_t].permute(0, 3, 1, 2)  # (B, S, H, W) q(x_t | x_s = i)
        prior = self._propagate(x0, self._between_batch(torch.zeros_like(s), s, dtype))  # q(x_s | x_0)
        tiny = torch.finfo(dtype).tiny
        logits = likelihood.clamp_min(tiny).log() + prior.clamp_min(tiny).log()
        return logits.log_softmax(dim=1)

    def posterior(self, x_t: torch.Tensor, x0: torch.Tensor, t, s=None) -> torch.Tensor:
        """q(x_s | x_t, x_0) for s < t (default s = t - 1), DDPS Eq. 3: (B, S, H, W) probabilities.

        x0 is a long (B, H, W) state map or probabilities (B, K or S, H, W) (then D3PM's x0-parameterised
        p(x_s | x_t)); see `_posterior_log` for the formula.
        """
        return self._posterior_log(x_t, x0, t, s).exp()

    # ----------------------------------------------------------------------------------- sampling

    def sample(self, probs: torch.Tensor, generator: torch.Generator | None = None,
               noise: torch.Tensor | None = None) -> torch.Tensor:
        """x ~ Cat(probs) per pixel by Gumbel-max, argmax_k (log p_k + g_k) with g = -log(-log u).

        (B, S, H, W) probabilities -> (B, H, W) long; zero-probability states are never drawn. ``noise``:
        the uniforms u (B, S, H, W) to use instead of drawing them (e.g. keyed by sample, see SampleRNG).
        """
        probs = probs.float()
        u = torch.rand(probs.shape, generator=generator, device=probs.device) if noise is None else noise
        assert u.shape == probs.shape, f"noise {tuple(u.shape)} for probabilities {tuple(probs.shape)}"
        gumbel = -torch.log(-torch.log(u.clamp_min(torch.finfo(u.dtype).tiny)))
        return (probs.log() + gumbel).argmax(dim=1)                      # log 0 = -inf is never chosen

    def stationary(self) -> torch.Tensor:
        """The limit of q(x_T | x_0) as alpha_bar_T -> 0, independent of x_0: float64 (S,).

        uniform: 1/K each; mask: all mass on [MASK]; uniform+mask: gamma_bar_T / (1 - alpha_bar_T) on
        [MASK], the rest spread evenly over the K real states.
        """
        masked = float(self.gamma_bar[-1] / (1 - self.alpha_bar[-1]))
        p = torch.full((self.num_states,), (1 - masked) / self.num_categories, dtype=torch.float64)
        if self.mask_index is not None:
            p[self.mask_index] = masked
        return p

    def prior(self, shape: tuple[int, int, int], generator: torch.Generator | None = None,
              device=None, noise: torch.Tensor | None = None) -> torch.Tensor:
        """x_T ~ the stationary distribution (the start of DDPS Alg. 2): (B, H, W) long."""
        batch, height, width = shape
        p = self.stationary().to(device=device, dtype=torch.float32)
        return self.sample(p.view(1, -1, 1, 1).expand(batch, -1, height, width), generator, noise)

    def draw_noise(self, rng: SampleRNG, h: int, w: int, stream: int) -> torch.Tensor:
        """The Gumbel-max uniforms u of one (h, w) state-map draw (see :meth:`sample`): (B, S, h, w)."""
        return rng.rand((self.num_states, h, w), stream)

    # ----------------------------------------------------------------------------------- the denoiser's side

    @property
    def mask_input(self) -> MaskInput:
        """x_t enters the denoiser as a state map through Embedding(S, E) (DDPS §3.2)."""
        return MaskInput("embed", num_states=self.num_states)

    def q_sample_labels(self, x0: torch.Tensor, t, generator: torch.Generator | None = None,
                        noise: torch.Tensor | None = None) -> torch.Tensor:
        """x_t ~ q(x_t | x_0) (DDPS Eq. 2): a class map is a state map here, so this is :meth:`q_sample`."""
        return self.q_sample(x0, t, generator=generator, noise=noise)

    def free_step(self, logits: torch.Tensor, s: torch.Tensor,
                  generator: torch.Generator | None = None) -> torch.Tensor:
        """x_s ~ q(x_s | x̂_0), x̂_0 = argmax logits (free re-noising, DDPS Alg. 2): (B, H, W) long."""
        return self.q_sample(logits.argmax(1), s, generator=generator)

    def posterior_step(self, x_t: torch.Tensor, logits: torch.Tensor, t: torch.Tensor, s: torch.Tensor,
                       generator: torch.Generator | None = None) -> torch.Tensor:
        """x_s ~ q(x_s | x_t, x̂_0), x̂_0 = argmax logits, for s < t (DDPS Eq. 3): (B, H, W) long."""
        return self.sample(self.posterior(x_t, logits.argmax(1), t, s), generator=generator)

    # ----------------------------------------------------------------------------------- loss

    def vlb_term(self, x0: torch.Tensor, x_t: torch.Tensor, t, pred_x0_logits: torch.Tensor,
                 valid: torch.Tensor | None = None) -> torch.Tensor:
        """The variational-bound term L_{t-1} of the hybrid loss (D3PM Eq. 5 and Sec. 3.4), nats per pixel: (B,).

        t >= 2: KL( q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t) ), p = posterior with x_0 ~ softmax(logits);
        t == 1: -log p̂(x_0 | x_1), the predicted probability of the true class.
        Averaged over the pixels where `valid` (B, H, W) is true (all pixels when None).
        """
        batch, k = pred_x0_logits.shape[:2]
        assert k == self.num_classes and pred_x0_logits.shape[2:] == x0.shape[1:] == x_t.shape[1:], \
            f"logits {tuple(pred_x0_logits.shape)}, x0 {tuple(x0.shape)}, x_t {tuple(x_t.shape)}"
        t = self._times(t, batch, x0.device)
        assert bool((t >= 1).all()), "vlb_term needs t >= 1 (t = 0 is the clean mask)"
        if valid is not None:
            x0 = torch.where(valid, x0, torch.zeros_like(x0))
        log_p_hat = pred_x0_logits.float().log_softmax(dim=1)           # (B, K, H, W)
        log_q = self._posterior_log(x_t, x0, t)                          # (B, S, H, W)
        log_p = self._posterior_log(x_t, log_p_hat.exp(), t)             # (B, S, H, W)
        kl = (log_q.exp() * (log_q - log_p)).sum(dim=1)                  # (B, H, W)
        nll = -log_p_hat.gather(1, x0[:, None]).squeeze(1)               # (B, H, W)
        per_pixel = torch.where((t == 1)[:, None, None], nll, kl)
        weight = torch.ones_like(per_pixel) if valid is None else valid.to(per_pixel.dtype)
        return (per_pixel * weight).sum(dim=(1, 2)) / weight.sum(dim=(1, 2)).clamp_min(1)
