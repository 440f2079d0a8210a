"""Typed configuration: one frozen dataclass per concern.

A resolved configuration is also one flat dict {"section.key": value} — what goes to Tune, MLflow and the
checkpoint alike (see ddps.config.load).
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields

from ddps.config.choices import DATASET_NAMES, check_base_names
from ddps.diffusion.registry import PROCESSES
from ddps.errors import ConfigError, choices


PRECISION_NAMES = ("fp32", "bf16", "fp16")  # ddps.engine.device.DTYPES; checked to match
EVAL_SPLITS = ("val", "holdout")  # what an evaluation scores: eval.split, --split of ddps eval and ddps report


def _require(ok: bool, key: str, value, rule: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is out of range: {rule}")


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "fashion-scenes"  # fashion-scenes | ade20k | cityscapes | folder
    root: str = ""                   # dataset root; for fashion-scenes the Fashion-MNIST IDX folder ('' = default)
    ignore_index: int = 255
    reduce_zero_label: bool = False  # folder datasets: label 0 -> ignore, others -1 (ADE20K's convention)
    # fashion-scenes composition
    canvas: int = 64
    min_objects: int = 2
    max_objects: int = 4
    min_scale: float = 0.9
    max_scale: float = 1.6
    train_scenes: int = 8000
    val_scenes: int = 1000
    scene_seed: int = 0
    # training images held out from every training (base and refiner): the 'holdout' split, on which
    # hyper-parameters are chosen and the base's plateau is checked; val is only for reporting
    holdout: int = 0
    # training augmentation (MMSegmentation's pipeline, with albumentations)
    resize: int = 0           # short side before the ratio range; 0 = keep the image's size
    ratio_min: float = 0.5
    ratio_max: float = 2.0
    crop: int = 64
    cat_max_ratio: float = 0.75
    flip: bool = True
    photometric: bool = True
    # test
    test_resize: int = 0      # short side at test time; 0 = keep

    def __post_init__(self):
        if self.dataset not in DATASET_NAMES:
            raise ConfigError(f"unknown dataset {self.dataset!r}; choose from: {choices(DATASET_NAMES)}")
        _require(self.canvas >= 32, "data.canvas", self.canvas, ">= 32")
        _require(1 <= self.min_objects <= self.max_objects, "data.min_objects/max_objects",
                 (self.min_objects, self.max_objects), "1 <= min_objects <= max_objects")
        _require(0 < self.min_scale <= self.max_scale and 28 * self.max_scale <= self.canvas,
                 "data.min_scale/max_scale", (self.min_scale, self.max_scale),
                 "0 < min_scale <= max_scale and 28 x max_scale <= data.canvas")
        _require(self.holdout >= 0, "data.holdout", self.holdout, ">= 0")
        _require(self.train_scenes >= 1 and self.val_scenes >= 1, "data.train_scenes/val_scenes",
                 (self.train_scenes, self.val_scenes), ">= 1")
        _require(0 < self.ratio_min <= self.ratio_max <= 8, "data.ratio_min/ratio_max",
                 (self.ratio_min, self.ratio_max), "0 < ratio_min <= ratio_max <= 8")
        _require(self.crop >= 32 and self.crop % 32 == 0, "data.crop", self.crop, "a multiple of 32, >= 32")
        _require(0 < self.cat_max_ratio <= 1, "data.cat_max_ratio", self.cat_max_ratio, "in (0, 1]")
        _require(self.resize >= 0, "data.resize", self.resize, ">= 0")
        _require(self.test_resize >= 0, "data.test_resize", self.test_resize, ">= 0")
        _require(0 <= self.ignore_index <= 255, "data.ignore_index", self.ignore_index, "0..255")


@dataclass(frozen=True)
class BaseConfig:
    arch: str = "segformer"        # segformer | deeplabv3plus
    backbone: str = "mit_b0"       # mit_b0..mit_b5 | mobilenet_v2, resnet18, resnet50, resnet101
    feature_channels: int = 256    # width of the feature map before the classifier (what DDPS conditions on)
    encoder_weights: str = ""      # '' = random init | imagenet (smp's published ImageNet weights, by name) |
                                   # a local state-dict file for the encoder
    pretrained: str = ""           # a published whole base instead of training one: an smp-hub name
                                   # (smp-hub/segformer-b2-512x512-ade-160k), a local save_pretrained folder,
                                   # an MMSegmentation checkpoint file (.pth) or a ddps base checkpoint (.pt);
                                   # the base step then imports it

    def __post_init__(self):
        check_base_names(self.arch, self.backbone)
        _require(self.feature_channels >= 8, "base.feature_channels", self.feature_channels, ">= 8")


@dataclass(frozen=True)
class TrainBaseConfig:
    iters: int = 4000
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_iters: int = 200
    poly_power: float = 1.0
    min_lr: float = 0.0
    head_lr_mult: float = 1.0      # learning-rate factor of the decode head (mmseg's SegFormer: 10)
    norm_decay: bool = True        # False: no weight decay on norm layers and biases (mmseg's SegFormer)
    eval_every: int = 400          # iterations between held-out evaluations (plateau check)
    log_every: int = 50
    num_workers: int = 0
    threads: int = 0               # torch threads; 0 = torch's default
    precision: str = "fp32"        # fp32 | bf16 | fp16 (autocast; fp16 with a gradient scaler)
    seed: int = 0

    def __post_init__(self):
        for key in ("iters", "batch_size", "eval_every", "log_every"):
            _require(getattr(self, key) >= 1, f"train_base.{key}", getattr(self, key), ">= 1")
        _require(self.lr > 0, "train_base.lr", self.lr, "> 0")
        _require(0 <= self.min_lr <= self.lr, "train_base.min_lr", self.min_lr, "0 <= min_lr <= lr")
        _require(self.weight_decay >= 0, "train_base.weight_decay", self.weight_decay, ">= 0")
        _require(self.poly_power >= 0, "train_base.poly_power", self.poly_power, ">= 0")
        _require(self.head_lr_mult > 0, "train_base.head_lr_mult", self.head_lr_mult, "> 0")
        _require(0 <= self.warmup_iters < self.iters, "train_base.warmup_iters", self.warmup_iters,
                 "0 <= warmup_iters < iters")
        _require(self.num_workers >= 0 and self.threads >= 0, "train_base.num_workers/threads",
                 (self.num_workers, self.threads), ">= 0")
        _choose("train_base.precision", self.precision, PRECISION_NAMES)


@dataclass(frozen=True)
class EvalConfig:
    mode: str = "whole"            # whole | slide
    crop: int = 512                # sliding-window size and stride
    stride: int = 341
    scales: tuple[float, ...] = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)  # multi-scale test
    flip: bool = True              # flip in the multi-scale test
    multiscale: bool = False       # refiner evaluations: also the multi-scale + flip test (Tables 1, 2, 4)
    batch_size: int = 32
    max_images: int = 0            # 0 = the whole val split
    precision: str = "fp32"        # evaluation, refinement and sampling: fp32 | bf16 | fp16 (autocast)
    split: str = "val"             # what refiner evaluations score: val | holdout (data.holdout training scenes)

    def __post_init__(self):
        _require(self.mode in ("whole", "slide"), "eval.mode", self.mode, "whole or slide")
        _require(0 < self.stride <= self.crop, "eval.stride", self.stride, "0 < stride <= crop")
        _require(len(self.scales) > 0 and all(s > 0 for s in self.scales), "eval.scales", self.scales,
                 "a non-empty list of positive factors")
        _require(self.batch_size >= 1, "eval.batch_size", self.batch_size, ">= 1")
        _require(self.max_images >= 0, "eval.max_images", self.max_images, ">= 0 (0 = all)")
        _require(self.crop >= 32, "eval.crop", self.crop, ">= 32")
        _choose("eval.precision", self.precision, PRECISION_NAMES)
        _choose("eval.split", self.split, EVAL_SPLITS)


DENOISER_SIZES = ("XXS", "XS", "T", "S", "M", "L")  # ddps.denoiser.UNET_SIZES; tested to match
METHODS = ("ddps", "head")
TRANSITIONS = ("uniform", "mask", "uniform+mask")    # ddps.diffusion.TRANSITIONS; tested to match
NOISE_SCHEDULES = ("linear", "cosine")
TARGETS = ("gt", "initial", "first")
LOSSES = ("ce", "hybrid")
STAGE_PLANS = ("two-stage", "multi-step")
RENOISE = ("free", "posterior")
TIME_INPUTS = ("t", "T-t")
STEP_LISTS = ("even", "official")


def _choose(key: str, value: str, valid) -> None:
    if value not in valid:
        raise ConfigError(f"{key}={value!r} is not a valid choice; choose from: {choices(valid)}")


@dataclass(frozen=True)
class DenoiserConfig:
    """The refiner network (paper §3.2): a UNet on concat(base features, mask embedding) -> clean-mask logits."""
    method: str = "ddps"            # ddps | head (the same UNet as a plain decode head: no mask input, no diffusion)
    size: str = "T"                 # UNet size: XXS, XS (CPU) | T, S, M, L (paper Table 5)
    embed_dim: int = 16             # mask embedding width (official code: 16)
    embed_trainable: bool = False   # official code: a frozen random embedding
    dropout: float = 0.1            # before the 1x1 classifier
    mask_scale: int = 4             # masks live at 1/mask_scale of the input (resize codec; features are at 1/4)
    residual: bool = False          # ours, not the paper's: the base's logits join the input and are added to the
                                    # output (classifier zero-initialised), so the refiner starts at the base
    out_dim: int = 0                # the UNet's output width before the classifier; 0 = its base width (dim)
    time_input: str = "t"           # what the UNet's time embedding sees: t (ours: 0 clean .. T noise) |
                                    # T-t (the official DDPS checkpoints: 0 = pure noise)

    def __post_init__(self):
        _choose("denoiser.method", self.method, METHODS)
        _choose("denoiser.time_input", self.time_input, TIME_INPUTS)
        _require(self.out_dim >= 0, "denoiser.out_dim", self.out_dim, ">= 0 (0 = the UNet's dim)")
        _choose("denoiser.size", self.size, DENOISER_SIZES)
        _require(self.embed_dim >= 1, "denoiser.embed_dim", self.embed_dim, ">= 1")
        _require(0 <= self.dropout < 1, "denoiser.dropout", self.dropout, "in [0, 1)")
        _require(self.mask_scale in (1, 2, 4, 8), "denoiser.mask_scale", self.mask_scale, "one of 1, 2, 4, 8")


@dataclass(frozen=True)
class DiffusionConfig:
    """The noise process over masks (paper §3.1, App. A)."""
    kind: str = "discrete"          # discrete | bits (Gaussian diffusion on analog bits, Table 8) | a registered
                                    # name (ddps.diffusion.registry.PROCESSES)
    transition: str = "uniform"     # uniform (replace-only) | mask (absorbing) | uniform+mask
    schedule: str = "linear"        # linear | cosine
    steps: int = 20                 # T, the train steps
    bit_scale: float = 0.1          # analog-bit input scaling (bits)
    ignore_state: bool = False      # the official DDPS layout: the ignore region is a diffusion state and a logit
                                    # (state 0; class c is state c + 1: 151 states for ADE20K's 150 classes)

    def __post_init__(self):
        _choose("diffusion.kind", self.kind, PROCESSES)
        _choose("diffusion.transition", self.transition, TRANSITIONS)
        _choose("diffusion.schedule", self.schedule, NOISE_SCHEDULES)
        _require(1 <= self.steps <= 1000, "diffusion.steps", self.steps, "1..1000")
        _require(self.bit_scale > 0, "diffusion.bit_scale", self.bit_scale, "> 0")


@dataclass(frozen=True)
class TrainConfig:
    """Refiner training (Algorithm 1); the base segmentor stays frozen."""
    target: str = "first"           # what is noised: gt | initial (base argmax) | first (denoiser at x_T, no grad)
    loss: str = "ce"                # ce | hybrid (CE + vlb_weight x VLB)
    vlb_weight: float = 1.0
    stages: str = "two-stage"       # two-stage (stage 1 at t = T, then all steps) | multi-step (all steps only)
    stage1_iters: int = 2000
    stage2_iters: int = 2000
    batch_size: int = 32
    accumulate: int = 1             # gradient accumulation: batch_size / accumulate images per forward
    lr: float = 1.5e-4
    beta1: float = 0.9
    beta2: float = 0.96
    weight_decay: float = 0.045
    warmup_iters: int = 1000
    halve_every: int = 0            # halve the lr every K iterations (0 = never), down to min_lr
    min_lr: float = 1e-6
    ema: bool = True
    ema_decay: float = 0.99         # ema <- decay * ema + (1 - decay) * weights, every ema_every iterations
    ema_every: int = 25
    cond_dropout: float = 0.0       # probability of zeroed features (the unconditional branch CFG needs)
    feature_cache: bool = True      # compute the frozen base's features once (no augmentation; flips kept)
    flip: bool = True               # horizontal flips (with the cache: features of flipped images, cached too)
    eval_every: int = 1000
    check_reliance: bool = False    # every held-out check also scores the reliance trajectories (oracle, random)
    log_every: int = 100
    threads: int = 0
    num_workers: int = 0            # loader processes of the image path (train.feature_cache=false)
    precision: str = "fp32"         # the refiner's and the frozen base's forward passes: fp32 | bf16 | fp16
    seed: int = 0

    def __post_init__(self):
        _choose("train.precision", self.precision, PRECISION_NAMES)
        _choose("train.target", self.target, TARGETS)
        _choose("train.loss", self.loss, LOSSES)
        _choose("train.stages", self.stages, STAGE_PLANS)
        for key in ("batch_size", "accumulate", "ema_every", "eval_every", "log_every"):
            _require(getattr(self, key) >= 1, f"train.{key}", getattr(self, key), ">= 1")
        _require(self.stage1_iters >= 0 and self.stage2_iters >= 1, "train.stage1_iters/stage2_iters",
                 (self.stage1_iters, self.stage2_iters), "stage1_iters >= 0, stage2_iters >= 1")
        _require(self.batch_size % self.accumulate == 0, "train.accumulate", self.accumulate,
                 "must divide train.batch_size")
        _require(self.lr > 0 and 0 <= self.min_lr <= self.lr, "train.lr/min_lr", (self.lr, self.min_lr),
                 "lr > 0 and 0 <= min_lr <= lr")
        _require(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "train.beta1/beta2", (self.beta1, self.beta2),
                 "in [0, 1)")
        _require(self.weight_decay >= 0 and self.vlb_weight >= 0, "train.weight_decay/vlb_weight",
                 (self.weight_decay, self.vlb_weight), ">= 0")
        _require(self.warmup_iters >= 0 and self.halve_every >= 0,
                 "train.warmup_iters/halve_every", (self.warmup_iters, self.halve_every),
                 ">= 0")
        _require(0 <= self.ema_decay < 1, "train.ema_decay", self.ema_decay, "in [0, 1)")
        _require(0 <= self.cond_dropout < 1, "train.cond_dropout", self.cond_dropout, "in [0, 1)")
        _require(self.threads >= 0 and self.num_workers >= 0, "train.threads/num_workers",
                 (self.threads, self.num_workers), ">= 0")


@dataclass(frozen=True)
class InferConfig:
    """Refinement (Algorithm 2): a uniform random start, then `steps` calls of the denoiser."""
    steps: int = 20                 # test steps K <= diffusion.steps (stride sampling)
    renoise: str = "free"           # free: q(x_s | argmax x0) | posterior: q(x_s | x_t, argmax x0)
    cfg_scale: float = 0.0          # classifier-free guidance s: (s + 1) l_cond - s l_uncond
    oracle_t: int = 0               # mask-reliance diagnostic: t of the re-noised ground truth (0 = max(1, T // 10))
    ema: bool = True                # the EMA weights when the checkpoint has them; False: the raw weights (Table 6)
    times: str = "even"             # the step list: even (t = T, T - T/K, ..., T/K: K calls) | official (the
                                    # official code's: t = T - i, i in range(0, T, T // K), then t = 1)
    seed: int = 0

    def __post_init__(self):
        _require(self.steps >= 1, "infer.steps", self.steps, ">= 1")
        _choose("infer.renoise", self.renoise, RENOISE)
        _choose("infer.times", self.times, STEP_LISTS)
        _require(self.cfg_scale >= 0, "infer.cfg_scale", self.cfg_scale, ">= 0")
        _require(self.oracle_t >= 0, "infer.oracle_t", self.oracle_t, ">= 0")


@dataclass(frozen=True)
class Config:
    preset: str = "cpu"
    data: DataConfig = field(default_factory=DataConfig)
    base: BaseConfig = field(default_factory=BaseConfig)
    train_base: TrainBaseConfig = field(default_factory=TrainBaseConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    denoiser: DenoiserConfig = field(default_factory=DenoiserConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    infer: InferConfig = field(default_factory=InferConfig)

    def __post_init__(self):
        _require(self.infer.steps <= self.diffusion.steps, "infer.steps", self.infer.steps,
                 f"<= diffusion.steps ({self.diffusion.steps}): test steps cannot exceed train steps")
        _require(self.infer.oracle_t <= self.diffusion.steps, "infer.oracle_t", self.infer.oracle_t,
                 f"<= diffusion.steps ({self.diffusion.steps})")
        _require(not self.diffusion.ignore_state or (self.diffusion.kind == "discrete" and not self.denoiser.residual),
                 "diffusion.ignore_state", self.diffusion.ignore_state,
                 "only with diffusion.kind=discrete and without denoiser.residual (the official checkpoints' layout)")
        _require(self.eval.split != "holdout" or self.data.holdout > 0, "eval.split", self.eval.split,
                 "val, or holdout with data.holdout > 0 (the training scenes held out)")


SECTIONS = {f.name: f.default_factory for f in fields(Config) if f.name != "preset"}
