"""Data loading against compute: training step time with the real loader against a preloaded batch.

    .venv/bin/python benchmarks/data_loading.py [--repeats 2] [--steps 40] [--block 5] [--threads 2] [--num-workers N]

The rows of one model share its step and take turns every ``--block`` steps, in ABBA order (a shared
machine's speed drifts within seconds; compare ratios within one run):
- base segmentor (`cpu` preset: SegFormer-B0, batch 32, augmented 64-pixel scenes): the training step fed by
  its DataLoader (random scale, crop, flip: albumentations, `train_base.num_workers`) against the same step
  on one batch loaded beforehand — no cache can apply, every image is augmented anew;
- refiner stage 2 (UNet-XS, batch 32) fed by the memory-mapped feature cache (`batches`: gather, float16 ->
  float32, conditioning) against one preloaded batch;
- refiner stage 2 without the cache (`train.feature_cache=false`: augmented images through the frozen base
  every step) against with it.
Budget: the loader-fed step is at least 0.95 of the preloaded step's speed. Uses the fashion-scenes data in
DDPS_HOME (built if missing) and a randomly initialised base (speed does not depend on weights); its
feature cache is kept in DDPS_HOME/features like a training's (2,000 scenes: 140 MB).
"""
from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from ddps.config import resolve  # noqa: E402
from ddps.data import build_dataset  # noqa: E402
from ddps.diffusion.rng import SampleRNG  # noqa: E402
from ddps.engine.loop import GlobalOrder  # noqa: E402
from ddps.engine.train_base import base_hash, reseed_worker  # noqa: E402
from ddps.engine.train_refiner import batches, prepare_data, train_size  # noqa: E402
from ddps.refiner.build import build_codec, build_denoiser, build_process  # noqa: E402
from ddps.refiner.objective import refiner_loss  # noqa: E402
from ddps.segmentors import create_base  # noqa: E402

SCENES = 2000
FLAT = {"data.train_scenes": SCENES}


def interleaved(step, sources: dict, steps: int, block: int = 5, warmup: int = 3) -> dict[str, float]:
    """Seconds per training step fed by each source, the sources taking turns in blocks of ``block`` steps
    (in ABBA order, so a machine whose speed drifts linearly slows every source alike). With loader
    processes their prefetching (two batches per process) runs into the next source's block: use a larger
    ``block`` there."""
    names = list(sources)
    for name in names:
        for _ in range(warmup):
            step(next(sources[name]))
    total = dict.fromkeys(names, 0.0)
    rounds = max(1, steps // block)
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            start = time.perf_counter()
            for _ in range(block):
                step(next(sources[name]))
            total[name] += time.perf_counter() - start
    return {name: seconds / (rounds * block) for name, seconds in total.items()}


def repeat(item):
    while True:
        yield item


def base_rows(cfg, steps: int, block: int) -> dict[str, float]:
    tc = cfg.train_base
    train_set = build_dataset(cfg.data, "train", seed=tc.seed)
    model = create_base(cfg.base.arch, cfg.base.backbone, train_set.num_classes,
                        feature_channels=cfg.base.feature_channels)
    optimizer = torch.optim.AdamW(model.parameters(), tc.lr)
    order = GlobalOrder(len(train_set), tc.batch_size, tc.seed)
    loader = DataLoader(train_set, batch_sampler=(index.tolist() for index, _ in order),
                        num_workers=tc.num_workers, worker_init_fn=reseed_worker, collate_fn=train_set.collate)

    def step(batch):
        x, y = batch["image"], batch["mask"]
        logits = F.interpolate(model(x).logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
        loss = F.cross_entropy(logits, y, ignore_index=train_set.ignore_index)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    preloaded = next(iter(DataLoader(train_set, batch_size=tc.batch_size, shuffle=True,
                                     collate_fn=train_set.collate)))
    return interleaved(step, {"base: DataLoader (augmented)": iter(loader),
                              "base: preloaded batch": repeat(preloaded)}, steps, block)


def refiner_rows(cfg, steps: int, block: int) -> dict[str, float]:
    data_set = build_dataset(cfg.data, "train", train=False)
    base = create_base(cfg.base.arch, cfg.base.backbone, data_set.num_classes,
                       feature_channels=cfg.base.feature_channels).freeze()
    digest = "bench-" + base_hash(cfg)  # its own feature cache: random weights are not the trained base's
    run = resolve("cpu", None, {**FLAT, "train.feature_cache": True})
    process = build_process(run, data_set.num_classes)
    codec = build_codec(run)
    denoiser = build_denoiser(run, data_set.num_classes, base.feature_channels, process)
    optimizer = torch.optim.AdamW(denoiser.parameters(), run.train.lr)
    streams = {}
    for cached in (True, False):
        config = resolve("cpu", None, {**FLAT, "train.feature_cache": cached})
        data = prepare_data(config, base, base_hash=digest)
        order = GlobalOrder(train_size(data), config.train.batch_size, config.train.seed)
        streams[cached] = batches(data, base, codec, order, residual=config.denoiser.residual)
    it = [0]

    def step(batch):
        it[0] += 1
        loss, _ = refiner_loss(denoiser, process, batch, codec, stage=2, target=run.train.target,
                               rng=SampleRNG(it[0], batch.keys), loss=run.train.loss)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return interleaved(step, {"refiner: feature cache (memory-mapped)": streams[True],
                              "refiner: preloaded batch": repeat(next(streams[True])),
                              "refiner: no cache (augmented images through the base)": streams[False]},
                       steps, block)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--steps", type=int, default=40, help="steps per row and repeat")
    parser.add_argument("--block", type=int, default=5, help="steps a row runs before the next takes its turn")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--num-workers", type=int, help="the base loader's worker processes "
                        "(default: the cpu preset's train_base.num_workers)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = resolve("cpu", None, FLAT if args.num_workers is None else
                  {**FLAT, "train_base.num_workers": args.num_workers})
    runs: dict[str, list[float]] = {}
    for _ in range(args.repeats):
        for name, seconds in {**base_rows(cfg, args.steps, args.block), **refiner_rows(cfg, args.steps, args.block)}.items():
            runs.setdefault(name, []).append(seconds)
    mean = {k: sum(v) / len(v) for k, v in runs.items()}
    batch = cfg.train.batch_size
    print(f"torch {torch.__version__}, {args.threads} threads, batch {batch}, {args.repeats} x {args.steps} steps "
          f"per row, the rows of a model taking turns every {args.block} steps, "
          f"train_base.num_workers={cfg.train_base.num_workers}\n")
    print("| step fed by | ms per step (runs) | images/s | speed against its reference |\n|---|---|---|---|")
    reference = {"base: DataLoader (augmented)": "base: preloaded batch",
                 "refiner: feature cache (memory-mapped)": "refiner: preloaded batch",
                 "refiner: no cache (augmented images through the base)": "refiner: feature cache (memory-mapped)"}
    for name, seconds in mean.items():
        ref = reference.get(name)
        ratio = f"{mean[ref] / seconds:.2f} of '{ref}'" if ref else "(reference)"
        print(f"| {name} | {seconds * 1e3:.0f} ({', '.join(f'{s * 1e3:.0f}' for s in runs[name])}) "
              f"| {batch / seconds:.0f} | {ratio} |")
    print()
    for name in ("base: DataLoader (augmented)", "refiner: feature cache (memory-mapped)"):
        ratio = mean[reference[name]] / mean[name]
        print(f"budget: '{name}' / '{reference[name]}' = {ratio:.3f} >= 0.95: "
              f"{'holds' if ratio >= 0.95 else 'NOT MET'}  ")


if __name__ == "__main__":
    main()
