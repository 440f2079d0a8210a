"""The `paper` preset on one GPU: the DDPS training step and refinement latency, in one short script.

    python benchmarks/gpu.py [--batch 16] [--crop 512] [--steps 20] [--size M] [--backbone mit_b2] [--peak-tflops 989]
    python benchmarks/gpu.py --device cpu --float32 --crop 64 --batch 2 --steps 2 --size XS --backbone mit_b0
                                        # the same code, tiny, on a CPU (bf16 convolutions crawl on a CPU)

Imports only the core layer (torch and segmentation-models-pytorch through ddps; no Ray, no MLflow), so it runs
on a bare machine with the project's dependencies. Weights are random (speed does not depend on them):
- training: one stage-2 step of UNet-M on SegFormer-B2 features at 512 x 512 crops under bf16 autocast, the
  frozen base's forward pass included (the `paper` preset trains without a feature cache: its augmentation
  changes every image); images/s, model FLOPs per image (torch.utils.flop_counter), achieved TFLOP/s and
  MFU against the GPU's dense bf16 peak (--peak-tflops, H200 SXM: 989) and against the bf16 matmul rate
  measured here;
- inference: one 512 x 512 image, base alone and base + K refinement steps (K = 2, 20; K denoiser calls on the
  even step list, not the `paper` preset's official list of K + 1: steps.LATENCY_STEP_LIST), in ms.
Prints Markdown; finishes in well under 4 minutes on one H200.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from ddps.config import resolve  # noqa: E402
from ddps.refiner.build import build_denoiser, build_process  # noqa: E402
from ddps.segmentors import create_base  # noqa: E402
from steps import LATENCY_STEP_LIST, latency, matmul_flops_per_s, refiner_step, step_flops, timed  # noqa: E402

CLASSES = 150  # ADE20K


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--crop", type=int, default=512)
    parser.add_argument("--steps", type=int, default=20, help="timed training steps")
    parser.add_argument("--size", default="M", help="denoiser size")
    parser.add_argument("--backbone", default="mit_b2")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="the device's dense bf16 peak")
    parser.add_argument("--float32", action="store_true", help="no bf16 autocast (to try the script on a CPU)")
    args = parser.parse_args()
    start = time.perf_counter()
    device = args.device
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            sys.exit("gpu.py: no CUDA device; run with --device cpu (and a small --crop) to try it on a CPU")
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
        name = torch.cuda.get_device_name()
    else:
        name = platform.processor() or platform.machine()
    bf16 = None if args.float32 else torch.bfloat16
    cfg = resolve("paper", None, {"denoiser.size": args.size, "base.backbone": args.backbone})
    train = refiner_step(cfg, classes=CLASSES, batch_size=args.batch, crop=args.crop, device=device, base=True,
                         autocast=bf16)
    flops = step_flops(train.step)
    seconds = timed(train.step, args.steps, warmup=3, device=device)
    dense = matmul_flops_per_s(8192 if device.startswith("cuda") else 512, device=device,
                               dtype=bf16 or torch.float32)
    achieved = flops / seconds
    print(f"device: {name}; torch {torch.__version__}; {'float32' if args.float32 else 'bf16 autocast'}\n")
    print(f"| training step (stage 2, base forward included) | value |\n|---|---|")
    print(f"| UNet-{args.size} + SegFormer-{args.backbone} | {train.denoiser_params / 1e6:.1f} M + "
          f"{train.base_params / 1e6:.1f} M params |")
    print(f"| batch x crop | {args.batch} x {args.crop}^2 |")
    print(f"| step time | {seconds * 1e3:.1f} ms ({args.steps} steps) |")
    print(f"| images/s | {args.batch / seconds:.1f} |")
    print(f"| model FLOPs per image | {flops / args.batch / 1e9:.1f} GFLOP |")
    print(f"| achieved | {achieved / 1e12:.2f} TFLOP/s |")
    print(f"| MFU against the {args.peak_tflops:.0f} TFLOP/s bf16 peak | {achieved / (args.peak_tflops * 1e12):.1%} |")
    print(f"| {'float32' if args.float32 else 'bf16'} matmul measured here | {dense / 1e12:.1f} TFLOP/s (MFU against it: {achieved / dense:.1%}) |")
    del train
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    process = build_process(cfg, CLASSES)
    segmentor = create_base(cfg.base.arch, cfg.base.backbone, CLASSES,
                            feature_channels=cfg.base.feature_channels).to(device)
    denoiser = build_denoiser(cfg, CLASSES, segmentor.feature_channels, process).to(device)
    image = torch.randn(1, 3, args.crop, args.crop, device=device)
    seconds = latency(segmentor, denoiser, process, cfg, image, (2, 20), calls=10, autocast=bf16)
    print(f"\n| inference, one {args.crop}^2 image (T = {cfg.diffusion.steps}; K steps on the {LATENCY_STEP_LIST} "
          f"step list: K denoiser calls) | ms | against the base |\n|---|---|---|")
    for k, s in seconds.items():
        label = "base alone" if k == 0 else f"base + {k} refinement steps"
        print(f"| {label} | {s * 1e3:.1f} | {s / seconds[0]:.2f}x |")
    print(f"\n(gpu.py ran {time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
