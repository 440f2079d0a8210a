"""Training of the base segmentor (stage 0), as a plain function of (config, reporter).

The same function runs in-process (tests, ``ddps train-base``) and, later, inside a Ray Train worker.
Stages: config -> data -> model -> optimiser -> loop (with held-out evaluations) -> checkpoint.
"""
from __future__ import annotations

import math
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from ddps.config import Config, TrainBaseConfig, content_hash, to_flat
from ddps.data import build_dataset, selection_split
from ddps.engine.evaluate import evaluate_base
from ddps.engine.loop import Checkpointer, GlobalOrder, Worker, rng_state, set_rng_state
from ddps.engine.reporter import ConsoleReporter, Reporter
from ddps.paths import cache_dir
from ddps.errors import CheckpointError, DataError
from ddps.segmentors import BaseSegmentor, create_base
from ddps.segmentors.checkpoint import base_payload, read_checkpoint, save_atomic

BASE_SECTIONS = ("data", "base", "train_base")


def lr_at(it: int, cfg: TrainBaseConfig) -> float:
    """Linear warm-up to cfg.lr, then polynomial decay to cfg.min_lr at cfg.iters (mmseg's PolyLR)."""
    if it < cfg.warmup_iters:
        return cfg.lr * (it + 1) / cfg.warmup_iters
    frac = (it - cfg.warmup_iters) / max(1, cfg.iters - cfg.warmup_iters)
    return (cfg.lr - cfg.min_lr) * (1 - frac) ** cfg.poly_power + cfg.min_lr


def base_hash(cfg: Config) -> str:
    return content_hash(cfg, BASE_SECTIONS)


def default_checkpoint(cfg: Config) -> Path:
    return cache_dir("checkpoints") / f"base-{cfg.base.arch}-{cfg.base.backbone}-{base_hash(cfg)[:16]}.pt"


def plateau_gain(history: list[dict], iters: int) -> float:
    """Held-out mIoU gain over the last fifth of the schedule: final minus the last eval at <= 80%."""
    early = [h for h in history if h["iter"] <= 0.8 * iters]
    if not early or history[-1]["iter"] != iters:
        return math.nan
    return history[-1]["mIoU"] - early[-1]["mIoU"]


def param_groups(model: BaseSegmentor, cfg: TrainBaseConfig) -> list[dict]:
    """AdamW groups: the decode head (decoder + classifier) at lr x head_lr_mult; without norm_decay,
    norm weights and all biases (1-D tensors) get no weight decay (mmseg's SegFormer recipe)."""
    groups: dict[tuple[float, float], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        lr_mult = 1.0 if name.startswith("encoder.") else cfg.head_lr_mult
        decay = 0.0 if (not cfg.norm_decay and p.ndim <= 1) else cfg.weight_decay
        groups.setdefault((lr_mult, decay), []).append(p)
    return [{"params": ps, "lr_mult": m, "weight_decay": d} for (m, d), ps in groups.items()]


def reseed_worker(worker_id: int) -> None:
    """DataLoader worker_init_fn: each worker's augmentation draws its own random stream."""
    info = torch.utils.data.get_worker_info()
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)
    transform = getattr(info.dataset, "transform", None)
    if hasattr(transform, "reseed"):
        transform.reseed(seed)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def fit(cfg: Config, reporter: Reporter | None = None, checkpoint: str | Path | None = None,
        device: str = "cpu", force: bool = False) -> Path:
    """Train a base segmentor per ``cfg`` in this process and return its checkpoint; an existing one is reused."""
    reporter = reporter or ConsoleReporter("train-base", cfg.train_base.iters)
    path = Path(checkpoint) if checkpoint else default_checkpoint(cfg)
    if reuse(cfg, path, force):
        reporter.info(f"reusing {path} (same config hash)")
        return path
    train(cfg, reporter, Worker(device=device), path=path)
    return path


def reuse(cfg: Config, path: Path, force: bool = False) -> bool:
    """Whether ``path`` already holds this config's finished base (refusing another config's file)."""
    if not path.exists() or force:
        return False
    existing = read_checkpoint(path).get("hash")
    if existing != base_hash(cfg):
        raise CheckpointError(f"{path} exists but was trained with another config (hash {str(existing)[:12]} != "
                              f"{base_hash(cfg)[:12]}); pass --force to overwrite it or choose another --out")
    return True


def train(cfg: Config, reporter: Reporter, worker: Worker | None = None, path: Path | None = None,
          checkpointer: Checkpointer | None = None) -> dict:
    """The training loop on one data-parallel worker; rank 0 evaluates and saves the checkpoint at ``path``.

    Each rank takes its shard of every global batch of train_base.batch_size images (GlobalOrder); with a
    ``checkpointer`` the training state is saved every ``checkpointer.every`` iterations and a restarted
    run resumes from the latest (augmentation draws are re-seeded from (seed, iteration) at resumption,
    so a resumed run is close to, not bit-identical with, an uninterrupted one).
    """
    tc = cfg.train_base
    worker = worker or Worker()
    device = worker.device

    # ---- setup -----------------------------------------------------------------------------------
    seed_everything(tc.seed + worker.rank)
    if tc.threads:
        torch.set_num_threads(tc.threads)
    train_set = build_dataset(cfg.data, "train", seed=tc.seed + worker.rank)
    split = selection_split(cfg.data)  # the plateau is checked on the holdout split; val only reports
    val_set = build_dataset(cfg.data, split)
    if len(train_set) < tc.batch_size:
        raise DataError(f"{train_set.name} has {len(train_set)} images, fewer than train_base.batch_size="
                        f"{tc.batch_size}")
    worker.local_batch(tc.batch_size, "train_base.batch_size")
    order = GlobalOrder(len(train_set), tc.batch_size, tc.seed, worker.rank, worker.world_size)
    model = create_base(cfg.base.arch, cfg.base.backbone, train_set.num_classes,
                        feature_channels=cfg.base.feature_channels,
                        encoder_weights=cfg.base.encoder_weights).to(device)
    optimizer = torch.optim.AdamW(param_groups(model, tc), lr=tc.lr)
    history: list[dict] = []
    start, seen = 0, 0
    state = checkpointer.latest() if checkpointer else None
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        order.seek(state["position"])
        set_rng_state(state["rng"])
        history, start, seen = list(state["history"]), int(state["iter"]), int(state["images_seen"])
        train_set.transform.reseed(tc.seed * 100_003 + start * 7 + worker.rank)
        reporter.info(f"resuming at iteration {start} from the last checkpoint")
    else:
        reporter.info(f"{model.spec.name}: {model.num_params() / 1e6:.2f}M params, {len(train_set)} train / "
                      f"{len(val_set)} {split} images, {tc.iters} iters of batch {tc.batch_size} on "
                      f"{worker.world_size} worker(s)")
    ddp = worker.wrap(model) if worker.wrap else model
    loader = DataLoader(train_set, batch_sampler=(index.tolist() for index, _ in order),
                        num_workers=tc.num_workers, worker_init_fn=reseed_worker, collate_fn=train_set.collate)

    # ---- loop ------------------------------------------------------------------------------------
    batches = iter(loader)
    window_start, window_images = time.perf_counter(), 0
    model.train()
    for it in range(start, tc.iters):
        batch = next(batches)
        x, y = batch["image"].to(device), batch["mask"].to(device)  # (b, 3, H, W), (b, H, W)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(it, tc) * group["lr_mult"]
        logits = ddp(x).logits
        logits = F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
        loss = F.cross_entropy(logits, y, ignore_index=train_set.ignore_index)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        seen += tc.batch_size
        window_images += tc.batch_size
        step = it + 1
        if step % tc.log_every == 0 or step == tc.iters:
            elapsed = time.perf_counter() - window_start
            reporter.log({"loss": float(loss.detach()), "lr": lr_at(it, tc), "img_per_s": window_images / elapsed}, step)
            window_start, window_images = time.perf_counter(), 0
        if worker.is_main and (step % tc.eval_every == 0 or step == tc.iters):
            scores = evaluate_base(model, val_set, cfg.eval, device=device)
            history.append({"iter": step, "mIoU": scores.mIoU, "mBIoU": scores.mBIoU})
            reporter.log({f"{split}_mIoU": scores.mIoU, f"{split}_mBIoU": scores.mBIoU}, step)
            window_start = time.perf_counter()  # evaluation time is not training throughput
        if checkpointer and step % checkpointer.every == 0 and step < tc.iters:
            checkpointer.save({"iter": step, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                               "position": order.position, "rng": rng_state(), "history": history,
                               "images_seen": seen}, step)

    # ---- checkpoint ------------------------------------------------------------------------------
    final = {f"{split}_mIoU": history[-1]["mIoU"] if history else math.nan,
             f"{split}_mBIoU": history[-1]["mBIoU"] if history else math.nan,
             "plateau_gain": plateau_gain(history, tc.iters), "images_seen": seen}
    payload = base_payload(model, config=to_flat(cfg), class_names=train_set.class_names, metrics=final,
                           history=history, content_hash=base_hash(cfg))
    if worker.is_main:
        reporter.info(f"done: {split} mIoU {final[f'{split}_mIoU']:.2f}, mBIoU {final[f'{split}_mBIoU']:.2f}, "
                      f"gain over the last fifth {final['plateau_gain']:+.2f}")
        if path is not None:
            save_atomic(path, payload, checksum=True)
    return payload
