"""Ray Train around the engine's loops: one ``TorchTrainer`` per training (base, stage 1, stage 2, head).

The per-worker function only adapts: it reads the worker's rank from Ray Train, sets up its device (the
GPU Ray Train gives it with --gpu, TF32 unless --no-tf32), wraps the model with
``ray.train.torch.prepare_model`` (DDP on gloo for CPU, nccl for GPU; a base's BatchNorm layers become
SyncBatchNorm first on more than one GPU worker), hands the engine a checkpointer that reports training
states to Ray Train, and calls the same loop that runs in one process. Rank 0 logs to MLflow and writes the
final checkpoint.

Effective batch rule: the config's batch size is the global batch; each of N workers takes batch / N of
it (N must divide it), so changing the number of workers changes neither the batch nor the schedule.
Failures: ``FailureConfig(max_failures)`` restarts the worker group, which resumes from the last reported
training state; a resubmitted run with the same name (the step's content hash) resumes the same way. A ddps
error in a worker (bad data, a damaged file) is not retried: it is no transient fault (``failures.py``).

Storage: Ray Train's run state and training-state checkpoints live under the storage's ray/ (``--storage``,
ddps.storage: a bucket, or a folder every node mounts), else DDPS_HOME/ray; the checkpoints a step reads and
writes (``out``, ``base``, ``init``) are storage locations too, so any node can run any worker.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ddps.checkpoint_io import read_checked, write_checked
from ddps.config import from_flat
from ddps.engine.loop import Worker
from ddps.engine.reporter import ConsoleReporter, NullReporter
from ddps.errors import DDPSError
from ddps.storage import STORAGE_VAR, location, ray_storage

STATE_FILE = "state.pt"


@dataclass(frozen=True)
class Cluster:
    """How a training is spread: data-parallel workers and what each one gets."""
    workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    max_failures: int = 2
    checkpoint_every: int = 500
    keep: int = 2
    tf32: bool = True  # TF32 matmuls and convolutions on the GPUs (--no-tf32: off)
    system_metrics: bool = True  # MLflow's system metrics on each training run (--no-system-metrics: off)


class RayCheckpointer:
    """The engine's Checkpointer on Ray Train: rank 0 reports the state as a Ray checkpoint; every rank
    reports at the same iterations (ray.train.report is a barrier)."""

    def __init__(self, every: int, rank: int, log=print, pid_dir: str | None = None):
        self.every, self.rank, self.log, self.pid_dir = every, rank, log, pid_dir

    def latest(self) -> dict | None:
        import ray.train
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as folder:
            state = read_checked(Path(folder) / STATE_FILE)
        if state is None:  # truncated or altered (checksum): the one before it, which Ray keeps beside it
            latest = checkpoint.path
            for previous in _earlier_checkpoints(checkpoint):
                with previous.as_directory() as folder:
                    state = read_checked(Path(folder) / STATE_FILE)
                if state is not None:
                    self.log(f"the last Ray checkpoint {latest} is damaged (checksum); resuming from {previous.path} "
                             f"(iteration {state['iter']})")
                    break
            else:
                self.log(f"the last Ray checkpoint {latest} is damaged and no earlier one is sound; starting "
                         f"this stage over")
        if state is not None and self.pid_dir:  # for fault-injection tests: where each rank resumed
            Path(self.pid_dir, f"rank{self.rank}.resumed").write_text(str(state["iter"]))
        return state

    def save(self, state: dict, step: int) -> None:
        import ray.train
        if self.rank != 0:
            ray.train.report({"iter": step})
            return
        with tempfile.TemporaryDirectory() as folder:
            write_checked(Path(folder) / STATE_FILE, state)
            ray.train.report({"iter": step}, checkpoint=ray.train.Checkpoint.from_directory(folder))


def _earlier_checkpoints(checkpoint) -> list:
    """The run's checkpoints before ``checkpoint`` (Ray keeps ``num_to_keep`` of them beside it: checkpoint_<time>
    folders), newest first, listed on its filesystem — a local folder or a bucket alike."""
    import posixpath

    import pyarrow.fs
    import ray.train
    filesystem, latest = checkpoint.filesystem, checkpoint.path.rstrip("/")
    parent, name = posixpath.split(latest)
    infos = filesystem.get_file_info(pyarrow.fs.FileSelector(parent, allow_not_found=True))
    older = sorted((i.path for i in infos if i.type == pyarrow.fs.FileType.Directory
                    and posixpath.basename(i.path).startswith("checkpoint_")
                    and posixpath.basename(i.path) < name), reverse=True)
    return [ray.train.Checkpoint(path, filesystem=filesystem) for path in older]


class FeedReporter(ConsoleReporter):
    """Rank 0's console reporter: its lines go to the worker's output (Ray's logs; the driver's console with
    --verbose) and, through the ``ProgressFeed`` actor the driver polls, to the pipeline's progress line."""

    def __init__(self, name: str, total: int | None, feed):
        super().__init__(name, total)
        self.feed = feed

    def log(self, metrics: dict, step: int) -> None:
        super().log(metrics, step)
        self.feed.post.remote(("log", self.name, step, self.total, dict(metrics), self.eta(step)))

    def info(self, message: str) -> None:
        super().info(message)
        self.feed.post.remote(("info", self.name, message))


def model_wrap(use_gpu: bool, world: int, sync_batchnorm: bool = False) -> Callable:
    """The Worker's ``wrap``: DDP by ray.train.torch.prepare_model (the model is already on its device).

    With ``sync_batchnorm`` (the base) on more than one GPU worker, its BatchNorm layers first become
    SyncBatchNorm — batch statistics over the global batch, not each worker's shard. The conversion keeps the
    same Parameter objects (the optimiser the engine built stays valid) and the state_dict keys (the checkpoint
    is a plain base's); only on GPUs, as SyncBatchNorm refuses CPU tensors in training."""
    def wrap(model):
        import ray.train.torch
        import torch
        if sync_batchnorm and use_gpu and world > 1:
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        canonical_grad_strides(model)
        return ray.train.torch.prepare_model(model, move_to_device=False)
    return wrap


def canonical_grad_strides(model) -> None:
    """Give each weight gradient its parameter's strides where they differ only on dimensions of size 1.

    A convolution's backward may return a weight gradient whose strides differ from the weight's on a size-1
    dimension — a 1x1 classifier's [C, K, 1, 1], a depthwise [C, 1, 3, 3] — where a stride is arbitrary: the
    memory layout is the same. DDP compares strides literally, copies each such gradient into its bucket and
    warns "Grad strides do not match bucket view strides" (SegFormer's depthwise and 1x1 weights). A hook on
    the parameter re-strides the gradient (``as_strided`` over the same storage, no copy) before DDP sees it;
    a gradient whose layout really differs is left as it is."""
    def same_layout(grad, stride) -> bool:
        return all(a == b or n == 1 for a, b, n in zip(grad.stride(), stride, grad.size()))

    for param in model.parameters():
        if param.requires_grad and 1 in param.shape:
            stride = param.stride()
            param.register_hook(lambda grad, stride=stride: grad.as_strided(grad.size(), stride)
                                if grad.stride() != stride and same_layout(grad, stride) else grad)


def _worker_setup(config: dict, sync_batchnorm: bool = False):
    import ray.train
    import ray.train.torch
    import torch

    from ddps.engine.device import configure
    if config.get("storage"):  # the driver's storage, whatever the node's environment says
        os.environ[STORAGE_VAR] = config["storage"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    threads = max(1, int(config["cpus_per_worker"]))
    torch.set_num_threads(threads)
    device = str(ray.train.torch.get_device())
    configure(device, tf32=config["tf32"])
    worker = Worker(rank=rank, world_size=world, device=device,
                    wrap=model_wrap(config["use_gpu"], world, sync_batchnorm))
    if config.get("pid_dir"):  # for fault-injection tests: where each rank's process can be found
        Path(config["pid_dir"], f"rank{rank}.pid").write_text(str(os.getpid()))
    reporter = NullReporter()
    if rank == 0:
        echo = (FeedReporter(config["label"], config.get("iters"), config["feed"]) if config.get("feed")
                else ConsoleReporter(config["label"], config.get("iters")))
        reporter = echo
        if config.get("tracking_uri") and config.get("run_id"):
            from ddps.orchestration.tracking import MLflowReporter, Tracker
            # fail fast and spool while the server is down rather than hold the training in MLflow's retries
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
            reporter = MLflowReporter(Tracker(config["tracking_uri"], check=False), config["run_id"], echo=echo)
    if config.get("system_metrics") and config.get("run_id") and context.get_local_rank() == 0:  # one per machine
        from ddps.orchestration.tracking import system_metrics
        node = f"node_{context.get_node_rank()}" if world > context.get_local_world_size() else None
        system_metrics(config["tracking_uri"], config["run_id"], node, log=reporter.info)
    return worker, reporter, RayCheckpointer(config["checkpoint_every"], rank, log=reporter.info,
                                               pid_dir=config.get("pid_dir"))


def base_worker(config: dict) -> None:
    """Ray Train per-worker loop of the base segmentor: engine.train_base.train."""
    from ddps.engine.train_base import train
    worker, reporter, checkpointer = _worker_setup(config, sync_batchnorm=True)
    cfg = from_flat(config["cfg"])
    train(cfg, reporter, worker, path=location(config["out"]) if worker.is_main else None, checkpointer=checkpointer)
    if hasattr(reporter, "flush"):
        reporter.flush()


def refiner_worker(config: dict) -> None:
    """Ray Train per-worker loop of one refiner stage: engine.train_refiner.fit_stage."""
    from ddps.engine.train_refiner import fit_stage, prepare_data
    from ddps.segmentors.checkpoint import base_from_payload, read_checkpoint
    worker, reporter, checkpointer = _worker_setup(config)
    cfg = from_flat(config["cfg"])
    base_payload = read_checkpoint(config["base"])
    base = base_from_payload(base_payload, config["base"]).freeze().to(worker.device)
    data = prepare_data(cfg, base, worker.device, reporter if worker.is_main else None, base_payload["hash"],
                        rank=worker.rank)
    init_state = read_checkpoint(config["init"])["model"] if config.get("init") else None
    fit_stage(cfg, config["stage"], base, base_payload, data, path=location(config["out"]) if worker.is_main else None,
              init_state=init_state, reporter=reporter, worker=worker, checkpointer=checkpointer)
    if hasattr(reporter, "flush"):
        reporter.flush()


def ddps_cause(error: BaseException) -> DDPSError | None:
    """The ddps error a Ray Train worker raised, found in what ``fit()`` raised (its causes, a Ray task
    error's ``cause``, a training failure's per-worker errors); None when there is none."""
    seen, todo = set(), [error]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, DDPSError):  # Ray's RayTaskError subclasses the original's class; .cause is it
            original = getattr(e, "cause", None)
            return original if isinstance(original, DDPSError) else e
        todo += [e.__cause__, e.__context__, getattr(e, "cause", None)]
        failures = getattr(e, "worker_failures", None)
        if isinstance(failures, dict):
            todo += list(failures.values())
    return None


@contextlib.contextmanager
def ddps_errors():
    """What runs under it on Ray (a training's workers, a task) fails with the ddps error it raised — bad data,
    a full disk, no GPU: its one line, not Ray's traceback; any other error as it is."""
    try:
        yield
    except Exception as e:
        cause = ddps_cause(e)
        if cause is None:
            raise
        raise cause from None


def run(kind: str, config: dict, cluster: Cluster, name: str, tune: bool = False, console=None):
    """Run one training on Ray Train and return its final checkpoint path (``config['out']``).

    ``name`` (the step's content hash) names the Ray run, so a resubmitted run resumes its checkpoints.
    Inside a Ray Tune trial (``tune``), what the workers report (the iteration) reaches the sweep's progress;
    with a ``console`` (progress.Console), rank 0's progress reaches its line.
    The run state lives in the storage (ddps.storage.ray_storage); the final checkpoint is checked there.
    """
    from ddps.storage import storage_uri
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig

    from ddps.orchestration.failures import DDPSTorchTrainer
    loop = {"base": base_worker, "refiner": refiner_worker}[kind]
    callbacks = []
    if tune:
        from ray.tune.integration.ray_train import TuneReportCallback
        callbacks.append(TuneReportCallback())
    storage_path, filesystem = ray_storage("ray")
    pump = contextlib.nullcontext()
    if console is not None and not tune:
        from ddps.orchestration.progress import FeedPump, new_feed
        config = {**config, "feed": new_feed()}
        pump = FeedPump(config["feed"], console)
    trainer = DDPSTorchTrainer(
        loop,
        train_loop_config={**config, "cpus_per_worker": cluster.cpus_per_worker, "use_gpu": cluster.use_gpu,
                           "tf32": cluster.tf32, "checkpoint_every": cluster.checkpoint_every,
                           "storage": storage_uri()},
        torch_config=TorchConfig(backend="nccl" if cluster.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=cluster.workers, use_gpu=cluster.use_gpu,
                                     resources_per_worker={"CPU": cluster.cpus_per_worker}),
        run_config=RunConfig(name=name, storage_path=storage_path, storage_filesystem=filesystem,
                             failure_config=FailureConfig(max_failures=cluster.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=cluster.keep), callbacks=callbacks),
    )
    with ddps_errors(), pump:
        trainer.fit()
    out = location(config["out"])
    if not out.exists():
        raise RuntimeError(f"Ray Train finished {name} but {out} was not written")
    return out
