"""Training of the base segmentor (stage 0), as a plain function of (config, reporter).

The same function runs in-process (tests, ``ddps train-base``) and, later, inside a Ray Train worker.
Stages: config -> data -> model -> optimiser -> loop (with held-out evaluations) -> checkpoint.

With ``base.pretrained`` set the base is not trained but imported (:func:`import_base`): the published
weights are written as an ordinary base checkpoint, with no training iteration, addressed by what was
imported (``base_hash``), and used by everything after it like a trained base.
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from ddps.checkpoint_io import write_checked
from ddps.config import Config, TrainBaseConfig, content_hash, to_flat
from ddps.data import SegmentationDataset, build_dataset, selection_split
from ddps.engine.device import autocast, backward_step, grad_scaler, loader_options, optimizer_step, to_device
from ddps.engine.evaluate import evaluate_base
from ddps.engine.loop import Checkpointer, GlobalOrder, Worker, rng_state, set_rng_state, single_process_states
from ddps.engine.reporter import ConsoleReporter, Reporter
from ddps import storage
from ddps.storage import Location
from ddps.errors import CheckpointError, ConfigError, DataError
from ddps.segmentors import BaseSegmentor, create_base
from ddps.segmentors.checkpoint import base_payload, read_checkpoint
from ddps.segmentors.pretrained import load_pretrained, source_identity, source_kind

BASE_SECTIONS = ("data", "base", "train_base")


def lr_at(it: int, cfg: TrainBaseConfig) -> float:
    """Linear warm-up to cfg.lr, then polynomial decay to cfg.min_lr at cfg.iters (mmseg's PolyLR)."""
    if it < cfg.warmup_iters:
        return cfg.lr * (it + 1) / cfg.warmup_iters
    frac = (it - cfg.warmup_iters) / max(1, cfg.iters - cfg.warmup_iters)
    return (cfg.lr - cfg.min_lr) * (1 - frac) ** cfg.poly_power + cfg.min_lr


IMPORTED_SECTIONS = ("data",)  # an imported base: its dataset (class names and count) and what was imported


def base_hash(cfg: Config) -> str:
    """The base's content hash: data, base and train_base; for an imported base (``base.pretrained``) the data
    and what was imported — the smp-hub name, or the sha256 of the local files — and no training setting."""
    if cfg.base.pretrained:
        return content_hash(cfg, IMPORTED_SECTIONS, ["imported", source_identity(cfg.base.pretrained)])
    return content_hash(cfg, BASE_SECTIONS)


def default_checkpoint(cfg: Config) -> Location:
    """Where this config's base lives: content-addressed under the storage's checkpoints/ (ddps.storage), else
    DDPS_HOME's."""
    model = "imported" if cfg.base.pretrained else f"{cfg.base.arch}-{cfg.base.backbone}"
    return storage.folder("checkpoints") / f"base-{model}-{base_hash(cfg)[:16]}.pt"


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


def fit(cfg: Config, reporter: Reporter | None = None, checkpoint: str | Location | None = None,
        device: str = "cpu", force: bool = False, checkpoint_every: int | None = None) -> Location:
    """Train a base segmentor per ``cfg`` in this process and return its checkpoint; an existing one is reused.

    With ``checkpoint_every`` the training state is saved every that many iterations in the storage's
    ``states/<default checkpoint's stem>/`` (addressed by :func:`base_hash`), and a rerun with the same config
    resumes from the latest one: the same iteration, data position, weights, optimiser and RNG (with
    train_base.num_workers = 0 also the augmentation's draws, so the weights equal an uninterrupted run's).
    The states are removed once the checkpoint is written; ``force`` starts over and removes them first."""
    reporter = reporter or ConsoleReporter("train-base", cfg.train_base.iters)
    path = storage.location(checkpoint) if checkpoint else default_checkpoint(cfg)
    if reuse(cfg, path, force):
        reporter.info(f"reusing {path} (same config hash)")
        return path
    if cfg.base.pretrained:
        import_base(cfg, reporter, path)
        return path
    states = single_process_states(default_checkpoint(cfg).stem, checkpoint_every, fresh=force, log=reporter.info)
    train(cfg, reporter, Worker(device=device), path=path, checkpointer=states if checkpoint_every else None)
    states.clear(strict=False)  # the checkpoint is written: nothing left to resume
    return path


def import_base(cfg: Config, reporter: Reporter, path: Location | None = None) -> dict:
    """The base ``base.pretrained`` names, checked against the dataset's classes, as a base checkpoint at ``path``
    (no training iteration; its metrics say where it came from). Returns the payload.

    The checkpoint's config carries the imported model's arch, backbone and feature channels (not the
    config's, which an import does not use); its hash is :func:`base_hash`'s."""
    source = cfg.base.pretrained
    val = build_dataset(cfg.data, "val")
    model = load_pretrained(source, num_classes=val.num_classes)
    spec = model.spec
    try:
        stored = replace(cfg, base=replace(cfg.base, arch=spec.arch, backbone=spec.backbone,
                                           feature_channels=spec.feature_channels))
    except ConfigError:  # an architecture the config does not list: keep the config as given
        stored = cfg
    metrics = {"imported_from": source, "images_seen": 0}
    payload = base_payload(model, config=to_flat(stored), class_names=val.class_names, metrics=metrics,
                           history=[], content_hash=base_hash(cfg))
    payload["imported_from"] = {"source": source, "kind": source_kind(source),
                                "identity": source_identity(source)}
    reporter.info(f"imported {source} ({spec.name}, {spec.num_classes} classes, {spec.feature_channels} feature "
                  f"channels, {model.num_params() / 1e6:.2f}M params): no training")
    if path is not None:
        write_checked(path, payload)
    return payload


def reuse(cfg: Config, path: Location, force: bool = False) -> bool:
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
    run resumes from the latest at the same iteration and data position. In one process with
    train_base.num_workers = 0 the state also holds the augmentation's random streams, and the resumed run
    ends bit-identical to an uninterrupted one; otherwise (DataLoader worker processes, or several ranks) the
    augmentation draws are re-seeded from (seed, iteration) at resumption, so it is close to, not
    bit-identical with, an uninterrupted run.

    Stages, in this order (the order of the random draws): config -> data -> model -> optimiser ->
    start or resume -> loop -> checkpoint.
    """
    tc = cfg.train_base
    worker = worker or Worker()
    if cfg.base.pretrained:  # nothing to train: rank 0 writes the imported base
        return import_base(cfg, reporter, path if worker.is_main else None)

    # ---- config: seeds and threads -----------------------------------------------------------------
    seed_everything(tc.seed + worker.rank)
    if tc.threads:
        torch.set_num_threads(tc.threads)

    # ---- data --------------------------------------------------------------------------------------
    data = _data(cfg, worker)

    # ---- model -------------------------------------------------------------------------------------
    model = create_base(cfg.base.arch, cfg.base.backbone, data.train.num_classes,
                        feature_channels=cfg.base.feature_channels,
                        encoder_weights=cfg.base.encoder_weights).to(worker.device)

    # ---- optimiser ---------------------------------------------------------------------------------
    optimizer = torch.optim.AdamW(param_groups(model, tc), lr=tc.lr)

    scaler = grad_scaler(worker.device, tc.precision)  # fp16: loss scaling; fp32 and bf16: none

    # ---- start, or resume from the latest training state --------------------------------------------
    progress = _start_or_resume(cfg, reporter, worker, model, optimizer, scaler, data, checkpointer)

    # ---- loop --------------------------------------------------------------------------------------
    _loop(cfg, reporter, worker, model, optimizer, scaler, data, progress, checkpointer)

    # ---- checkpoint --------------------------------------------------------------------------------
    return _finish(cfg, reporter, worker, model, data, progress, path)


@dataclass
class _Data:
    train: SegmentationDataset
    val: SegmentationDataset
    split: str  # the held-out split the plateau is checked on: holdout if data.holdout, else val
    order: GlobalOrder


@dataclass
class _Progress:
    history: list[dict] = field(default_factory=list)  # held-out scores: {"iter", "mIoU", "mBIoU"}
    start: int = 0  # the iteration this run starts at
    seen: int = 0   # images trained on so far (global)
    rng: dict | None = None  # a resumed run's RNG state, set again once the DataLoader has drawn its seed


def _data(cfg: Config, worker: Worker) -> _Data:
    """The train set (augmented, seeded per rank), the held-out set and this rank's global-batch order."""
    tc = cfg.train_base
    train_set = build_dataset(cfg.data, "train", seed=tc.seed + worker.rank)
    split = selection_split(cfg.data)  # the plateau is checked on the holdout split; val only reports
    val_set = build_dataset(cfg.data, split)
    if len(train_set) < tc.batch_size:
        raise DataError(f"{train_set.name} has {len(train_set)} images, fewer than train_base.batch_size="
                        f"{tc.batch_size}")
    worker.local_batch(tc.batch_size, "train_base.batch_size")
    order = GlobalOrder(len(train_set), tc.batch_size, tc.seed, worker.rank, worker.world_size)
    return _Data(train_set, val_set, split, order)


def _start_or_resume(cfg: Config, reporter: Reporter, worker: Worker, model: BaseSegmentor, optimizer, scaler,
                     data: _Data, checkpointer: Checkpointer | None) -> _Progress:
    """A fresh start, or the model, optimiser (and fp16 loss scale), data position and RNG of the
    checkpointer's latest state."""
    tc = cfg.train_base
    state = checkpointer.latest() if checkpointer else None
    if state is None:
        reporter.info(f"{model.spec.name}: {model.num_params() / 1e6:.2f}M params, {len(data.train)} train / "
                      f"{len(data.val)} {data.split} images, {tc.iters} iters of batch {tc.batch_size} on "
                      f"{worker.world_size} worker(s) ({worker.device}, {tc.precision})")
        return _Progress()
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    data.order.seek(state["position"])
    set_rng_state(state["rng"])
    progress = _Progress(list(state["history"]), int(state["iter"]), int(state["images_seen"]), state["rng"])
    if state.get("augment") is not None and _augment_in_process(cfg, worker):
        data.train.transform.set_random_state(state["augment"])  # where an uninterrupted run's draws are
    else:
        data.train.transform.reseed(tc.seed * 100_003 + progress.start * 7 + worker.rank)
    source = getattr(checkpointer, "source", None)
    reporter.info(f"resuming from iteration {progress.start} ({f'state {source}' if source else 'the last checkpoint'})")
    return progress


def _augment_in_process(cfg: Config, worker: Worker) -> bool:
    """Whether the augmentation draws in this process, in the loop's order (no DataLoader workers prefetching
    ahead of it), and in one rank only (a state holds rank 0's): then a state can hold where its streams are."""
    return cfg.train_base.num_workers == 0 and worker.world_size == 1


def _loop(cfg: Config, reporter: Reporter, worker: Worker, model: BaseSegmentor, optimizer, scaler, data: _Data,
          progress: _Progress, checkpointer: Checkpointer | None) -> None:
    """Iterations progress.start .. train_base.iters: logs, held-out evaluations (rank 0), training states.
    Forward passes in train_base.precision, the loss in float32 from the logits."""
    tc, device, split, history = cfg.train_base, worker.device, data.split, progress.history
    ddp = worker.wrap(model) if worker.wrap else model
    loader = DataLoader(data.train, batch_sampler=(index.tolist() for index, _ in data.order),
                        num_workers=tc.num_workers, worker_init_fn=reseed_worker, collate_fn=data.train.collate,
                        **loader_options(device))
    batches = iter(loader)  # draws the loader's seed from the global RNG
    if progress.rng is not None:  # resumed: the RNG where the state left it, as an uninterrupted run's is
        set_rng_state(progress.rng)
    window_start, window_images = time.perf_counter(), 0
    model.train()
    for it in range(progress.start, tc.iters):
        batch = next(batches)
        x, y = to_device(batch["image"], device), to_device(batch["mask"], device)  # (b, 3, H, W), (b, H, W)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(it, tc) * group["lr_mult"]
        with autocast(device, tc.precision, "train_base.precision"):
            logits = ddp(x).logits
        logits = F.interpolate(logits.float(), size=x.shape[-2:], mode="bilinear", align_corners=False)
        loss = F.cross_entropy(logits, y, ignore_index=data.train.ignore_index)
        optimizer.zero_grad(set_to_none=True)
        backward_step(loss, scaler)
        optimizer_step(optimizer, scaler)
        progress.seen += tc.batch_size
        window_images += tc.batch_size
        step = it + 1
        if step % tc.log_every == 0 or step == tc.iters:
            elapsed = time.perf_counter() - window_start
            reporter.log({"loss": float(loss.detach()), "lr": lr_at(it, tc), "img_per_s": window_images / elapsed}, step)
            window_start, window_images = time.perf_counter(), 0
        if worker.is_main and (step % tc.eval_every == 0 or step == tc.iters):
            scores = evaluate_base(model, data.val, cfg.eval, device=device)  # in eval.precision
            history.append({"iter": step, "mIoU": scores.mIoU, "mBIoU": scores.mBIoU})
            reporter.log({f"{split}_mIoU": scores.mIoU, f"{split}_mBIoU": scores.mBIoU}, step)
            window_start = time.perf_counter()  # evaluation time is not training throughput
        if checkpointer and step % checkpointer.every == 0 and step < tc.iters:
            checkpointer.save({"iter": step, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                               "position": data.order.after(step), "rng": rng_state(), "history": history,
                               "images_seen": progress.seen,
                               "scaler": scaler.state_dict() if scaler is not None else None,
                               "augment": data.train.transform.random_state() if _augment_in_process(cfg, worker)
                               else None}, step)


def _finish(cfg: Config, reporter: Reporter, worker: Worker, model: BaseSegmentor, data: _Data,
            progress: _Progress, path: Path | None) -> dict:
    """The final payload (weights, config, scores, history); rank 0 reports it and saves it at ``path``."""
    split, history, tc = data.split, progress.history, cfg.train_base
    final = {f"{split}_mIoU": history[-1]["mIoU"] if history else math.nan,
             f"{split}_mBIoU": history[-1]["mBIoU"] if history else math.nan,
             "plateau_gain": plateau_gain(history, tc.iters), "images_seen": progress.seen}
    payload = base_payload(model, config=to_flat(cfg), class_names=data.train.class_names, metrics=final,
                           history=history, content_hash=base_hash(cfg))
    if worker.is_main:
        gain = final["plateau_gain"]  # nan without a held-out check at <= 80 % of the schedule
        reporter.info(f"done: {split} mIoU {final[f'{split}_mIoU']:.2f}, mBIoU {final[f'{split}_mBIoU']:.2f}"
                      + ("" if math.isnan(gain) else f", gain over the last fifth {gain:+.2f}"))
        if path is not None:
            write_checked(path, payload)
    return payload
