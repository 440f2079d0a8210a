"""Random numbers keyed by sample, so that training does not depend on how a batch is split.

Sample i's draws depend only on (seed, keys[i], stream) and the device type (a GPU's generator is not the
CPU's) — never on which batch or which data-parallel worker holds it. With keys = the sample's position in
the global data order, 2 workers x batch b and 1 worker x batch 2b draw the same t, the same noise and the
same condition dropout for every sample.
"""
from __future__ import annotations

import torch

_MIX = (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9)


def _seed(seed: int, key: int, stream: int) -> int:
    return (seed * _MIX[0] + key * _MIX[1] + stream * 0x94D049BB133111EB) % (2**63 - 1)


class SampleRNG:
    """Per-sample draws: ``rand(shape, stream)`` / ``randn(shape, stream)`` -> (B, *shape)."""

    def __init__(self, seed: int, keys: torch.Tensor, device=None):
        self.seed, self.keys = int(seed), [int(k) for k in keys.tolist()]
        self.device = device

    def __len__(self) -> int:
        return len(self.keys)

    def _draw(self, fn, shape, stream: int) -> torch.Tensor:
        """On a GPU the draws are made there, by one generator per sample (a CPU draw of the Gumbel noise —
        states x mask pixels per sample — and its copy would cost a GPU step more than the step itself)."""
        device = torch.device(self.device) if self.device is not None else torch.device("cpu")
        if device.type == "cpu":
            return torch.stack([fn(shape, generator=torch.Generator().manual_seed(_seed(self.seed, k, stream)))
                                for k in self.keys])
        return torch.stack([fn(shape, device=device,
                               generator=torch.Generator(device=device).manual_seed(_seed(self.seed, k, stream)))
                            for k in self.keys])

    def rand(self, shape: tuple[int, ...], stream: int) -> torch.Tensor:
        return self._draw(torch.rand, tuple(shape), stream)

    def randn(self, shape: tuple[int, ...], stream: int) -> torch.Tensor:
        return self._draw(torch.randn, tuple(shape), stream)

    def subset(self, start: int, stop: int) -> "SampleRNG":
        out = SampleRNG(self.seed, torch.tensor(self.keys[start:stop], dtype=torch.long), self.device)
        return out
