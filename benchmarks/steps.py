"""The training and inference steps the performance benchmarks time, built from the core layer only (torch and
segmentation-models-pytorch through ``ddps``: no Ray, no MLflow), so ``gpu.py`` runs on a bare GPU machine.

- ``refiner_step``: one DDPS stage-2 step (Algorithm 1) of a denoiser on a batch — from cached features
  (``base=None``, as the ``cpu`` preset trains) or with the frozen base's forward pass first (as the
  ``paper`` preset trains, its augmentation ruling out a cache);
- ``step_flops``: the FLOPs of one call, counted by ``torch.utils.flop_counter`` (matmuls and convolutions,
  forward and backward);
- ``matmul_flops_per_s``: the dense matmul FLOP/s this device reaches with the same threads and dtype — the
  denominator of the model FLOPs utilisation;
- ``timed``: seconds per call after warm-up, synchronising a GPU;
- ``latency``: inference of base + K refinement steps, on the even step list (``LATENCY_STEP_LIST``);
  ``step_list`` names the list a trajectory's call times follow.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from ddps.config import Config
from ddps.diffusion.rng import SampleRNG
from ddps.engine.features import base_batch, conditioning
from ddps.refiner.build import build_codec, build_denoiser, build_process
from ddps.refiner.objective import Batch, refiner_loss
from ddps.segmentors import create_base


def sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def timed(step: Callable[[], object], calls: int, warmup: int = 2, device: str = "cpu") -> float:
    """Seconds per call of ``step``, after ``warmup`` calls (compilation, allocator, caches)."""
    for _ in range(warmup):
        step()
    sync(device)
    start = time.perf_counter()
    for _ in range(calls):
        step()
    sync(device)
    return (time.perf_counter() - start) / calls


def step_flops(step: Callable[[], object]) -> float:
    """FLOPs of one call of ``step`` (matmuls and convolutions, forward and backward)."""
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return float(counter.get_total_flops())


def matmul_flops_per_s(n: int = 2048, device: str = "cpu", dtype: torch.dtype = torch.float32,
                       calls: int = 10) -> float:
    """Dense (n x n) @ (n x n) FLOP/s: 2 n^3 per product."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    seconds = timed(lambda: torch.mm(a, b), calls, warmup=3, device=device)
    return 2 * n ** 3 / seconds


@dataclass
class RefinerStep:
    step: Callable[[], object]  # one optimiser step
    batch_size: int
    denoiser_params: int
    base_params: int


def refiner_step(cfg: Config, *, classes: int, batch_size: int, crop: int, device: str = "cpu",
                 base: bool = False, autocast: torch.dtype | None = None, channels_last: bool = False,
                 compile: bool = False, seed: int = 0) -> RefinerStep:
    """One stage-2 DDPS step on a random batch of ``crop`` x ``crop`` images: the frozen base's forward pass
    (``base``) or features of its shape, then the denoiser's loss, backward and AdamW step."""
    torch.manual_seed(seed)
    process = build_process(cfg, classes)
    codec = build_codec(cfg)
    segmentor = create_base(cfg.base.arch, cfg.base.backbone, classes,
                            feature_channels=cfg.base.feature_channels).to(device).eval()
    for p in segmentor.parameters():
        p.requires_grad_(False)
    channels = segmentor.feature_channels
    denoiser = build_denoiser(cfg, classes, channels, process).to(device)
    memory = torch.channels_last if channels_last else torch.contiguous_format
    denoiser = denoiser.to(memory_format=memory)
    segmentor = segmentor.to(memory_format=memory)
    forward = torch.compile(denoiser) if compile else denoiser
    optimizer = torch.optim.AdamW(denoiser.parameters(), 1e-4)
    images = torch.randn(batch_size, 3, crop, crop, device=device).contiguous(memory_format=memory)
    labels = torch.randint(0, classes, (batch_size, crop, crop), device=device)
    keys = torch.arange(batch_size, device=device)
    if not base:  # the cached features of a batch: computed once here, as the feature cache holds them
        with torch.no_grad(), torch.autocast(torch.device(device).type, autocast, enabled=autocast is not None):
            cached = base_batch(segmentor, images, labels, codec, keys=keys)
        cached = Batch(features=cached.features.float().contiguous(memory_format=memory), labels=labels,
                       base_pred=cached.base_pred, base_logits=cached.base_logits.float(), keys=keys)
    it = [0]

    def step():
        it[0] += 1
        with torch.autocast(torch.device(device).type, autocast, enabled=autocast is not None):
            if base:
                with torch.no_grad():
                    batch = base_batch(segmentor, images, labels, codec, keys=keys)
            else:
                batch = cached
            batch = conditioning(batch, cfg.denoiser.residual)
            loss, _ = refiner_loss(forward, process, batch, codec, stage=2, target=cfg.train.target,
                                   rng=SampleRNG(it[0], keys, device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss

    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    return RefinerStep(step, batch_size, count(denoiser), count(segmentor))


# The step list ``latency`` times: ``refine(..., K)`` calls the denoiser at the sampler's ``step_times(T, K)``,
# t = T, T - T/K, ..., T/K (K calls) — not the official code's list (ddps.refiner.sampler.step_times: K + 1 calls
# when K divides T and K < T).
LATENCY_STEP_LIST = "even"


def step_list(times, train_steps: int, test_steps: int) -> str:
    """The name of the step list a trajectory's call ``times`` follow: 'even' (K calls), 'official' (the
    official code's: ddps.refiner.sampler.step_times), or 'other'. K above T is T, as the sampler takes it."""
    from ddps.refiner.sampler import STEP_LISTS, step_times
    times = list(times)
    return next((name for name in STEP_LISTS
                 if times == step_times(train_steps, min(test_steps, train_steps), name)), "other")


def latency(segmentor, denoiser, process, cfg: Config, images: torch.Tensor, ks: tuple[int, ...], *,
            calls: int = 5, autocast: torch.dtype | None = None) -> dict[int, float]:
    """Seconds per call of inference on ``images``: the base alone (key 0: forward pass and argmax) and the
    base then K refinement steps (its features computed once per image, as inference does), for K in ``ks``:
    K denoiser calls, the even step list (``LATENCY_STEP_LIST``) whatever ``cfg.infer.times`` says."""
    from ddps.refiner.sampler import refine
    codec = build_codec(cfg)
    device = str(images.device)
    size = images.shape[-2:]
    labels = torch.zeros(images.shape[0], *size, dtype=torch.long, device=images.device)
    segmentor, denoiser = segmentor.eval(), denoiser.eval()

    @torch.no_grad()
    def run(k: int):
        with torch.autocast(torch.device(device).type, autocast, enabled=autocast is not None):
            batch = base_batch(segmentor, images, labels, codec)
            if k == 0:
                return codec.decode(batch.base_logits, size).argmax(1)
            batch = conditioning(batch, cfg.denoiser.residual)
            trajectory = refine(denoiser, process, batch.features, k, cfg.infer.renoise)
            return codec.decode(trajectory.final, size).argmax(1)
    return {k: timed(lambda: run(k), calls, warmup=2, device=device) for k in (0, *ks)}
