"""Inference: latency of base + K refinement steps against the base alone, and the stride-sampling trade-off.

    .venv/bin/python benchmarks/inference.py [--checkpoint refiner.pt] [--images 1000] [--threads 2]

A trained DDPS model (default: the `cpu` sweeps' default model — seed 0 of experiments/seeds.yaml — from
DDPS_HOME; `ddps sweep experiments/seeds.yaml --preset cpu` trains it) on the fashion-scenes val split:
- latency per image (batch 1, its base features computed once, as inference does) of the base alone and of
  the base + K steps, K = 1, 2, 5, 20;
- mIoU and mBIoU against K = 1, 2, 5, 10, 20 on the first --images val scenes (stride sampling: K of the T
  = 20 trained steps), and the smallest K within 0.1 mIoU of K = 20.
K is the number of test steps on a step list, which the output names: the even list calls the denoiser K
times (t = T, T - T/K, ..., T/K); the official code's list (infer.times=official) adds a last call at t = 1.
The quality table's list is read from the evaluation's own call times; the latency rows use the sampler's
even list (benchmarks/steps.py, LATENCY_STEP_LIST). The cpu model's reported numbers used the even list.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from ddps.config import from_flat  # noqa: E402
from ddps.data import build_dataset  # noqa: E402
from ddps.engine.evaluate_refiner import evaluate_refiner  # noqa: E402
from ddps.engine.features import compute_cache  # noqa: E402
from ddps.refiner.build import build_codec  # noqa: E402
from ddps.refiner.checkpoint import load_refiner  # noqa: E402
from steps import LATENCY_STEP_LIST, latency, step_list  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LATENCY_KS = (1, 2, 5, 20)
QUALITY_KS = (1, 2, 5, 10, 20)


def default_checkpoint() -> Path:
    from ddps.orchestration.plan import load_experiment, plan  # the planner: no Ray, no MLflow
    cell = plan(load_experiment(ROOT / "experiments" / "seeds.yaml"), "cpu").cells[0]
    return cell.chain[-1].path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, help="a refiner checkpoint (default: the cpu sweeps' model)")
    parser.add_argument("--images", type=int, default=1000, help="val scenes for the mIoU against K")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--calls", type=int, default=20, help="timed calls per latency row")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    path = args.checkpoint or default_checkpoint()
    if not path.exists():
        sys.exit(f"inference.py: no checkpoint {path}; train it with `ddps sweep experiments/seeds.yaml --preset "
                 f"cpu` or pass --checkpoint")
    denoiser, process, base, payload = load_refiner(path)
    cfg = from_flat({**payload["config"], "eval.max_images": 0})  # every one of the --images scenes
    val = build_dataset(cfg.data, "val").head(args.images)
    image = val[0]["image"][None]
    seconds = latency(base, denoiser, process, cfg, image, LATENCY_KS, calls=args.calls)
    cache = compute_cache(base, val, build_codec(cfg))
    quality = {k: evaluate_refiner(denoiser, process, cache, cfg, num_classes=base.num_classes,
                                   ignore_index=val.ignore_index, steps=k) for k in QUALITY_KS}
    last = quality[QUALITY_KS[-1]].last.mIoU
    enough = min(k for k in QUALITY_KS if quality[k].last.mIoU >= last - 0.1)
    lists = {step_list(result.times, cfg.diffusion.steps, k) for k, result in quality.items()}
    print(f"torch {torch.__version__}, {args.threads} threads; {path.name} (UNet-{cfg.denoiser.size}, T = "
          f"{cfg.diffusion.steps}) on {cfg.base.arch}-{cfg.base.backbone}; {len(val)} val scenes "
          f"of {tuple(image.shape[-2:])} px; K test steps on the {' / '.join(sorted(lists))} step list "
          f"(latency: the {LATENCY_STEP_LIST} list)\n")
    print("| inference of one image | ms (batch 1) | against the base alone |\n|---|---|---|")
    for k, s in seconds.items():
        print(f"| {'base alone' if k == 0 else f'base + {k} steps'} | {s * 1e3:.1f} | {s / seconds[0]:.2f}x |")
    base_scores = quality[QUALITY_KS[0]].base
    print(f"\n| K (test steps) | step list (denoiser calls) | mIoU | mBIoU | ms per image (batch 1) |\n"
          f"|---|---|---|---|---|")
    print(f"| base | – | {base_scores.mIoU:.2f} | {base_scores.mBIoU:.2f} | {seconds[0] * 1e3:.1f} |")
    for k, result in quality.items():
        ms = f"{seconds[k] * 1e3:.1f}" if k in seconds else "–"
        calls = f"{step_list(result.times, cfg.diffusion.steps, k)} ({len(result.times)})"
        print(f"| {k} | {calls} | {result.last.mIoU:.2f} | {result.last.mBIoU:.2f} | {ms} |")
    print(f"\nsmallest K within 0.1 mIoU of K = {QUALITY_KS[-1]}: **{enough}**")


if __name__ == "__main__":
    main()
