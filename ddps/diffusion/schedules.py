"""Noise schedules: the cumulative keep probability alpha_bar_t for t = 0 .. T.

Time convention (the whole package): t = 0 is the clean mask, t = T is pure noise. Every schedule returns
a float64 array of shape (T + 1,) with alpha_bar_0 = 1, strictly decreasing, alpha_bar_T about 9e-6.

- linear (VQ-Diffusion, Gu et al. 2022; DDPS's official code): alpha_bar_t for t = 1 .. T linear from
  0.99999 down to 0.000009.
- cosine (Nichol & Dhariwal 2021, Eq. 17): alpha_bar_t = f(t) / f(0), f(t) = cos^2((t/T + s)/(1 + s) * pi/2),
  s = 0.008. f(T) = 0, so we squeeze it affinely into [0.000009, 1]:
  alpha_bar_t <- a_T + (1 - a_T) * alpha_bar_t, which keeps alpha_bar_0 = 1 and the strict decrease.
"""
from __future__ import annotations

import math

import numpy as np

from ddps.errors import ConfigError, choices

ALPHA_BAR_1 = 0.99999    # keep probability after the first step (linear schedule)
ALPHA_BAR_T = 0.000009   # keep probability at t = T (both schedules)
COSINE_OFFSET = 0.008    # Nichol & Dhariwal's s


def linear(steps: int) -> np.ndarray:
    """alpha_bar_0 = 1; alpha_bar_t = linspace(0.99999, 0.000009, T)[t - 1] for t >= 1.

    With T = 1 the single step goes straight to alpha_bar_1 = 0.000009 (pure noise), so single-step
    training sees maximum noise.
    """
    tail = np.linspace(ALPHA_BAR_1, ALPHA_BAR_T, steps) if steps > 1 else np.array([ALPHA_BAR_T])
    return np.concatenate([[1.0], tail]).astype(np.float64)


def cosine(steps: int) -> np.ndarray:
    """alpha_bar_t = a_T + (1 - a_T) * f(t)/f(0), f(t) = cos^2(((t/T) + s)/(1 + s) * pi/2) (Nichol & Dhariwal)."""
    t = np.arange(steps + 1, dtype=np.float64) / steps
    f = np.cos((t + COSINE_OFFSET) / (1 + COSINE_OFFSET) * math.pi / 2) ** 2
    ratio = np.clip(f / f[0], 0.0, 1.0)
    ratio[-1] = 0.0  # cos(pi/2)^2 is 3.7e-33 in floating point, not 0
    out = ALPHA_BAR_T + (1 - ALPHA_BAR_T) * ratio
    out[0] = 1.0
    return out


SCHEDULES = {"linear": linear, "cosine": cosine}


def alpha_bar(schedule: str, steps: int) -> np.ndarray:
    """The cumulative keep probability alpha_bar_t, t = 0 .. T, as float64 (T + 1,)."""
    if schedule not in SCHEDULES:
        raise ConfigError(f"unknown noise schedule {schedule!r}; choose from: {choices(SCHEDULES)}")
    if int(steps) < 1:
        raise ConfigError(f"diffusion steps={steps!r} is out of range: >= 1")
    out = SCHEDULES[schedule](int(steps))
    assert out.shape == (steps + 1,) and out[0] == 1.0 and np.all(np.diff(out) < 0), schedule
    return out
