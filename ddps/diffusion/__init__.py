"""Noise processes over masks: discrete diffusion (uniform, mask, uniform+mask) and analog-bit diffusion.

Time convention: t = 0 is the clean mask, t = T is pure noise. Core layer: torch and numpy only.
"""
from ddps.diffusion.bits import BitDiffusion
from ddps.diffusion.discrete import TRANSITIONS, MaskDiffusion
from ddps.diffusion.schedules import SCHEDULES, alpha_bar

__all__ = ["SCHEDULES", "TRANSITIONS", "BitDiffusion", "MaskDiffusion", "alpha_bar"]
