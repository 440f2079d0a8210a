"""Training of the DDPS refiner (Algorithm 1) as plain functions of (config, reporter); the base is frozen.

A *stage* is one optimiser run: ``stage1`` (single step at t = T), ``stage2`` (all steps, initialised from
stage 1's weights), ``multistep`` (all steps from scratch, stage1 + stage2 iterations: the multi-step-only
ablation) or ``head`` (the UNet as a plain decode head, the same iterations and batch size as both DDPS
stages together). Each stage's checkpoint is addressed by the hash of what determines it, so a finished
stage is reused. Stages: config -> base and data -> model -> optimiser -> loop (held-out evaluations) -> checkpoint.
"""
from __future__ import annotations

import contextlib
import copy
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ddps.checkpoint_io import write_checked
from ddps.config import Config, TrainConfig, content_hash, to_flat
from ddps.data import build_dataset, selection_split
from ddps.engine.device import autocast, backward_step, grad_scaler, loader_options, optimizer_step, to_device
from ddps.engine.evaluate_refiner import evaluate_refiner
from ddps.engine.features import (FeatureCache, base_batch, compute_cache, conditioning,
                                  stored_cache)
from ddps.engine.loop import Checkpointer, GlobalOrder, Worker, rng_state, set_rng_state, single_process_states
from ddps.engine.reporter import ConsoleReporter, Reporter
from ddps.engine.train_base import reseed_worker, seed_everything
from ddps.diffusion.rng import SampleRNG
from ddps.errors import CheckpointError, ConfigError, DataError
from ddps.paths import cache_dir
from ddps import storage
from ddps.storage import Location
from ddps.refiner.build import build_codec, build_denoiser, build_process
from ddps.refiner.checkpoint import refiner_payload
from ddps.refiner.objective import head_loss, refiner_loss
from ddps.segmentors.checkpoint import base_from_payload, read_checkpoint

# what stage 1 does not depend on: stage 2's length, and the reliance checks only multi-step stages run
STAGE1_ONLY_KEYS = ("train.stage2_iters", "train.check_reliance")


def stages_of(cfg: Config) -> list[str]:
    if cfg.denoiser.method == "head":
        return ["head"]
    if cfg.train.stages == "multi-step" or cfg.train.stage1_iters == 0:
        return ["multistep"]
    return ["stage1", "stage2"]


def stage_iters(cfg: Config, stage: str) -> int:
    tc = cfg.train
    return {"stage1": tc.stage1_iters, "stage2": tc.stage2_iters}.get(stage, tc.stage1_iters + tc.stage2_iters)


def checks_reliance(cfg: Config, stage: str) -> bool:
    """Whether the stage's held-out checks run the mask-reliance diagnostic (train.check_reliance): only the
    multi-step stages; stage 1 and the head refine in one step, with no trajectory of their own to feed back."""
    return cfg.train.check_reliance and stage in ("stage2", "multistep")


def stage_hash(cfg: Config, stage: str, base_hash: str) -> str:
    """What determines a stage's weights: data, denoiser, diffusion and train sections plus the base's hash
    (and, for stage 2, stage 1's hash); stage 1 leaves out what only stage 2 reads."""
    sections = ("data", "denoiser", "diffusion", "train")
    if stage == "stage1":
        return content_hash(cfg, sections, [base_hash, stage], exclude=STAGE1_ONLY_KEYS)
    inputs = [base_hash, stage]
    if stage == "stage2":
        inputs.append(stage_hash(cfg, "stage1", base_hash))
    single_step = ("train.check_reliance",) if stage == "head" else ()  # the head refines in one step: no checks
    return content_hash(cfg, sections, inputs, exclude=single_step)


def stage_checkpoint(cfg: Config, stage: str, base_hash: str, out_dir: str | Location | None = None) -> Location:
    """Where a stage's checkpoint lives: in ``out_dir``, else content-addressed under the storage's checkpoints/
    (ddps.storage), else DDPS_HOME's."""
    folder = storage.location(out_dir) if out_dir else storage.folder("checkpoints")
    return folder / f"refiner-{cfg.denoiser.method}-{stage}-{stage_hash(cfg, stage, base_hash)[:16]}.pt"


def refiner_lr(it: int, tc: TrainConfig) -> float:
    """Linear warm-up to tc.lr, then halved every tc.halve_every iterations, never below tc.min_lr."""
    if it < tc.warmup_iters:
        return tc.lr * (it + 1) / tc.warmup_iters
    halvings = it // tc.halve_every if tc.halve_every else 0
    return max(tc.lr * 0.5 ** halvings, tc.min_lr)


class EMA:
    """Exponential moving average of the whole state: ema <- d·ema + (1 − d)·w, every ``every`` iterations."""

    def __init__(self, model: torch.nn.Module, decay: float, every: int):
        self.decay, self.every = decay, every
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        if step % self.every:
            return
        for k, v in model.state_dict().items():
            if v.dtype.is_floating_point:
                self.state[k].mul_(self.decay).add_(v.detach(), alpha=1 - self.decay)
            else:
                self.state[k].copy_(v)


@dataclass
class RefinerData:
    """Where refiner batches come from: a feature cache, or augmented images through the frozen base."""
    train_cache: FeatureCache | None
    train_set: torch.utils.data.Dataset | None
    select: FeatureCache | None   # held-out split for evaluations during training (holdout scenes or val): its
    select_set: torch.utils.data.Dataset  # features cached with the train split's, else streamed from its images
    select_name: str
    num_classes: int
    ignore_index: int
    class_names: tuple


def feature_cache_path(cfg: Config, base_hash: str) -> Path:
    """Where the train split's feature cache of this base lives: addressed by the base's hash, the data
    section, the mask size and flips — what the cached tensors depend on."""
    precision = [] if cfg.train.precision == "fp32" else [f"precision={cfg.train.precision}"]
    key = content_hash(cfg, ("data",), [base_hash, "features", f"mask_scale={cfg.denoiser.mask_scale}",
                                         f"flip={cfg.train.flip}", *precision])
    return cache_dir("features") / f"train-{key[:16]}.pt"


def shared_feature_cache(path: Path) -> Location | None:
    """The storage's copy of a feature cache (another node computed it), when there is a storage."""
    return storage.folder("features") / path.name if storage.storage_uri() else None


def prepare_data(cfg: Config, base, device="cpu", reporter: Reporter | None = None,
                 base_hash: str | None = None, rank: int = 0) -> RefinerData:
    """The training stream's source and the held-out split that evaluations during training use: the
    holdout split when data.holdout > 0 (for choosing hyper-parameters without touching val), else val.
    With train.feature_cache both splits' base features are computed once (in train.precision) and, with
    ``base_hash``, the train split's kept in DDPS_HOME/features and reused; without it (augmentation, or
    images of many sizes as ADE20K's) both stream through the base, nothing held beyond a batch, and each
    data-parallel ``rank`` draws its own augmentation."""
    tc = cfg.train
    codec = build_codec(cfg)
    train_eval = build_dataset(cfg.data, "train", train=False)
    if base.spec.num_classes != train_eval.num_classes:
        raise CheckpointError(f"the base segmentor predicts {base.spec.num_classes} classes but {train_eval.name} "
                              f"has {train_eval.num_classes}; give a base trained on this dataset (ddps train-base)")
    if len(train_eval) < tc.batch_size:
        raise DataError(f"{train_eval.name} has {len(train_eval)} training images, fewer than "
                        f"train.batch_size={tc.batch_size}")
    select_name = selection_split(cfg.data)
    select_set = build_dataset(cfg.data, select_name)
    t0 = time.perf_counter()
    select, cache, train_set = None, None, None
    if tc.feature_cache:
        select = compute_cache(base, select_set, codec, device=device, precision=tc.precision)

        def compute():
            return compute_cache(base, train_eval, codec, flip=tc.flip, device=device, precision=tc.precision)
        how = "computed"
        if base_hash:
            path = feature_cache_path(cfg, base_hash)
            cache, reused = stored_cache(path, compute, len(train_eval) * (2 if tc.flip else 1),
                                         shared=shared_feature_cache(path))
            how = f"memory-mapped from {path}" if reused else f"computed, kept in {path}"
        else:
            cache = compute()
        if reporter:
            reporter.info(f"feature cache: {len(cache)} train images ({'with' if tc.flip else 'no'} flips), "
                          f"{cache.nbytes / 2**20:.0f} MiB, {how}, {time.perf_counter() - t0:.0f}s")
    else:
        train_set = build_dataset(cfg.data, "train", seed=tc.seed + rank)
    return RefinerData(cache, train_set, select, select_set, select_name, train_eval.num_classes,
                       train_eval.ignore_index, train_eval.class_names)


def batches(data: RefinerData, base, codec, order: GlobalOrder, device="cpu", residual: bool = False,
            tc: TrainConfig | None = None):
    """This worker's endless stream of refiner batches in ``order``. Each sample carries the key of its random
    draws: epoch x N + its index, independent of how batches are split. The image path loads and augments
    in train.num_workers processes (pinned for a GPU) and runs the frozen base in train.precision."""
    tc = tc or TrainConfig()
    if data.train_cache is not None:
        for index, keys in order:
            yield conditioning(data.train_cache.batch(index, device, keys=keys), residual)
    else:
        pairs = (list(zip(index.tolist(), keys.tolist())) for index, keys in order)
        keyed = KeyedDataset(data.train_set)
        seeds = torch.Generator().manual_seed(order.seed * 1000 + order.rank)  # each rank's loader processes
        loader = torch.utils.data.DataLoader(keyed, batch_sampler=pairs, num_workers=tc.num_workers,
                                             worker_init_fn=reseed_worker, collate_fn=keyed.collate,
                                             generator=seeds, **loader_options(device))
        for images, labels, keys in loader:
            with autocast(device, tc.precision, "train.precision"):
                batch = base_batch(base, to_device(images, device), to_device(labels, device), codec, keys=keys)
            yield conditioning(batch, residual)


class KeyedDataset(torch.utils.data.Dataset):
    """Items addressed by (index, key) pairs, as GlobalOrder yields them."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def transform(self):
        """The dataset's augmentation, which each loader process re-seeds (train_base.reseed_worker)."""
        return getattr(self.dataset, "transform", None)

    def __getitem__(self, pair):
        index, key = pair
        return {**self.dataset[int(index)], "key": int(key)}

    def collate(self, items: list[dict]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(images (B, 3, H, W), masks (B, H, W), keys (B,)), collated as the dataset collates its items."""
        batch = self.dataset.collate(items)
        return batch["image"], batch["mask"], torch.tensor([i["key"] for i in items])


def train_size(data: RefinerData) -> int:
    return len(data.train_cache) if data.train_cache is not None else len(data.train_set)


def check_trainable(cfg: Config) -> None:
    """What refiner training refuses, in one line, before any compute (the CLI, the planner and here)."""
    if cfg.diffusion.ignore_state:
        raise ConfigError("diffusion.ignore_state is the official checkpoints' layout, for evaluating and refining "
                          "with imported models (ddps import official); training with it is not supported")


def fit_stage(cfg: Config, stage: str, base, base_payload: dict, data: RefinerData, *, path: Path | None,
              init_state: dict | None = None, reporter: Reporter | None = None, worker: Worker | None = None,
              checkpointer: Checkpointer | None = None) -> dict:
    """One optimiser run of ``stage``; returns the final payload (rank 0 also saves it at ``path``).

    Data-parallel: each of ``worker.world_size`` ranks takes its shard of every global batch of
    train.batch_size samples; gradients are averaged by the wrapped (DDP) model, and every random draw is
    keyed by sample, so the weights follow single-process training. ``checkpointer``: the training state
    every ``checkpointer.every`` iterations, and where a restarted run resumes.
    """
    check_trainable(cfg)
    tc = cfg.train
    worker = worker or Worker()
    device = worker.device
    iters = stage_iters(cfg, stage)
    reporter = reporter or ConsoleReporter(stage, iters)
    # ---- model, optimiser, EMA, data order (or the state a restarted run resumes from) --------------
    run = _StageRun.build(cfg, stage, base, data, worker, init_state)
    if run.resume(checkpointer.latest() if checkpointer else None):
        source = getattr(checkpointer, "source", None)
        reporter.info(f"resuming from iteration {run.start} "
                      f"({f'state {source}' if source else 'the last checkpoint'})")
    model = worker.wrap(run.denoiser) if worker.wrap else run.denoiser
    rng_seed = tc.seed * 1000 + {"stage1": 1, "stage2": 2}.get(stage, 3)
    stream = batches(data, base, run.codec, run.order, device, residual=cfg.denoiser.residual, tc=tc)
    if run.start == 0:
        reporter.info(f"UNet-{cfg.denoiser.size} {run.denoiser.unet_params() / 1e6:.2f}M params, "
                      f"{iters} iters of batch {tc.batch_size} on {worker.world_size} worker(s) ({device}, "
                      f"{tc.precision}), "
                      f"T={run.process.steps}, target {tc.target}, loss {tc.loss}, evaluated on {data.select_name}"
                      + (" (with the mask-reliance trajectories)" if checks_reliance(cfg, stage) else ""))

    # ---- the loop --------------------------------------------------------------------------------------
    window_start, window_images = time.perf_counter(), 0
    run.denoiser.train()
    for it in range(run.start, iters):
        for group in run.optimizer.param_groups:
            group["lr"] = refiner_lr(it, tc)
        run.optimizer.zero_grad(set_to_none=True)
        loss, parts = _accumulate(model, run, next(stream), cfg, stage, rng_seed, data.ignore_index, device)
        optimizer_step(run.optimizer, run.scaler)
        step = it + 1
        if run.ema:
            run.ema.update(run.denoiser, step)
        window_images += tc.batch_size
        if step % tc.log_every == 0 or step == iters:
            elapsed = time.perf_counter() - window_start
            reporter.log({"loss": float(loss.detach()), **parts, "lr": refiner_lr(it, tc),
                          "img_per_s": window_images / elapsed}, step)
            window_start, window_images = time.perf_counter(), 0
        if worker.is_main and (step % tc.eval_every == 0 or step == iters):
            scores = _evaluate(cfg, stage, run, data, base, device)
            run.history.append({"iter": step, **scores})
            reporter.log({f"{data.select_name}_{k}": v for k, v in scores.items()}, step)
            window_start = time.perf_counter()
        if checkpointer and step % checkpointer.every == 0 and step < iters:
            checkpointer.save(run.state(step), step)

    # ---- checkpoint ------------------------------------------------------------------------------------
    metrics = {"select_split": data.select_name, **(run.history[-1] if run.history else {})}
    return _save(path if worker.is_main else None, cfg, stage, run.denoiser, run.ema, base_payload, metrics,
                 run.history, data)


@dataclass
class _StageRun:
    """What one optimiser run holds: the denoiser, its optimiser and EMA, the data order, the history of
    held-out checks and the iteration it starts at."""
    codec: object
    process: object
    denoiser: torch.nn.Module
    optimizer: torch.optim.Optimizer
    ema: EMA | None
    order: GlobalOrder
    history: list
    scaler: torch.amp.GradScaler | None = None  # fp16 training's loss scaling
    start: int = 0
    augment: object | None = None  # the image path's augmentation when it draws in this process, in order

    @classmethod
    def build(cls, cfg: Config, stage: str, base, data: RefinerData, worker: Worker,
              init_state: dict | None) -> "_StageRun":
        tc = cfg.train
        seed_everything(tc.seed + {"stage1": 0, "stage2": 1}.get(stage, 2))
        codec = build_codec(cfg)
        process = build_process(cfg, data.num_classes)
        denoiser = build_denoiser(cfg, data.num_classes, base.feature_channels, process).to(worker.device)
        if init_state is not None:
            denoiser.load_state_dict(init_state)
        trainable = [p for p in denoiser.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=tc.lr, betas=(tc.beta1, tc.beta2), weight_decay=tc.weight_decay)
        ema = EMA(denoiser, tc.ema_decay, tc.ema_every) if tc.ema else None
        order = GlobalOrder(train_size(data), tc.batch_size, tc.seed + 11, worker.rank, worker.world_size)
        worker.local_batch(tc.batch_size, "train.batch_size")
        augment = None  # the feature cache has no augmentation; loader workers and other ranks draw their own
        if data.train_set is not None and tc.num_workers == 0 and worker.world_size == 1:
            augment = getattr(data.train_set, "transform", None)
            augment = augment if hasattr(augment, "random_state") else None
        return cls(codec, process, denoiser, optimizer, ema, order, [], grad_scaler(worker.device, tc.precision),
                   augment=augment)

    def resume(self, state: dict | None) -> bool:
        """Weights, EMA, optimiser, data position, RNG and iteration from a saved state, if there is one."""
        if state is None:
            return False
        self.denoiser.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.ema:  # training states are read onto the CPU: the average lives where the weights do
            device = next(self.denoiser.parameters()).device
            self.ema.state = {k: v.to(device) for k, v in state["ema"].items()}
        self.order.seek(state["position"])
        set_rng_state(state["rng"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        if self.augment is not None and state.get("augment") is not None:
            self.augment.set_random_state(state["augment"])
        self.history, self.start = list(state["history"]), int(state["iter"])
        return True

    def state(self, step: int) -> dict:
        """The training state after ``step`` iterations, as :meth:`resume` reads it."""
        return {"iter": step, "model": self.denoiser.state_dict(), "optimizer": self.optimizer.state_dict(),
                "ema": self.ema.state if self.ema else None, "position": self.order.after(step),
                "rng": rng_state(), "history": self.history,
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "augment": self.augment.random_state() if self.augment is not None else None}


def _accumulate(model, run: _StageRun, batch, cfg: Config, stage: str, rng_seed: int, ignore_index: int,
                device) -> tuple[torch.Tensor, dict]:
    """Forward (in train.precision) and backward over the batch's train.accumulate micro-batches; the last
    one's loss and parts. Data-parallel, the gradients are all-reduced once, with the last micro-batch's
    backward (DDP's no_sync before it)."""
    tc = cfg.train
    parts_of_batch = batch.split(tc.accumulate)
    for i, part in enumerate(parts_of_batch):
        last = i + 1 == len(parts_of_batch)
        with _synced(model, last):  # DDP needs the forward and the backward inside no_sync
            with autocast(device, tc.precision, "train.precision"):
                if stage == "head":
                    loss, parts = head_loss(model, part, run.codec, ignore_index)
                else:
                    loss, parts = refiner_loss(
                        model, run.process, part, run.codec, stage=1 if stage == "stage1" else 2, target=tc.target,
                        rng=SampleRNG(rng_seed, part.keys, device), loss=tc.loss, vlb_weight=tc.vlb_weight,
                        cond_dropout=tc.cond_dropout, ignore_index=ignore_index)
            backward_step(loss / tc.accumulate, run.scaler)
    return loss, parts


def _synced(model, sync: bool):
    """DDP's gradient all-reduce for this backward only when ``sync`` (a model that is not DDP: always)."""
    if sync or not hasattr(model, "no_sync"):
        return contextlib.nullcontext()
    return model.no_sync()


def _evaluate(cfg: Config, stage: str, run: _StageRun, data: RefinerData, base, device) -> dict:
    """A held-out check: the EMA weights (when kept) on the selection split (its cached features, else its
    images through the base), in eval.precision; stage 1 at one step. With :func:`checks_reliance` also the
    mask-reliance diagnostic and the multi-step gain: a second trajectory (a fresh random mask at every step)
    and one oracle call per batch, about twice the check's denoiser calls."""
    model = run.denoiser
    if run.ema:
        model = copy.deepcopy(run.denoiser)
        model.load_state_dict(run.ema.state)
    steps = 1 if stage == "stage1" else cfg.infer.steps
    if stage == "stage1":  # one call at t = T, the only time stage 1 trains at (not the official list's t = 1)
        cfg = replace(cfg, infer=replace(cfg.infer, times="even"))
    result = evaluate_refiner(model, run.process, data.select, cfg, num_classes=data.num_classes,
                              ignore_index=data.ignore_index, steps=steps, device=device, head=stage == "head",
                              base=base, dataset=data.select_set, reliance=checks_reliance(cfg, stage))
    return result.checks()


def _save(path, cfg, stage, denoiser, ema, base_payload, metrics, history, data) -> dict:
    payload = refiner_payload(denoiser=denoiser, ema_state=ema.state if ema else None, config=to_flat(cfg),
                              base_payload=base_payload, stage=stage, metrics=metrics, history=history,
                              content_hash=stage_hash(cfg, stage, base_payload["hash"]), class_names=data.class_names)
    if path is not None:
        write_checked(path, payload)
    return payload


def fit(cfg: Config, base_checkpoint: str | Location, reporter_factory=None, out_dir: str | Location | None = None,
        device: str = "cpu", force: bool = False, log=print, checkpoint_every: int | None = None) -> Location:
    """Train every stage the config asks for (reusing finished ones) and return the last stage's checkpoint.

    With ``checkpoint_every`` each stage's training state is saved every that many iterations in the
    storage's ``states/<the stage's default checkpoint stem>/`` (addressed by :func:`stage_hash`), and a rerun
    with the same config resumes the unfinished stage from the latest one, ending with the weights and EMA an
    uninterrupted run has (every random draw is keyed by sample, and the state holds the rest). A stage's
    states are removed once its checkpoint is written; ``force`` starts every stage over, removing them first."""
    base_payload = read_checkpoint(base_checkpoint)
    base = base_from_payload(base_payload, base_checkpoint).freeze().to(device)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    data = None
    init_state = None
    path = None
    for stage in stages_of(cfg):
        path = stage_checkpoint(cfg, stage, base_payload["hash"], out_dir)
        if path.exists() and not force:
            payload = read_checkpoint(path)
            if payload.get("hash") != stage_hash(cfg, stage, base_payload["hash"]):
                raise CheckpointError(f"{path} exists but was trained with another config; pass --force")
            log(f"[{stage}] reusing {path} (same config hash)")
        else:
            if data is None:
                data = prepare_data(cfg, base, device, ConsoleReporter("data"), base_payload["hash"])
            reporter = (reporter_factory or ConsoleReporter)(stage, stage_iters(cfg, stage))
            name = stage_checkpoint(cfg, stage, base_payload["hash"]).stem
            states = single_process_states(name, checkpoint_every, fresh=force, log=reporter.info)
            payload = fit_stage(cfg, stage, base, base_payload, data, path=path, init_state=init_state,
                                reporter=reporter, worker=Worker(device=device),
                                checkpointer=states if checkpoint_every else None)
            states.clear(strict=False)  # the stage's checkpoint is written: nothing left to resume
        init_state = payload["model"]  # stage 2 starts from stage 1's weights (not its EMA)
    return path
