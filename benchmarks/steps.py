"""The training and inference steps the performance benchmarks time, built from the core and engine layers only
(torch and segmentation-models-pytorch through ``ddps``: no Ray, no MLflow, and nothing that imports ``ddps.data``
and with it albumentations), so ``gpu.py`` runs on a bare GPU machine. Precision is the engine's
(``ddps.engine.device``: ``autocast``, ``grad_scaler``, ``backward_step``, ``optimizer_step``), named fp32 | bf16 |
fp16 as the config names it.

- ``base_step``: one base-segmentor training step on a batch of random crops (forward, loss at the crop's
  resolution, backward, AdamW step);
- ``refiner_step``: one DDPS stage-2 step (Algorithm 1) of a denoiser on a batch — from cached features
  (``base=None``, as the ``cpu`` preset trains) or with the frozen base's forward pass first (as the
  ``paper`` preset trains, its augmentation ruling out a cache);
- ``evaluation_step``: the engine's evaluation (``evaluate_refiner``) of a batch held as a split in memory (the
  base, then K refinement steps on ``infer.times``, every prediction decoded to the label size and scored);
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
from dataclasses import dataclass, replace
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from ddps.config import Config
from ddps.diffusion.rng import SampleRNG
from ddps.engine.device import autocast, backward_step, grad_scaler, optimizer_step
from ddps.engine.evaluate_refiner import evaluate_refiner
from ddps.engine.features import base_batch, conditioning
from ddps.refiner.build import build_codec, build_denoiser, build_process
from ddps.refiner.objective import Batch, refiner_loss
from ddps.refiner.sampler import STEP_LISTS, refine, step_times
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
class TrainStep:
    step: Callable[[], object]  # one optimiser step
    batch_size: int
    trained_params: int         # what the optimiser updates
    frozen_params: int = 0      # the frozen base's, run forward only (refiner training)


def count_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def make_base(cfg: Config, classes: int, device: str = "cpu", memory=torch.contiguous_format):
    """The ``cfg.base`` segmentor, randomly initialised (speed does not depend on the weights)."""
    return create_base(cfg.base.arch, cfg.base.backbone, classes,
                       feature_channels=cfg.base.feature_channels).to(device).to(memory_format=memory)


def random_batch(batch_size: int, crop: int, classes: int, device: str = "cpu", memory=torch.contiguous_format):
    """Random images (B, 3, crop, crop) and labels (B, crop, crop) in 0 .. classes - 1."""
    images = torch.randn(batch_size, 3, crop, crop, device=device).contiguous(memory_format=memory)
    return images, torch.randint(0, classes, (batch_size, crop, crop), device=device)


def base_step(cfg: Config, *, classes: int, batch_size: int, crop: int, device: str = "cpu",
              precision: str = "fp32", ignore_index: int = 255, seed: int = 0) -> TrainStep:
    """One training step of the ``cfg.base`` segmentor on a random batch, as train_base's loop takes it: the
    forward pass under the precision's autocast, the logits upsampled to the crop in float32 and the
    cross-entropy, backward (scaled for fp16), AdamW (train_base's lr and weight decay, in one parameter group where the
    engine's ``param_groups`` makes two: the same arithmetic)."""
    torch.manual_seed(seed)
    model = make_base(cfg, classes, device).train()
    tc = cfg.train_base
    optimizer = torch.optim.AdamW(model.parameters(), tc.lr, weight_decay=tc.weight_decay)
    scaler = grad_scaler(device, precision)
    images, labels = random_batch(batch_size, crop, classes, device)

    def step():
        with autocast(device, precision):
            logits = model(images).logits
        logits = F.interpolate(logits.float(), size=images.shape[-2:], mode="bilinear", align_corners=False)
        loss = F.cross_entropy(logits, labels, ignore_index=ignore_index)
        optimizer.zero_grad(set_to_none=True)
        backward_step(loss, scaler)
        optimizer_step(optimizer, scaler)
        return loss

    return TrainStep(step, batch_size, count_params(model))


def refiner_step(cfg: Config, *, classes: int, batch_size: int, crop: int, device: str = "cpu",
                 base: bool = False, precision: str = "fp32", channels_last: bool = False,
                 compile: bool = False, seed: int = 0) -> TrainStep:
    """One stage-2 DDPS step on a random batch of ``crop`` x ``crop`` images: the frozen base's forward pass
    (``base``) or features of its shape, then the denoiser's loss, backward and AdamW step; the base's forward
    and the loss under the precision's autocast (train.precision covers the features refiner training reads)."""
    torch.manual_seed(seed)
    process = build_process(cfg, classes)
    codec = build_codec(cfg)
    memory = torch.channels_last if channels_last else torch.contiguous_format
    segmentor = make_base(cfg, classes, device, memory).eval()
    for p in segmentor.parameters():
        p.requires_grad_(False)
    denoiser = build_denoiser(cfg, classes, segmentor.feature_channels, process).to(device)
    denoiser = denoiser.to(memory_format=memory)
    forward = torch.compile(denoiser) if compile else denoiser
    optimizer = torch.optim.AdamW(denoiser.parameters(), 1e-4)
    scaler = grad_scaler(device, precision)
    images, labels = random_batch(batch_size, crop, classes, device, memory)
    keys = torch.arange(batch_size, device=device)
    if not base:  # the cached features of a batch: computed once here, as the feature cache holds them
        with torch.no_grad(), autocast(device, precision):
            cached = base_batch(segmentor, images, labels, codec, keys=keys)
        cached = Batch(features=cached.features.float().contiguous(memory_format=memory), labels=labels,
                       base_pred=cached.base_pred, base_logits=cached.base_logits.float(), keys=keys)
    it = [0]

    def step():
        it[0] += 1
        with autocast(device, precision):
            batch = base_batch(segmentor, images, labels, codec, keys=keys) if base else cached
            batch = conditioning(batch, cfg.denoiser.residual)
            loss, _ = refiner_loss(forward, process, batch, codec, stage=2, target=cfg.train.target,
                                   rng=SampleRNG(it[0], keys, device))
        optimizer.zero_grad(set_to_none=True)
        backward_step(loss, scaler)
        optimizer_step(optimizer, scaler)
        return loss

    return TrainStep(step, batch_size, count_params(denoiser), count_params(segmentor))


def noise_draw(cfg: Config, *, classes: int, batch_size: int, crop: int, device: str = "cpu") -> Callable[[], object]:
    """The per-sample noise a stage-2 step draws for q(x_t | x_0) (``SampleRNG``: one generator per sample on
    ``device``), alone."""
    process = build_process(cfg, classes)
    h, w = build_codec(cfg).mask_size(crop, crop)
    keys = torch.arange(batch_size)
    it = [0]

    def draw():
        it[0] += 1
        return process.draw_noise(SampleRNG(it[0], keys, device), h, w, 0)

    return draw


class TensorSplit(torch.utils.data.Dataset):
    """A test split held in memory (images (N, 3, H, W), labels (N, H, W) on the CPU), with the interface
    ``evaluate_refiner`` reads of a dataset."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, num_classes: int, ignore_index: int = 255):
        self.images, self.labels = images.cpu(), labels.cpu()
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.class_names = tuple(f"class {c}" for c in range(num_classes))
        self.name = "random split"

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        return {"image": self.images[index], "mask": self.labels[index]}


def evaluation_step(segmentor, denoiser, process, cfg: Config, images: torch.Tensor, labels: torch.Tensor,
                    steps: int, *, precision: str = "fp32", ignore_index: int = 255) -> tuple[Callable[[], None], int]:
    """The engine's evaluation (``evaluate_refiner``) of ``images`` as one split, and the denoiser calls per
    image: the images copied from host memory, the base's forward pass, then ``steps`` refinement steps on
    ``cfg.infer.times`` in one batch, under ``precision``; the base's and every step's prediction decoded to the
    label size and scored (mIoU and boundary IoU)."""
    split = TensorSplit(images, labels, segmentor.num_classes, ignore_index)
    cfg = replace(cfg, infer=replace(cfg.infer, steps=steps),
                  eval=replace(cfg.eval, batch_size=len(split), max_images=0, precision=precision))
    calls = len(step_times(process.steps, min(steps, process.steps), cfg.infer.times))
    device = images.device

    def step() -> None:
        evaluate_refiner(denoiser, process, None, cfg, base=segmentor.eval(), dataset=split, device=device)

    return step, calls


# The step list ``latency`` times: ``refine(..., K)`` calls the denoiser at the sampler's ``step_times(T, K)``,
# t = T, T - T/K, ..., T/K (K calls) — not the official code's list (ddps.refiner.sampler.step_times: K + 1 calls
# when K divides T and K < T).
LATENCY_STEP_LIST = "even"


def step_list(times, train_steps: int, test_steps: int) -> str:
    """The name of the step list a trajectory's call ``times`` follow: 'even' (K calls), 'official' (the
    official code's: ddps.refiner.sampler.step_times), or 'other'. K above T is T, as the sampler takes it."""
    times = list(times)
    return next((name for name in STEP_LISTS
                 if times == step_times(train_steps, min(test_steps, train_steps), name)), "other")


def latency(segmentor, denoiser, process, cfg: Config, images: torch.Tensor, ks: tuple[int, ...], *,
            calls: int = 5, precision: str = "fp32") -> dict[int, float]:
    """Seconds per call of inference on ``images``: the base alone (key 0: forward pass and argmax) and the
    base then K refinement steps (its features computed once per image, as inference does), for K in ``ks``:
    K denoiser calls, the even step list (``LATENCY_STEP_LIST``) whatever ``cfg.infer.times`` says."""
    codec = build_codec(cfg)
    device = str(images.device)
    size = images.shape[-2:]
    labels = torch.zeros(images.shape[0], *size, dtype=torch.long, device=images.device)
    segmentor, denoiser = segmentor.eval(), denoiser.eval()

    @torch.no_grad()
    def run(k: int):
        with autocast(device, precision):
            batch = base_batch(segmentor, images, labels, codec)
            if k == 0:
                return codec.decode(batch.base_logits, size).argmax(1)
            batch = conditioning(batch, cfg.denoiser.residual)
            trajectory = refine(denoiser, process, batch.features, k, cfg.infer.renoise)
            return codec.decode(trajectory.final, size).argmax(1)
    return {k: timed(lambda: run(k), calls, warmup=2, device=device) for k in (0, *ks)}
