"""The `paper` preset on one GPU: fp32 against bf16 for base training, refiner training and evaluation.

    python benchmarks/gpu.py [--base-batch 16] [--refiner-batch 32] [--eval-batch 1] [--eval-images 8]
                             [--steps 10] [--peak-tflops 989] [--no-tf32] [--cudnn-benchmark]
    python benchmarks/gpu.py --device cpu --tiny       # the same code at a tiny size on a CPU (in the tests)

Prints a header (device, torch, TF32, the bf16 peak, a bf16 matmul measured here, every flag as resolved) and
three Markdown tables, one row per precision (--precisions, default fp32,bf16), at the `paper` preset's shapes
with `denoiser.size=S`: 150 classes, 512 x 512 crops, mmseg-segformer on mit_b2, UNet-S, T = 100,
infer.times official. Weights are random (speed does not depend on them); each step reuses one random batch
that is already on the device (no data loading):

- base training: one AdamW step of the base (forward, logits upsampled to the crop, cross-entropy, backward);
- refiner training: one stage-2 step of UNet-S with the frozen base's forward pass first (the `paper` preset
  trains without a feature cache: its augmentation changes every image), and below the table the time of the
  per-sample noise draw of each step alone (SampleRNG: one generator per sample, on the device);
- evaluation: images/s of the base then K = 20 and K = 2 refinement steps through the engine's own evaluation
  (``evaluate_refiner``, over the batch held in host memory as a split: copied to the device, the base's
  forward, every step's prediction decoded to the label size and scored with mIoU and boundary IoU).

Training columns: step ms, images/s, model FLOPs per image (torch.utils.flop_counter: matmuls and convolutions,
forward and backward; the same count for every precision), achieved TFLOP/s, MFU against the GPU's dense bf16
peak (--peak-tflops; by default from the device's name: H100 / H200 SXM 989, H100 PCIe 756, H100 / H200 NVL
835, A100 312, L40S 362, else n/a) and against the bf16 matmul measured here, the peak GPU memory, and the
speed against the fp32 row. Precision is the engine's (``ddps.engine.device``): fp32 rows run with TF32 as
``configure(device, tf32=True)`` sets it (CUDA matmuls and cuDNN convolutions; --no-tf32 for IEEE fp32), bf16
rows under ``autocast(device, "bf16")`` (fp16 under it with ``grad_scaler``'s loss scaling). Times are means
over --steps calls after --warmup calls, the GPU synchronised (steps.timed). Imports only the core and engine
layers (torch, timm and segmentation-models-pytorch through ``ddps``): no Ray, no MLflow, no albumentations.
Sized to finish well inside 4 minutes on one H100 or H200 (not yet run on one; counted here: 528 GFLOP per
base-training image, 644 per refiner-training image, 3.5 TFLOP per image evaluated at K = 20); it prints its
own wall time at the end.

On this workplace's GPU machines (the `run` tool of the device README): their image has torch, timm, numpy,
pillow, scipy, pyyaml, huggingface-hub, safetensors, torchvision and tqdm but not segmentation-models-pytorch,
whose wheel (pure Python, no other missing dependency) travels in an ignored folder .whl. Once, here, in the
repository's root:

    echo /.whl/ >> .git/info/exclude
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
        --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl segmentation-models-pytorch==0.6.0

then `run` with carry [".whl"], timeout_s 420, and the command

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit; set -o pipefail; nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv; PYTHONUNBUFFERED=1 python3 benchmarks/gpu.py --rates $OUT/gpu.json 2>&1 | tee $OUT/gpu.md

and pass the file back to `benchmarks/performance.py --gpu-output` (or paste it into reports/performance.md);
the rates it wrote (gpu.json) go to $DDPS_HOME/rates/ for `ddps sweep --preset paper --dry-run`'s GPU-hours
(or `--gpu-rates gpu.json`). A GPU run writes them to --rates (default $DDPS_HOME/rates/gpu.json); a CPU run
writes none.
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(Path(__file__).resolve().parent), str(ROOT)]  # steps.py, and ddps without PYTHONPATH

import torch  # noqa: E402

from ddps.config import resolve  # noqa: E402
from ddps.engine.device import configure  # noqa: E402
from ddps.rates import GPURates, write_rates  # noqa: E402
from ddps.refiner.build import build_denoiser, build_process  # noqa: E402
from steps import (base_step, count_params, evaluation_step, make_base, matmul_flops_per_s, noise_draw,  # noqa: E402
                   random_batch, refiner_step, step_flops, timed)

# dense bf16 tensor-core peaks (TFLOP/s, no sparsity), matched in order against the device's name
PEAKS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H200 NVL", 835.0), ("H100", 989.0), ("H200", 989.0),
         ("A100", 312.0), ("L40S", 362.0))
PAPER = {"classes": 150, "crop": 512, "backbone": "mit_b2", "size": "S", "base_batch": 16, "refiner_batch": 32,
         "eval_batch": 1, "eval_images": 8, "steps": 10, "warmup": 3}  # 150: ADE20K
TINY = {"classes": 11, "crop": 64, "backbone": "mit_b0", "size": "XXS", "base_batch": 2, "refiner_batch": 2,
        "eval_batch": 1, "eval_images": 1, "steps": 2, "warmup": 1}
NA = "n/a"


def peak_tflops(name: str, given: float | None) -> tuple[float | None, str]:
    """The dense bf16 peak to count MFU against, and where it came from."""
    if given is not None:
        return given, "--peak-tflops"
    for part, peak in PEAKS:
        if part.lower() in name.lower():
            return peak, f"by the device's name ({part})"
    return None, "unknown for this device: pass --peak-tflops"


def num(x: float) -> str:
    """A positive figure with about three significant digits, never in exponent form."""
    if not math.isfinite(x):
        return str(x)
    if x >= 100:
        return f"{x:.0f}"
    if x >= 10:
        return f"{x:.1f}"
    if x >= 1:
        return f"{x:.2f}"
    return f"{x:.{max(3, 2 - math.floor(math.log10(x)) if x > 0 else 3)}f}"


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"CPU: {line.split(':', 1)[1].strip()}, {torch.get_num_threads()} threads"
    except OSError:
        pass
    return f"CPU: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def free(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device: str) -> str:
    return num(torch.cuda.max_memory_allocated() / 2 ** 30) if device.startswith("cuda") else NA


def print_table(header: list[str], rows: list[list[str]]) -> None:
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")


def measure(build, precision: str, flops: float | None, args, device: str) -> tuple[int, float, float]:
    """(batch size, FLOPs per step — counted here when ``flops`` is None —, seconds per step) of
    ``build(precision)``'s step; the model is freed on return."""
    train = build(precision)
    flops = step_flops(train.step) if flops is None else flops
    return train.batch_size, flops, timed(train.step, args.steps, warmup=args.warmup, device=device)


def training_table(build, precisions: list[str], args, device: str, peak: float | None,
                   dense: float) -> dict[str, float]:
    """One row per precision: ``build(precision)`` makes the TrainStep; its FLOPs are counted once. Returns the
    seconds per step of each precision."""
    header = ["precision", "step ms", "images/s", "GFLOP per image", "achieved TFLOP/s",
              "MFU % of bf16 peak", "MFU % of measured bf16 matmul", "peak GPU GiB", "speed vs fp32"]
    rows, speed, flops, step_seconds = [], {}, None, {}
    for precision in precisions:
        free(device)
        try:
            batch, flops, seconds = measure(build, precision, flops, args, device)
        except torch.cuda.OutOfMemoryError:  # one row lost, not the run: the tables after it still come
            rows.append([precision, "out of memory: try a smaller batch"] + [NA] * (len(header) - 2))
            continue
        step_seconds[precision] = seconds
        speed[precision] = batch / seconds
        achieved = flops / seconds
        rows.append([precision, num(seconds * 1e3), num(speed[precision]), num(flops / batch / 1e9),
                     num(achieved / 1e12), num(100 * achieved / (peak * 1e12)) if peak else NA,
                     num(100 * achieved / dense), peak_gib(device),
                     num(speed[precision] / speed["fp32"]) if "fp32" in speed else NA])
    free(device)
    print_table(header, rows)
    return step_seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--tiny", action="store_true",
                        help="tiny defaults for a CPU: " + ", ".join(f"{k} {v}" for k, v in TINY.items()))
    parser.add_argument("--precisions", default="fp32,bf16", help="rows, in order (fp32 | bf16 | fp16)")
    parser.add_argument("--classes", type=int, help="classes (paper: ADE20K's 150)")
    parser.add_argument("--crop", type=int, help="crop side, px (paper: 512)")
    parser.add_argument("--backbone", help="the base's encoder (paper: mit_b2)")
    parser.add_argument("--size", help="UNet size (default S, as issue 20 asks; the paper preset's is M)")
    parser.add_argument("--base-batch", type=int, help="base training batch (paper train_base.batch_size: 16)")
    parser.add_argument("--refiner-batch", type=int, help="refiner training batch (paper train.batch_size: 32)")
    parser.add_argument("--eval-batch", type=int, help="evaluation batch (paper eval.batch_size: 1)")
    parser.add_argument("--eval-images", type=int, help="images timed per evaluation row (default 8)")
    parser.add_argument("--ks", default="20,2", help="refinement steps K of the evaluation rows")
    parser.add_argument("--steps", type=int, help="timed training steps per row (default 10)")
    parser.add_argument("--warmup", type=int, help="untimed calls before each row (default 3)")
    parser.add_argument("--peak-tflops", type=float, help="the device's dense bf16 peak (default: by its name)")
    parser.add_argument("--no-tf32", action="store_true", help="fp32 rows in IEEE fp32 (the engine's --no-tf32)")
    parser.add_argument("--cudnn-benchmark", action="store_true",
                        help="torch.backends.cudnn.benchmark on (the engine leaves it off)")
    parser.add_argument("--rates", help="where a GPU run writes its rates for `ddps sweep --dry-run`'s GPU-hours "
                                        "(default: $DDPS_HOME/rates/gpu.json; a CPU run writes none)")
    args = parser.parse_args()
    for key, value in (TINY if args.tiny else PAPER).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    start = time.perf_counter()
    device = args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("gpu.py: no CUDA device; run with --device cpu --tiny to try it on a CPU")
    precisions = args.precisions.split(",")
    ks = [int(k) for k in args.ks.split(",")]
    configure(device, tf32=not args.no_tf32)
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    cfg = resolve("paper", None, {"denoiser.size": args.size, "base.backbone": args.backbone,
                                  "data.crop": args.crop, "eval.batch_size": args.eval_batch})
    name = device_name(device)
    peak, source = peak_tflops(name, args.peak_tflops)
    n = 8192 if device.startswith("cuda") else 512
    dense = matmul_flops_per_s(n, device=device, dtype=torch.bfloat16)
    cuda = device.startswith("cuda")
    print(f"device: {name}; torch {torch.__version__}; TF32 "
          f"{('off' if args.no_tf32 else 'on') if cuda else 'n/a (CPU)'} for the fp32 rows (the engine's "
          f"configure: CUDA matmuls and cuDNN convolutions); cuDNN benchmark {'on' if args.cudnn_benchmark else 'off'}; "
          f"bf16 dense peak {f'{peak:g} TFLOP/s' if peak else NA} ({source}); bf16 matmul measured here "
          f"{num(dense / 1e12)} TFLOP/s ({n}^3)  ")
    print("flags: " + " ".join(f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}")
                               for k, v in vars(args).items() if v not in (None, False)) + "  ")
    print(f"shapes: the paper preset with denoiser.size={args.size}: {args.classes} classes, {args.crop}x{args.crop} "
          f"crops, {cfg.base.arch} {cfg.base.backbone}, UNet-{args.size}, T = {cfg.diffusion.steps}, infer.times "
          f"{cfg.infer.times}; random weights, one random batch on the device per row\n")

    print(f"### base training: {cfg.base.arch} {cfg.base.backbone}, batch {args.base_batch} of {args.crop}^2 crops, "
          f"AdamW step (backward included)\n")
    base_seconds = training_table(lambda p: base_step(cfg, classes=args.classes, batch_size=args.base_batch,
                                                      crop=args.crop, device=device, precision=p),
                                  precisions, args, device, peak, dense)

    print(f"\n### refiner training (stage 2): UNet-{args.size} on the frozen base's features, the base's forward "
          f"included (no feature cache), batch {args.refiner_batch} of {args.crop}^2 crops\n")
    seconds = seconds_refiner = training_table(
        lambda p: refiner_step(cfg, classes=args.classes, batch_size=args.refiner_batch, crop=args.crop,
                               device=device, base=True, precision=p), precisions, args, device, peak, dense)
    draw = noise_draw(cfg, classes=args.classes, batch_size=args.refiner_batch, crop=args.crop, device=device)
    noise = timed(draw, args.steps, warmup=1, device=device)
    print(f"\nof each refiner step, the per-sample noise draw alone (SampleRNG: one generator per sample, on the "
          f"device): {num(noise * 1e3)} ms, " +
          ", ".join(f"{num(100 * noise / s)} % of the {p} step" for p, s in seconds.items()))

    print(f"\n### evaluation: the base then K refinement steps ({cfg.infer.times} step list), every step scored, "
          f"batch {args.eval_batch}, {args.eval_images} images per row\n")
    process = build_process(cfg, args.classes)
    segmentor = make_base(cfg, args.classes, device)
    denoiser = build_denoiser(cfg, args.classes, segmentor.feature_channels, process).to(device)
    images, labels = random_batch(args.eval_batch, args.crop, args.classes, device)
    batches = max(1, args.eval_images // args.eval_batch)
    rows, speed, calls_per_s = [], {}, {}
    for k in ks:
        for precision in precisions:
            step, calls = evaluation_step(segmentor, denoiser, process, cfg, images, labels, k, precision=precision)
            seconds = timed(step, batches, warmup=1, device=device) / args.eval_batch
            speed[precision] = 1 / seconds
            if k == max(ks):
                calls_per_s[precision] = calls / seconds
            rows.append([precision, str(k), str(calls), num(seconds * 1e3), num(1 / seconds),
                         num(speed[precision] / speed["fp32"]) if "fp32" in speed else NA])
    print_table(["precision", "K (test steps)", "denoiser calls per image", "ms per image", "images/s",
                 "speed vs fp32"], rows)
    print(f"\nparameters: base {count_params(segmentor) / 1e6:.1f} M, denoiser {count_params(denoiser) / 1e6:.1f} M "
          f"(UNet-{args.size} {denoiser.unet_params() / 1e6:.2f} M)")
    if cuda:  # what `ddps sweep --dry-run` counts GPU-hours with (never a CPU's rates)
        path = write_rates(GPURates(
            device=name, torch=torch.__version__, measured=time.strftime("%Y-%m-%d %H:%M"),
            shapes={"crop": args.crop, "classes": args.classes, "base": f"{cfg.base.arch}-{cfg.base.backbone}",
                    "denoiser": f"UNet-{args.size}", "T": cfg.diffusion.steps},
            base_images_per_s={p: args.base_batch / s for p, s in base_seconds.items()},
            refiner_images_per_s={p: args.refiner_batch / s for p, s in seconds_refiner.items()},
            eval_calls_per_s=calls_per_s), args.rates)
        print(f"\nrates for `ddps sweep --dry-run`: {path}")
    print(f"\n(gpu.py ran {time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
