"""Reporters: where the engine's loops send metrics. The engine never imports a tracker; it calls these.

``ConsoleReporter`` prints progress (iterations, loss, images/s, ETA); the orchestration layer supplies
reporters that forward to Ray Train and MLflow.
"""
from __future__ import annotations

import sys
import time
from typing import Protocol


class Reporter(Protocol):
    def log(self, metrics: dict, step: int) -> None: ...
    def info(self, message: str) -> None: ...


def format_seconds(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


class ConsoleReporter:
    """Prints one line per log call: step/total, the metrics, and an ETA from the mean step time."""

    def __init__(self, name: str, total: int | None = None, stream=None):
        self.name, self.total = name, total
        self.stream = stream or sys.stdout
        self.start = time.perf_counter()
        self.history: list[tuple[int, dict]] = []

    def log(self, metrics: dict, step: int) -> None:
        self.history.append((step, dict(metrics)))
        print(record_line(self.name, step, self.total, metrics, self.eta(step)), file=self.stream, flush=True)

    def eta(self, step: int) -> float | None:
        """Seconds left at the mean step time so far; None without a total or before the first step."""
        if not self.total or step <= 0:
            return None
        return (time.perf_counter() - self.start) / step * (self.total - step)

    def info(self, message: str) -> None:
        print(f"[{self.name}] {message}", file=self.stream, flush=True)


def record_line(name: str, step: int, total: int | None, metrics: dict, eta_s: float | None = None) -> str:
    """One progress record in full: ``[name] it step/total  key value ...  eta 1m20s``."""
    parts = [f"[{name}] it {step}" + (f"/{total}" if total else "")]
    for key, value in metrics.items():
        parts.append(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}")
    if eta_s is not None:
        parts.append(f"eta {format_seconds(eta_s)}")
    return "  ".join(parts)


class NullReporter:
    def __init__(self):
        self.history: list[tuple[int, dict]] = []

    def log(self, metrics: dict, step: int) -> None:
        self.history.append((step, dict(metrics)))

    def info(self, message: str) -> None:
        pass
