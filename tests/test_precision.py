"""Precision and the data-parallel details a GPU run relies on, checked on the CPU.

- a smoke pipeline (base -> stage 1 -> stage 2 -> evaluation, the engine's steps in one process) in bf16 runs
  its convolutions and linear layers in bf16 in every step, and its scores agree with fp32's within the
  tolerances stated here (README, "GPUs and precision", explains them);
- fp16 trains with a gradient scaler whose state is kept in the training states;
- gradient accumulation all-reduces once per iteration (DDP's no_sync on the other micro-batches), counted
  on gloo with two processes;
- loaders bound for a GPU pin their memory; the refiner's image path loads in worker processes in the
  order's order, and a training state's data position is the loop's, not the prefetching loader's.
"""
from __future__ import annotations

import collections
import math
from dataclasses import replace

import pytest
import torch
import torch.multiprocessing as mp

from ddps.config import resolve
from ddps.engine import train_base, train_refiner
from ddps.engine.evaluate_checkpoint import evaluate_refiner_file
from ddps.engine.loop import FolderCheckpointer, GlobalOrder, Worker
from ddps.engine.reporter import NullReporter

# The same weights evaluated in bf16 instead of fp32: bf16 keeps 8 significant bits (relative rounding
# <= 2^-9), so only pixels whose two best classes are that close change: mIoU moves by well under a point.
SAME_WEIGHTS_MIOU = 0.5
# A training in bf16 takes another path from the first rounding on, as another seed would; at smoke scale
# (tens of iterations) the final scores stay within this many points of fp32's.
TRAINED_MIOU = 3.0
# The first iteration: the same weights and batch, only the arithmetic differs.
FIRST_LOSS_REL = 0.01


class Dtypes:
    """A global forward hook: the output dtypes of every convolution and linear layer, per phase and per
    mode (a module in training mode: a training's forward pass; in eval mode: a frozen base or an evaluation)."""

    def __init__(self):
        self.seen: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self.phase = None

    def __enter__(self):
        def hook(module, args, out):
            if self.phase and isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)) and torch.is_tensor(out):
                self.seen[self.phase][(out.dtype, module.training)] += 1
        self.handle = torch.nn.modules.module.register_module_forward_hook(hook)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def smoke_chain(precision: str, folder, dtypes: Dtypes) -> dict:
    """base -> refiner stages -> evaluation in ``precision``; scores and training losses. The held-out checks
    during the trainings stay in fp32 (eval.precision), so what runs in ``precision`` while training is the
    trainings' own forward passes and the frozen base's features (train.precision); the evaluation after them
    runs in ``precision`` (eval.precision)."""
    cfg = resolve("smoke", overrides={"train_base.precision": precision, "train.precision": precision,
                                      "train_base.log_every": 1})
    base_reporter, stage_reporters = NullReporter(), {}
    dtypes.phase = f"{precision} base training"
    base = train_base.fit(cfg, base_reporter, checkpoint=folder / f"base-{precision}.pt")
    dtypes.phase = f"{precision} refiner training"
    refiner = train_refiner.fit(cfg, base, out_dir=folder, log=lambda m: None,
                                reporter_factory=lambda s, i: stage_reporters.setdefault(s, NullReporter()))
    dtypes.phase = f"{precision} evaluation"
    record, _ = evaluate_refiner_file(refiner, replace(cfg, eval=replace(cfg.eval, precision=precision)))
    dtypes.phase = None
    fp32_eval, _ = evaluate_refiner_file(refiner, resolve("smoke"))  # the same weights, evaluated in fp32
    first_loss = next(m["loss"] for _, m in base_reporter.history if "loss" in m)
    return {"record": record, "fp32_eval": fp32_eval, "first_loss": first_loss,
            "losses": [m["loss"] for r in stage_reporters.values() for _, m in r.history if "loss" in m]}


def test_a_smoke_pipeline_in_bf16_runs_in_bf16_and_agrees_with_fp32(tmp_path):
    with Dtypes() as dtypes:
        runs = {p: smoke_chain(p, tmp_path, dtypes) for p in ("fp32", "bf16")}
    bf16_in = {step: {mode for (dtype, mode) in dtypes.seen[f"bf16 {step}"] if dtype == torch.bfloat16}
               for step in ("base training", "refiner training", "evaluation")}
    assert bf16_in == {"base training": {True},        # the base's training passes (its held-out checks: fp32)
                       "refiner training": {True, False},  # the denoiser's training passes, the frozen base
                       "evaluation": {False}}, dtypes.seen
    for step in ("base training", "refiner training", "evaluation"):
        assert {dtype for dtype, _ in dtypes.seen[f"fp32 {step}"]} == {torch.float32}, (step, dtypes.seen)
    bf16, fp32 = runs["bf16"], runs["fp32"]
    assert abs(bf16["first_loss"] - fp32["first_loss"]) <= FIRST_LOSS_REL * fp32["first_loss"]
    assert all(math.isfinite(loss) for loss in bf16["losses"]) and len(bf16["losses"]) == len(fp32["losses"])
    # the same (bf16-trained) weights in bf16 and in fp32: every step
    same = bf16["record"], bf16["fp32_eval"]
    for a, b in zip(same[0].steps, same[1].steps, strict=True):
        assert abs(a.mIoU - b.mIoU) <= SAME_WEIGHTS_MIOU
    assert abs(same[0].base.mIoU - same[1].base.mIoU) <= SAME_WEIGHTS_MIOU
    # trained in bf16 against trained in fp32
    for name in ("base", "last"):
        a, b = getattr(bf16["record"], name).mIoU, getattr(fp32["record"], name).mIoU
        assert abs(a - b) <= TRAINED_MIOU, (name, a, b)


def test_fp16_trains_with_a_gradient_scaler_kept_in_the_training_state(tmp_path):
    """fp16 on the CPU: every iteration's gradients go through the scaler (its count of steps without an
    overflow grows by one per iteration), the training states keep it and a resumed run continues it."""
    overrides = {"train_base.precision": "fp16", "train_base.iters": 4, "train_base.eval_every": 4,
                 "train_base.log_every": 1, "train.precision": "fp16", "train.stage1_iters": 3,
                 "train.stage2_iters": 1, "train.log_every": 1, "train.eval_every": 3, "eval.precision": "fp16"}
    cfg = resolve("smoke", overrides=overrides)
    base_states = FolderCheckpointer(tmp_path / "base-states", every=2, keep=3)
    reporter = NullReporter()
    payload = train_base.train(cfg, reporter, Worker(), path=tmp_path / "base.pt", checkpointer=base_states)
    state = base_states.latest()
    assert state["iter"] == 2 and state["scaler"]["scale"] == 2.0 ** 16  # loss scaling: float16's narrow range
    assert state["scaler"]["_growth_tracker"] == 2  # scaler.step and scaler.update at both iterations
    assert all(math.isfinite(m["loss"]) for _, m in reporter.history if "loss" in m)
    assert all(v.dtype == torch.float32 for v in payload["model"].values() if v.is_floating_point())  # fp32 master
    longer = resolve("smoke", overrides={**overrides, "train_base.iters": 6, "train_base.eval_every": 6})
    train_base.train(longer, NullReporter(), Worker(), checkpointer=base_states)  # resumes at 2, saves at 4
    assert base_states.latest()["iter"] == 4 and base_states.latest()["scaler"]["_growth_tracker"] == 4
    from ddps.segmentors.checkpoint import base_from_payload
    base = base_from_payload(payload, tmp_path / "base.pt").freeze()
    data = train_refiner.prepare_data(cfg, base)
    refiner_states = FolderCheckpointer(tmp_path / "refiner-states", every=1, keep=2)
    train_refiner.fit_stage(cfg, "stage1", base, payload, data, path=None, reporter=NullReporter(),
                            checkpointer=refiner_states)
    assert refiner_states.latest()["iter"] == 2 and refiner_states.latest()["scaler"]["_growth_tracker"] == 2


def test_bf16_on_a_gpu_without_it_is_one_line_naming_fp16(monkeypatch):
    from ddps.engine.device import autocast
    from ddps.errors import ConfigError
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    with pytest.raises(ConfigError, match=r"^train.precision=bf16: Tesla T4 has no bfloat16; set "
                                          r"train.precision=fp16 \(with a gradient scaler\) or fp32$"):
        autocast("cuda", "bf16", "train.precision")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    with pytest.warns(UserWarning, match="CUDA is not available"):  # this machine's: torch disables it
        assert autocast("cuda", "bf16").fast_dtype == torch.bfloat16  # an H100: bf16 autocast


# ---- data parallel: one all-reduce per iteration -----------------------------------------------------

def _count_allreduces(rank: int, world: int, port: int, base_path: str, out) -> None:
    """One rank of a 2-process gloo group: stage 1 for 2 iterations with 1, then 4 micro-batches; the number
    of all-reduce calls and a checksum of the weights of each go to ``out``."""
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    from torch.nn.parallel import DistributedDataParallel

    from ddps.segmentors.checkpoint import base_from_payload, read_checkpoint
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    calls = [0]

    def counting(state, bucket):
        calls[0] += 1
        return allreduce_hook(state, bucket)

    def wrap(model):
        ddp = DistributedDataParallel(model)
        ddp.register_comm_hook(None, counting)
        return ddp
    payload = read_checkpoint(base_path)
    base = base_from_payload(payload, base_path).freeze()
    for accumulate in (1, 4):
        calls[0] = 0
        cfg = resolve("smoke", overrides={"train.stage1_iters": 2, "train.accumulate": accumulate,
                                          "train.eval_every": 99})
        data = train_refiner.prepare_data(cfg, base)
        final = train_refiner.fit_stage(cfg, "stage1", base, payload, data, path=None, reporter=NullReporter(),
                                        worker=Worker(rank=rank, world_size=world, wrap=wrap))
        out.put((accumulate, rank, calls[0], float(sum(v.double().sum() for v in final["model"].values()
                                                       if v.is_floating_point()))))
    dist.destroy_process_group()


def test_gradient_accumulation_all_reduces_once_per_iteration(tmp_path):
    from procs import free_port
    base_path = tmp_path / "base.pt"
    train_base.fit(resolve("smoke"), NullReporter(), checkpoint=base_path)
    context = mp.get_context("spawn")
    out, port = context.Queue(), free_port()
    procs = [context.Process(target=_count_allreduces, args=(r, 2, port, str(base_path), out)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
        assert p.exitcode == 0
    results = [out.get(timeout=10) for _ in range(4)]
    calls = {(a, r): c for a, r, c, _ in results}
    sums = {(a, r): s for a, r, _, s in results}
    assert calls[(1, 0)] > 0 and calls[(1, 0)] == calls[(1, 1)]
    # 4 micro-batches per iteration: the same all-reduces as 1 (no_sync on the first 3)
    assert calls[(4, 0)] == calls[(4, 1)] == calls[(1, 0)]
    assert sums[(4, 0)] == sums[(4, 1)]  # the ranks still agree: the last backward averaged every micro-batch


# ---- loaders ----------------------------------------------------------------------------------------

def test_loaders_bound_for_a_gpu_pin_their_memory(monkeypatch):
    """Every loader the engine builds asks loader_options for its device's (pinned on a GPU), and the
    evaluation's loader is pinned for a GPU."""
    from ddps.data import build_dataset
    from ddps.engine import device as device_module, evaluate, features
    from ddps.engine.evaluate import eval_loader
    from ddps.engine.device import loader_options, to_device
    cfg = resolve("smoke")
    dataset = build_dataset(cfg.data, "val")
    assert eval_loader(dataset, cfg.eval, "cuda").pin_memory and eval_loader(dataset, cfg.eval, "cuda:1").pin_memory
    assert not eval_loader(dataset, cfg.eval, "cpu").pin_memory
    assert loader_options("cpu") == {"pin_memory": False}
    x = torch.ones(3)
    assert to_device(x, "cpu") is x  # nothing copied on the CPU
    asked = collections.Counter()

    def spy(device):
        asked[str(device)] += 1
        return device_module.loader_options(device)
    for module in (train_base, train_refiner, features, evaluate):
        monkeypatch.setattr(module, "loader_options", spy)
    tiny = resolve("smoke", overrides={"train_base.iters": 1, "train_base.warmup_iters": 0, "train_base.eval_every": 1,
                                       "train.feature_cache": False, "train.stage1_iters": 1, "train.eval_every": 1})
    payload = train_base.train(tiny, NullReporter(), Worker())  # the train loader and the held-out evaluation's
    assert asked["cpu"] == 2
    from ddps.refiner.build import build_codec
    from ddps.segmentors.checkpoint import base_from_payload
    base = base_from_payload(payload, "base").freeze()
    train_refiner.fit_stage(tiny, "stage1", base, payload, train_refiner.prepare_data(tiny, base), path=None,
                            reporter=NullReporter())  # the image path's loader, the held-out split's
    assert asked["cpu"] == 4
    features.compute_cache(base, dataset, build_codec(tiny))
    assert asked["cpu"] == 5


def test_the_image_path_loads_in_workers_in_the_orders_order():
    """train.feature_cache=false: augmented images in train.num_workers processes; the batches follow the
    global order (their keys), and a training state's position counts the loop's batches, not the batches
    the workers prefetched."""
    cfg = resolve("smoke", overrides={"train.feature_cache": False, "train.num_workers": 2})
    base_path = train_base.fit(resolve("smoke"), NullReporter())
    from ddps.refiner.build import build_codec
    from ddps.segmentors.checkpoint import base_from_payload, read_checkpoint
    base = base_from_payload(read_checkpoint(base_path), base_path).freeze()
    data = train_refiner.prepare_data(cfg, base)
    assert data.train_cache is None and data.select is None  # both streamed
    # each loader process re-seeds the augmentation it finds on its dataset (train_base.reseed_worker)
    assert train_refiner.KeyedDataset(data.train_set).transform is data.train_set.transform is not None
    order = GlobalOrder(len(data.train_set), cfg.train.batch_size, seed=5)
    expected = GlobalOrder(len(data.train_set), cfg.train.batch_size, seed=5)
    stream = train_refiner.batches(data, base, build_codec(cfg), order, tc=cfg.train)
    for _, (_, keys) in zip(range(3), expected):
        batch = next(stream)
        assert torch.equal(batch.keys, keys) and batch.features.shape[0] == cfg.train.batch_size
    assert order.position != expected.position  # the workers ran ahead of the loop ...
    assert order.after(3) == expected.position  # ... the state saves the loop's position
