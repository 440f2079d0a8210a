"""The noise processes by name: ``diffusion.kind`` selects one, and new ones are registered here.

``PROCESSES`` maps a name to a factory ``factory(num_classes, steps, **options) -> NoiseProcess``. The
options are the keys of the config's diffusion section (``transition``, ``schedule``, ``bit_scale``) and any a
caller adds; a factory reads those of its process and leaves the rest (``transition`` is the discrete
process's, ``bit_scale`` the analog bits'). This module imports no torch, so the config validates
``diffusion.kind`` against it at once; the built-in factories import their process when called.
"""
from __future__ import annotations

from typing import Callable

from ddps.errors import ConfigError, choices


def discrete_process(num_classes: int, steps: int, *, transition: str = "uniform", schedule: str = "linear",
                     mask_max: float = 0.9, num_states: int | None = None, **other_processes_options):
    """Discrete diffusion over the classes (+ [MASK]): ddps.diffusion.discrete.MaskDiffusion."""
    from ddps.diffusion.discrete import MaskDiffusion
    return MaskDiffusion(num_classes, steps, transition=transition, schedule=schedule, mask_max=mask_max,
                         num_states=num_states)


def bit_process(num_classes: int, steps: int, *, schedule: str = "cosine", bit_scale: float = 0.1,
                **other_processes_options):
    """Gaussian diffusion on analog bits (DDPS Table 8): ddps.diffusion.bits.BitDiffusion."""
    from ddps.diffusion.bits import BitDiffusion
    return BitDiffusion(num_classes, steps, schedule=schedule, scale=bit_scale)


PROCESSES: dict[str, Callable] = {"discrete": discrete_process, "bits": bit_process}


def register_process(name: str, factory: Callable) -> None:
    """Add ``factory(num_classes, steps, **options)`` under ``name``; a taken name is refused."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"a process name must be a non-empty string, got {name!r}")
    if name in PROCESSES:
        raise ValueError(f"a noise process named {name!r} is registered already")
    PROCESSES[name] = factory


def create_process(name: str, num_classes: int, steps: int, **options):
    """The process registered as ``name`` for K = num_classes classes and T = steps; a one-line ConfigError
    lists the names when ``name`` is unknown."""
    if name not in PROCESSES:
        raise ConfigError(f"unknown diffusion kind {name!r}; choose from: {choices(PROCESSES)}")
    return PROCESSES[name](num_classes, steps, **options)
