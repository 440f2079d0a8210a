"""The step lists of Algorithm 2 (stride sampling): at which times t the denoiser is called. Plain Python (no
torch), so that the planner's time estimates and the benchmarks can count the calls."""
from __future__ import annotations

from ddps.config.schema import STEP_LISTS


def step_times(train_steps: int, test_steps: int, times: str = "even") -> list[int]:
    """The times at which the denoiser is called. ``even``: t_k = T − k·Δ, k = 0 … K−1, Δ = T // K (K calls);
    ``official``: the official code's list, t = T − i for i in range(0, T, Δ), then t = 1 unless already last."""
    if not 1 <= test_steps <= train_steps:
        raise ValueError(f"test steps {test_steps} must be in 1..{train_steps} (the train steps)")
    if times not in STEP_LISTS:
        raise ValueError(f"unknown step list {times!r}; choose from: {', '.join(STEP_LISTS)}")
    stride = train_steps // test_steps
    if times == "even":
        return [train_steps - k * stride for k in range(test_steps)]
    out = [train_steps - i for i in range(0, train_steps, stride)]
    return out if out[-1] == 1 else out + [1]
