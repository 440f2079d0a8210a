"""Model FLOPs utilisation of the denoiser's training step on this CPU, variants side by side.

    .venv/bin/python benchmarks/mfu.py [--repeats 2] [--steps 6] [--batch 32] [--size XS] [--no-compile]

One DDPS stage-2 step of the `cpu` preset's denoiser (UNet-XS, residual conditioning, on cached base features,
batch 32 of 64-pixel scenes): FLOPs counted by torch.utils.flop_counter (matmuls and convolutions, forward and
backward), images/s, achieved GFLOP/s, and MFU = achieved / the dense float32 matmul GFLOP/s measured in the
same run with the same threads. Variants: threads 1 and 2, channels_last memory format, torch.compile
(inductor). Rows are interleaved and repeated (a shared machine's speed drifts); the ratio column is to the
first row (what training uses: eager, 2 threads, contiguous).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from ddps.config import resolve  # noqa: E402
from steps import matmul_flops_per_s, refiner_step, step_flops, timed  # noqa: E402

CLASSES = 11


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--crop", type=int, default=64)
    parser.add_argument("--size", default="XS", help="denoiser size (the cpu preset's: XS)")
    parser.add_argument("--no-compile", action="store_true", help="leave out the torch.compile rows")
    args = parser.parse_args()
    cfg = resolve("cpu", None, {"denoiser.size": args.size})
    variants = [("eager", 2, False, False), ("eager", 1, False, False), ("channels_last", 2, True, False)]
    if not args.no_compile:
        variants.append(("torch.compile", 2, False, True))
    steps = {}
    for name, threads, channels_last, compiled in variants:
        torch.set_num_threads(threads)
        steps[(name, threads)] = refiner_step(cfg, classes=CLASSES, batch_size=args.batch, crop=args.crop,
                                              channels_last=channels_last, compile=compiled)
    flops = step_flops(refiner_step(cfg, classes=CLASSES, batch_size=args.batch, crop=args.crop).step)
    speed = {key: [] for key in steps}
    peak = {threads: [] for _, threads, _, _ in variants}
    for _ in range(args.repeats):
        for threads in peak:
            torch.set_num_threads(threads)
            peak[threads].append(matmul_flops_per_s())
        for key, s in steps.items():
            torch.set_num_threads(key[1])
            speed[key].append(timed(s.step, args.steps, warmup=3 if key[0] == "torch.compile" else 2))
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    first = mean(speed[next(iter(speed))])
    size = steps[next(iter(steps))]
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs; UNet-{args.size} ({size.trained_params / 1e6:.2f} M "
          f"params) stage-2 step, batch {args.batch} at {args.crop} px: {flops / 1e9:.2f} GFLOP per step "
          f"({flops / args.batch / 1e9:.3f} per image); {args.repeats} x {args.steps} steps per row\n")
    print("| variant | threads | images/s (runs) | GFLOP/s | matmul GFLOP/s (same threads) | MFU | ratio to row 1 |")
    print("|---|---|---|---|---|---|---|")
    for (name, threads), runs in speed.items():
        seconds = mean(runs)
        achieved, dense = flops / seconds, mean(peak[threads])
        print(f"| {name} | {threads} | {args.batch / seconds:.1f} ({', '.join(f'{args.batch / r:.1f}' for r in runs)}) "
              f"| {achieved / 1e9:.1f} | {dense / 1e9:.1f} | {achieved / dense:.1%} | {first / seconds:.2f} |")


if __name__ == "__main__":
    main()
