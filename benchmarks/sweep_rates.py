"""Training throughput of the models the `cpu` sweeps train, side by side, as ratios to the `cpu` preset's.

    .venv/bin/python benchmarks/sweep_rates.py [--repeats 2] [--steps 6] [--threads 2]
    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/sweep_rates.py --mask-scales 4,8,2,1 [--repeats 2] [--steps 6]
        [--eval-steps 20]

Base segmentors: one AdamW step of the segmentation loss at the table's crop (batch 32); denoisers: one
stage-2 step of the DDPS loss on cached features (batch 32, `residual` on, as the `cpu` preset). Rows are
interleaved and repeated (a shared machine's speed drifts): compare the ratios, which the sweep planner's
time estimates use (``ddps/orchestration/estimates.py``: BASE_RATIO, DENOISER_RATIO).

``--mask-scales`` measures instead the `cpu` preset's refiner (UNet-XS, 64-pixel crops) at each
``denoiser.mask_scale`` given, as ratios to the first (MASK_SCALE_TRAIN_RATIO, MASK_SCALE_EVAL_RATIO there):
training images/s of a whole stage-2 iteration as ``fit_stage`` runs it (a batch gathered from a float16 feature
cache at the mask size, the loss, backward, AdamW and the EMA update), and evaluation denoiser calls/s of the
engine's evaluation (``evaluate_refiner`` over 32 random 64-pixel images held as a split, batch 32: the base's
forward, --eval-steps steps, every prediction decoded and scored). The scales take turns step by step; the
ratios are of CPU time (all threads), which the shared machine's other load does not change — run it with
OMP_WAIT_POLICY=PASSIVE, so that waiting threads sleep rather than spin — and of wall time beside them;
--repeats x --steps training steps and --repeats evaluations each (at mask_scale 1 an evaluation of 20 steps
takes about two minutes on 2 idle cores).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
sys.path[:0] = [str(Path(__file__).resolve().parent)]  # steps.py

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from ddps.config import resolve  # noqa: E402
from ddps.diffusion.rng import SampleRNG  # noqa: E402
from ddps.engine.features import FeatureCache, base_batch, conditioning  # noqa: E402
from ddps.engine.train_refiner import EMA  # noqa: E402
from ddps.refiner.build import build_codec, build_denoiser, build_process  # noqa: E402
from ddps.refiner.objective import Batch, refiner_loss  # noqa: E402
from ddps.segmentors import create_base  # noqa: E402
from steps import evaluation_step, make_base, random_batch  # noqa: E402

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


def mask_scale_steps(scale: int, eval_steps: int):
    """The cpu preset's refiner at ``denoiser.mask_scale=scale``, warmed up: (one training iteration, one
    evaluation of BATCH images, its denoiser calls)."""
    torch.manual_seed(0)
    cfg = resolve("cpu", None, {"denoiser.mask_scale": scale})
    tc, crop = cfg.train, cfg.data.crop
    base = make_base(cfg, CLASSES).eval()
    process = build_process(cfg, CLASSES)
    denoiser = build_denoiser(cfg, CLASSES, base.feature_channels, process)
    codec = build_codec(cfg)
    images, labels = random_batch(4 * BATCH, crop, CLASSES)
    cached = base_batch(base, images, labels, codec)  # what the feature cache holds, in float16 as it does
    cache = FeatureCache(cached.features.half(), cached.base_logits.half(), labels.to(torch.uint8))
    optimizer = torch.optim.AdamW(denoiser.parameters(), tc.lr, betas=(tc.beta1, tc.beta2),
                                  weight_decay=tc.weight_decay)
    ema = EMA(denoiser, tc.ema_decay, tc.ema_every)
    it = [0]

    def train():
        it[0] += 1
        denoiser.train()
        keys = torch.randperm(len(cache))[:BATCH]
        batch = conditioning(cache.batch(keys, keys=keys), cfg.denoiser.residual)
        optimizer.zero_grad(set_to_none=True)
        loss, _ = refiner_loss(denoiser, process, batch, codec, stage=2, target=tc.target,
                               rng=SampleRNG(it[0], batch.keys), loss=tc.loss, vlb_weight=tc.vlb_weight)
        loss.backward()
        optimizer.step()
        ema.update(denoiser, it[0])
    warmup, _ = evaluation_step(base, denoiser, process, cfg, images[:2], labels[:2], eval_steps)
    evaluate, calls = evaluation_step(base, denoiser, process, cfg, images[:BATCH], labels[:BATCH], eval_steps)
    train()
    warmup()  # two images: the code paths and the allocator, at a fraction of the cost of the 32 (at mask_scale 1)
    return train, evaluate, calls


def _seconds(step) -> tuple[float, float]:
    """(wall, CPU) seconds of one call: the process's CPU time, all threads, counts what the call computed
    whatever else the shared machine runs (with OMP_WAIT_POLICY=PASSIVE no thread spins while it waits)."""
    wall, cpu = time.perf_counter(), time.process_time()
    step()
    return time.perf_counter() - wall, time.process_time() - cpu


def mask_scales(scales: list[int], repeats: int, steps: int, eval_steps: int, threads: int) -> None:
    """Training images/s and evaluation calls/s per mask scale, one step of each scale in turn, the best of
    the runs by wall time; the ratios to the first by CPU time, which the machine's other load does not
    change (and by wall time beside them, for an idle machine's check)."""
    setups = {s: mask_scale_steps(s, eval_steps) for s in scales}
    train = {s: [] for s in scales}
    evals = {s: [] for s in scales}
    for _ in range(repeats * steps):
        for s in scales:
            train[s].append(_seconds(setups[s][0]))
    for _ in range(repeats):
        for s in scales:
            evals[s].append(_seconds(setups[s][1]))
    calls = BATCH * setups[scales[0]][2]
    print(f"torch {torch.__version__}, {threads} threads, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '')}, "
          f"the cpu preset's refiner (UNet-XS, 64-pixel crops), batch {BATCH}: {repeats * steps} training steps "
          f"and {repeats} evaluations of {BATCH} images ({setups[scales[0]][2]} denoiser calls each) per mask scale")
    print(f"\n| mask_scale | mask | training images/s (runs) | evaluation calls/s (runs) | training ratio to "
          f"{scales[0]}: CPU (wall) | evaluation ratio to {scales[0]}: CPU (wall) |\n|---|---|---|---|---|---|")

    def best(runs, i):
        return min(r[i] for r in runs)
    ref = scales[0]
    for s in scales:
        rates = ", ".join(f"{BATCH / r[0]:.1f}" for r in train[s]), ", ".join(f"{calls / r[0]:.0f}" for r in evals[s])
        print(f"| {s} | {64 // s}x{64 // s} | {BATCH / best(train[s], 0):.1f} ({rates[0]}) | "
              f"{calls / best(evals[s], 0):.0f} ({rates[1]}) | "
              f"{best(train[ref], 1) / best(train[s], 1):.3f} ({best(train[ref], 0) / best(train[s], 0):.3f}) | "
              f"{best(evals[ref], 1) / best(evals[s], 1):.3f} ({best(evals[ref], 0) / best(evals[s], 0):.3f}) |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--mask-scales", help="e.g. 4,2,1: the cpu preset's refiner at these denoiser.mask_scale "
                                              "values, training and evaluation, as ratios to the first (only)")
    parser.add_argument("--eval-steps", type=int, default=20, help="test steps of --mask-scales' evaluations")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.mask_scales:
        return mask_scales([int(s) for s in args.mask_scales.split(",")], args.repeats, args.steps, args.eval_steps,
                           args.threads)
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
