"""Noise processes over masks: discrete diffusion (uniform, mask, uniform+mask) and analog-bit diffusion,
behind one interface (ddps.diffusion.process.NoiseProcess) and one registry by name (ddps.diffusion.registry).

Time convention: t = 0 is the clean mask, t = T is pure noise. Core layer: torch and numpy only. Importing
this package imports neither: the registry is torch-free (the config reads its names), and the processes
below are imported when first named.
"""
from importlib import import_module

from ddps.diffusion.registry import PROCESSES, create_process, register_process

_LAZY = {"BitDiffusion": "bits", "MaskDiffusion": "discrete", "TRANSITIONS": "discrete", "NoiseProcess": "process",
         "MaskInput": "process", "RENOISE_MODES": "process", "SCHEDULES": "schedules", "alpha_bar": "schedules"}

__all__ = ["PROCESSES", "create_process", "register_process", *_LAZY]


def __getattr__(name: str):
    """``from ddps.diffusion import MaskDiffusion`` imports its module on first use (PEP 562)."""
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"ddps.diffusion.{_LAZY[name]}"), name)
