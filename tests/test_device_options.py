"""One device option everywhere (--gpu, --no-tf32), checked on a machine without a GPU: every command that
computes refuses --gpu in one line before any compute; on more than one GPU worker the base's BatchNorm layers
become SyncBatchNorm; the pipeline's evaluation is a Ray task holding a GPU and a sweep's evaluation trial
holds one — on an in-process Ray with a logical GPU (Ray schedules by declared resources), where the engine
then finds no CUDA device and says so."""
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from ddps.config import resolve, to_flat
from ddps.engine.device import DeviceError
from ddps.orchestration.ray_train import Cluster, model_wrap

ROOT = Path(__file__).resolve().parents[1]
NO_GPU = "--gpu: no CUDA device is visible to this process"


@pytest.fixture
def no_cuda(monkeypatch):
    """No CUDA device, whatever machine runs the tests."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


# ---- the command line ------------------------------------------------------------------------------

@pytest.mark.reliability(kind="bad_input", case="--gpu without a GPU")
@pytest.mark.parametrize("argv", [
    ["train-base", "--preset", "smoke"],
    ["train", "--preset", "smoke"],
    ["eval", "base.pt"],
    ["refine", "photo.png", "--checkpoint", "runs:/0123/model/refiner.pt", "--out", "masks"],
    ["pipeline", "--preset", "smoke"],
    ["sweep", str(ROOT / "experiments" / "table3e.yaml"), "--preset", "smoke"],
    ["demo", "--preset", "smoke"],
], ids=lambda argv: argv[0])
def test_gpu_without_one_is_one_line_before_any_compute(argv, tmp_path, monkeypatch, capsys, no_cuda):
    import ddps.engine.evaluate_checkpoint as evaluate_checkpoint
    import ddps.engine.refine_images as refine_images
    import ddps.engine.train_base as train_base
    import ddps.engine.train_refiner as train_refiner
    import ddps.orchestration.pipeline as pipeline
    import ddps.orchestration.runtime as runtime
    import ddps.orchestration.sweep as sweep
    from ddps.cli import main

    def no_compute(*args, **kwargs):
        raise AssertionError("compute started")
    for module, name in ((train_base, "fit"), (train_refiner, "fit"), (evaluate_checkpoint, "evaluate_checkpoint"),
                         (refine_images, "refine_images"), (pipeline, "Pipeline"), (sweep, "Sweep"),
                         (runtime, "ensure_ray")):
        monkeypatch.setattr(module, name, no_compute)
    home = tmp_path / "home"
    monkeypatch.setenv("DDPS_HOME", str(home))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.chdir(tmp_path)
    assert main(argv + ["--gpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"ddps: error: {NO_GPU}") and len(err.strip().splitlines()) == 1, err
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []  # no checkpoint, no MLflow store, no dataset


@pytest.mark.parametrize("argv, module, name", [
    (["train-base", "--preset", "smoke"], "ddps.engine.train_base", "fit"),
    (["train", "--preset", "smoke", "--base", "base.pt"], "ddps.engine.train_refiner", "fit"),
    (["eval", "refiner.pt"], "ddps.engine.evaluate_checkpoint", "evaluate_checkpoint"),
    (["refine", "photo.png", "--checkpoint", "refiner.pt", "--out", "masks"], "ddps.engine.refine_images",
     "refine_images"),
], ids=["train-base", "train", "eval", "refine"])
def test_gpu_reaches_the_engine_as_cuda_and_no_tf32_turns_tf32_off(argv, module, name, monkeypatch, tmp_path):
    """Where CUDA is there (here: said to be), the command hands the engine "cuda", with TF32 as asked."""
    import importlib
    monkeypatch.chdir(tmp_path)
    for given in ("refiner.pt", "photo.png"):  # the files a command checks for before it loads anything
        (tmp_path / given).write_bytes(b"")

    import ddps.cli as cli
    calls = []

    def engine(*args, **kwargs):
        calls.append(kwargs.get("device"))
        return [] if name == "refine_images" else "done"
    monkeypatch.setattr(importlib.import_module(module), name, engine)
    monkeypatch.setattr(cli, "_print_checkpoint", lambda path: None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        assert cli.main(argv + ["--gpu", "--no-tf32"]) == 0
        assert calls == ["cuda"]
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        assert cli.main(argv + ["--gpu"]) == 0 and cli.main(argv) == 0
        assert calls == ["cuda", "cuda", "cpu"]
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


def test_eval_evaluates_on_its_device_single_and_multi_scale(tmp_path, monkeypatch):
    import ddps.engine.evaluate_checkpoint as evaluate_checkpoint
    from ddps.engine.record import Scores
    from ddps.segmentors import create_base
    model = create_base("segformer", "mit_b0", 11, feature_channels=32)
    torch.save(model.state_dict(), tmp_path / "user.pth")
    device, seen = torch.device("cpu"), []

    def evaluate_base(model, dataset, cfg, multiscale=False, device="cpu", precision=None):
        seen.append((multiscale, device, next(model.parameters()).device))
        return Scores(50.0, 90.0, 40.0, (50.0,) * 11, (40.0,) * 11)
    monkeypatch.setattr(evaluate_checkpoint, "evaluate_base", evaluate_base)
    evaluate_checkpoint.evaluate_checkpoint(tmp_path / "user.pth", preset="smoke", device=device)
    assert [(ms, d is device, on) for ms, d, on in seen] == [(False, True, device), (True, True, device)]


def test_every_command_that_computes_takes_gpu_and_no_tf32():
    from ddps.cli import build_parser
    parser = build_parser()
    for argv in (["train-base"], ["train"], ["eval", "x.pt"], ["refine", "x.png", "--checkpoint", "r.pt", "--out", "o"],
                 ["pipeline"], ["sweep", "--all"], ["demo"]):
        args = parser.parse_args(argv + ["--gpu", "--no-tf32"])
        assert args.gpu and args.no_tf32
    from ddps.cli import _cluster
    cluster = _cluster(parser.parse_args(["pipeline", "--gpu", "--no-tf32"]))
    assert cluster.use_gpu and not cluster.tf32 and Cluster().tf32


def test_a_local_ray_needs_a_gpu_per_worker_and_a_cluster_waits_for_its_gpu_nodes(monkeypatch, no_cuda):
    import ray

    from ddps.orchestration.runtime import check_gpu, ensure_ray
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    check_gpu(Cluster())  # without --gpu: nothing to check
    with pytest.raises(DeviceError, match=NO_GPU):
        check_gpu(Cluster(use_gpu=True))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    check_gpu(Cluster(workers=1, use_gpu=True))
    with pytest.raises(DeviceError, match=r"--gpu --workers 2: this machine has 1 GPU\(s\) visible and each Ray "
                                          r"Train worker takes one; give --workers 1 or fewer"):
        check_gpu(Cluster(workers=2, use_gpu=True))

    # a cluster (RAY_ADDRESS): its nodes' GPUs, not this machine's; none yet is said in one line, and the run goes on
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:8265")
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    check_gpu(Cluster(use_gpu=True))
    resources = {"CPU": 8.0}
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: None)
    monkeypatch.setattr(ray, "cluster_resources", lambda: resources)
    lines: list[str] = []
    ensure_ray(Cluster(use_gpu=True), log=lines.append)
    assert lines == ["--gpu: the cluster at http://127.0.0.1:8265 has no GPU yet; the trainings and evaluations "
                     "wait for GPU nodes (an autoscaler adds them)"]
    ensure_ray(Cluster(), log=lines.append)
    resources["GPU"] = 1.0
    ensure_ray(Cluster(use_gpu=True), log=lines.append)
    assert len(lines) == 1


# ---- SyncBatchNorm -----------------------------------------------------------------------------------

class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
        self.head = nn.Sequential(nn.Conv2d(4, 2, 1), nn.BatchNorm2d(2))


@pytest.mark.parametrize("use_gpu, world, sync, converted", [
    (True, 2, True, True), (True, 1, True, False), (False, 2, True, False), (True, 2, False, False)])
def test_the_base_gets_sync_batchnorm_only_on_more_than_one_gpu_worker(use_gpu, world, sync, converted, monkeypatch):
    import ray.train.torch
    monkeypatch.setattr(ray.train.torch, "prepare_model", lambda model, **kwargs: model)  # DDP needs a session
    model = _Net()
    params, keys = list(model.parameters()), list(model.state_dict())
    optimizer = torch.optim.AdamW(model.parameters())  # built by the engine before the wrap
    wrapped = model_wrap(use_gpu, world, sync_batchnorm=sync)(model)
    synced = sum(isinstance(m, nn.SyncBatchNorm) for m in wrapped.modules())
    assert synced == (2 if converted else 0)
    assert sum(type(m) is nn.BatchNorm2d for m in wrapped.modules()) == (0 if converted else 2)
    assert all(a is b for a, b in zip(wrapped.parameters(), params)) and len(list(wrapped.parameters())) == len(params)
    assert all(a is b for a, b in zip(optimizer.param_groups[0]["params"], wrapped.parameters()))
    assert list(wrapped.state_dict()) == keys  # the checkpoint is a plain base's


# ---- evaluations on a GPU (a logical one: Ray schedules by what is declared) ----------------------------

@pytest.fixture(scope="module")
def ray_gpu():
    """An in-process Ray on loopback declaring 2 CPUs and 1 GPU the machine does not have."""
    import ray

    from ddps.orchestration.runtime import WORKER_ENV
    os.environ["RAY_AUTH_MODE"] = "disabled"
    env = {k: os.environ[k] for k in WORKER_ENV if k in os.environ}
    ray.init(address="local", num_cpus=2, num_gpus=1, include_dashboard=False, _node_ip_address="127.0.0.1",
             object_store_memory=128 * 2**20, runtime_env={"env_vars": env}, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.mark.slow
def test_the_pipelines_evaluation_with_gpu_is_a_ray_task_holding_a_gpu(ray_gpu, tmp_path, monkeypatch):
    import ray

    from ddps.errors import CheckpointError
    from ddps.orchestration.pipeline import Pipeline, gpu_task_options
    cluster = Cluster(workers=1, cpus_per_worker=0.5, use_gpu=True)
    options = gpu_task_options(cluster)
    assert options["num_gpus"] == 1 and options["num_cpus"] == 0.5
    ids = ray.get(ray.remote(lambda: ray.get_gpu_ids()).options(**options).remote())
    assert len(ids) == 1  # scheduled on the (logical) GPU, which Ray hands it
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    missing = tmp_path / "refiner.pt"
    # the driver believes it has CUDA: had it evaluated in-process, it would fail on the missing file instead
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    pipeline = Pipeline(resolve("smoke"), cluster, tracking_uri=uri, log=lambda line: None)
    with pytest.raises(DeviceError, match=NO_GPU):
        pipeline.evaluate(missing, "gpu-digest", cell={"ddps.cell": "gpu"})
    run = pipeline.tracker.client.search_runs([pipeline.experiment_id])[0]
    assert run.info.status == "FAILED" and run.data.tags["ddps.content_hash"] == "gpu-digest"

    def no_task(*args, **kwargs):
        raise AssertionError("a Ray task without --gpu")
    monkeypatch.setattr(ray, "remote", no_task)  # without --gpu: in the driver, on its CPU threads
    cpu = Pipeline(resolve("smoke"), Cluster(workers=1, cpus_per_worker=0.5), tracking_uri=uri, log=lambda line: None)
    with pytest.raises(CheckpointError, match="does not exist"):
        cpu.evaluate(missing, "cpu-digest", cell={"ddps.cell": "cpu"})


@pytest.mark.slow
def test_a_sweeps_evaluation_trial_holds_a_gpu_and_evaluates_on_it(ray_gpu, tmp_path):
    from ddps.orchestration.progress import Progress
    from ddps.orchestration.sweep import TRIAL_CPUS, Job, SweepContext, SweepError, _run_wave, trial_resources
    gpu, cpu = Cluster(workers=1, cpus_per_worker=0.5, use_gpu=True), Cluster(workers=1, cpus_per_worker=0.5)
    assert trial_resources(gpu, True, 0.5) == {"CPU": 0.5, "GPU": 1}
    assert trial_resources(cpu, True, 0.5) == {"CPU": 0.5}
    assert trial_resources(gpu, False, 0.5) == trial_resources(cpu, False, 0.5) == {"CPU": TRIAL_CPUS}
    context = SweepContext(gpu, f"sqlite:///{tmp_path / 'mlflow.db'}", "gpu-table", parent="", sweep="s",
                           eval_cpus=0.5)
    job = Job("eval", context, to_flat(resolve("smoke")), "cell on a gpu", seconds=1.0)
    lines: list[str] = []
    # the trial is scheduled on the logical GPU and evaluates in its own process on "cuda": no CUDA there
    with pytest.raises(SweepError, match=f"1 of 1 evaluations failed; the first, cell on a gpu: .*{NO_GPU}"):
        _run_wave("gpu-evaluations", "evaluations", [job], trial_resources(gpu, True, 0.5), 1,
                  Progress("gpu-table", 1, 1, 0, lines.append))
