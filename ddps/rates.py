"""Measured GPU rates: what ``benchmarks/gpu.py`` writes when it has run on a GPU, and what the dry run of a
sweep reads to print GPU-hours (``orchestration/estimates.py``). No imports beyond the standard library and
``ddps.paths``: the benchmark (core and engine only) and the orchestration both use it.

The file (JSON, default ``$DDPS_HOME/rates/gpu.json``) holds, per precision, images/s of base training and
of refiner training (stage 2 with the base's forward) and denoiser calls/s of evaluation, at the shapes it
names (crop, classes, base, UNet size), with the device, torch version and date. Nothing else writes it: a
dry run without it says "no GPU rate measured" rather than print a number from nowhere.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ddps.errors import DDPSError
from ddps.paths import ddps_home

RATES_FILE = "gpu.json"


def default_path() -> Path:
    """$DDPS_HOME/rates/gpu.json (not created by asking)."""
    return ddps_home() / "rates" / RATES_FILE


@dataclass(frozen=True)
class GPURates:
    device: str                 # the card's name, as torch reports it
    torch: str
    measured: str               # ISO date and time
    shapes: dict                # crop, classes, arch, backbone, denoiser size, T
    base_images_per_s: dict = field(default_factory=dict)     # precision -> base training images/s
    refiner_images_per_s: dict = field(default_factory=dict)  # precision -> refiner training images/s
    eval_calls_per_s: dict = field(default_factory=dict)      # precision -> denoiser calls/s in evaluation


def write_rates(rates: GPURates, path: str | Path | None = None) -> Path:
    """Write ``rates`` (atomically: a reader never sees half a file); the path written."""
    path = Path(path) if path else default_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(asdict(rates), indent=1, sort_keys=True))
    os.replace(tmp, path)
    return path


def read_rates(path: str | Path | None = None) -> GPURates | None:
    """The rates in ``path`` (default: DDPS_HOME's), None when there is no such file; a file that is not a
    rates file is a one-line error naming it."""
    path = Path(path) if path else default_path()
    if not path.exists():
        return None
    try:
        return GPURates(**json.loads(path.read_text()))
    except (ValueError, TypeError) as e:
        raise DDPSError(f"{path} is not a GPU rates file written by benchmarks/gpu.py ({e})") from None
