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
        parts = [f"[{self.name}] it {step}" + (f"/{self.total}" if self.total else "")]
        for key, value in metrics.items():
            parts.append(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}")
        if self.total and step > 0:
            elapsed = time.perf_counter() - self.start
            parts.append(f"eta {format_seconds(elapsed / step * (self.total - step))}")
        print("  ".join(parts), file=self.stream, flush=True)

    def info(self, message: str) -> None:
        print(f"[{self.name}] {message}", file=self.stream, flush=True)


class NullReporter:
    def __init__(self):
        self.history: list[tuple[int, dict]] = []

    def log(self, metrics: dict, step: int) -> None:
        self.history.append((step, dict(metrics)))

    def info(self, message: str) -> None:
        pass
