"""Training throughput of the models the `cpu` sweeps train, side by side, as ratios to the `cpu` preset's.

    .venv/bin/python benchmarks/sweep_rates.py [--repeats 2] [--steps 6] [--threads 2]

Base segmentors: one AdamW step of the segmentation loss at the table's crop (batch 32); denoisers: one
stage-2 step of the DDPS loss on cached features (batch 32, `residual` on, as the `cpu` preset). Rows are
interleaved and repeated (a shared machine's speed drifts): compare the ratios, which the sweep planner's
time estimates use (``ddps/orchestration/estimates.py``: BASE_RATIO, DENOISER_RATIO).
"""
from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from ddps.config import resolve  # noqa: E402
from ddps.diffusion.rng import SampleRNG  # noqa: E402
from ddps.engine.features import conditioning  # noqa: E402
from ddps.refiner.build import build_codec, build_denoiser, build_process  # noqa: E402
from ddps.refiner.objective import Batch, refiner_loss  # noqa: E402
from ddps.segmentors import create_base  # noqa: E402

CLASSES, BATCH, CHANNELS = 11, 32, 128
BASES = [("segformer", "mit_b0", 64), ("deeplabv3plus", "mobilenet_v2", 64), ("deeplabv3plus", "resnet18", 64),
         ("deeplabv3plus", "resnet50", 64), ("segformer", "mit_b1", 64), ("segformer", "mit_b0", 96),
         ("segformer", "mit_b1", 96)]
DENOISERS = [("XS", 64), ("XXS", 64), ("T", 64), ("S", 64), ("XS", 96)]


def _time(step, steps: int) -> float:
    for _ in range(2):  # warm-up
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return BATCH * steps / (time.perf_counter() - start)


def base_rate(arch: str, backbone: str, crop: int, steps: int) -> float:
    torch.manual_seed(0)
    model = create_base(arch, backbone, CLASSES, feature_channels=CHANNELS)
    x, y = torch.randn(BATCH, 3, crop, crop), torch.randint(0, CLASSES, (BATCH, crop, crop))
    optimizer = torch.optim.AdamW(model.parameters(), 1e-3)

    def step():
        loss = F.cross_entropy(model.segment(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return _time(step, steps)


def denoiser_rate(size: str, crop: int, steps: int) -> float:
    torch.manual_seed(0)
    cfg = resolve("cpu", None, {"denoiser.size": size})
    process = build_process(cfg, CLASSES)
    denoiser = build_denoiser(cfg, CLASSES, CHANNELS, process)
    codec = build_codec(cfg)
    h = crop // cfg.denoiser.mask_scale
    batch = conditioning(Batch(features=torch.randn(BATCH, CHANNELS, h, h),
                               labels=torch.randint(0, CLASSES, (BATCH, crop, crop)),
                               base_pred=torch.randint(0, CLASSES, (BATCH, h, h)),
                               base_logits=torch.randn(BATCH, CLASSES, h, h), keys=torch.arange(BATCH)),
                         cfg.denoiser.residual)
    optimizer = torch.optim.AdamW(denoiser.parameters(), 1e-3)
    it = [0]

    def step():
        it[0] += 1
        loss, _ = refiner_loss(denoiser, process, batch, codec, stage=2, target="first",
                               rng=SampleRNG(it[0], batch.keys))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return _time(step, steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    bases = {b: [] for b in BASES}
    denoisers = {d: [] for d in DENOISERS}
    for _ in range(args.repeats):
        for b in BASES:
            bases[b].append(base_rate(*b, steps=args.steps))
        for d in DENOISERS:
            denoisers[d].append(denoiser_rate(*d, steps=args.steps))
    print(f"torch {torch.__version__}, {args.threads} threads, batch {BATCH}, {args.repeats} x {args.steps} steps")
    print("\n| base | crop | images/s (runs) | ratio to SegFormer-B0 at 64 |\n|---|---|---|---|")
    ref = sum(bases[BASES[0]]) / args.repeats
    for (arch, backbone, crop), runs in bases.items():
        mean = sum(runs) / len(runs)
        print(f"| {arch}-{backbone} | {crop} | {mean:.1f} ({', '.join(f'{r:.1f}' for r in runs)}) | {mean / ref:.2f} |")
    print("\n| denoiser | crop | images/s (runs) | ratio to UNet-XS at 64 |\n|---|---|---|---|")
    ref = sum(denoisers[DENOISERS[0]]) / args.repeats
    for (size, crop), runs in denoisers.items():
        mean = sum(runs) / len(runs)
        print(f"| UNet-{size} | {crop} | {mean:.1f} ({', '.join(f'{r:.1f}' for r in runs)}) | {mean / ref:.2f} |")


if __name__ == "__main__":
    main()
