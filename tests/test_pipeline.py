"""The distributed pipeline with real components: in-process Ray (2 CPU workers on gloo), MLflow on SQLite.

Slow (Ray start-up, several TorchTrainer runs): marked ``slow``; ``make test-fast`` skips them.
"""
import os
import re

import pytest
import torch

from ddps.config import resolve, to_flat
from ddps.engine.loop import Worker
from ddps.orchestration.tracking import Tracker, TrackingError, is_secret, loggable_params, resolve_tracking_uri
from sockets import descendants, is_loopback, listening

pytestmark = pytest.mark.slow


@pytest.mark.reliability(kind="security", case="local Ray listens on 127.0.0.1 only")
def test_local_ray_listens_on_loopback_only(ray_local):
    """The in-process Ray binds its services to 127.0.0.1, not to the machine's address."""
    ray = ray_local
    nodes = ray.nodes()
    assert nodes and all(n["NodeManagerAddress"] == "127.0.0.1" for n in nodes)
    assert ray.get_runtime_context().gcs_address.startswith("127.0.0.1:")
    # every port the driver and the processes it started listen on (GCS, raylet, object manager, dashboard
    # and its agents, workers): loopback, none on 0.0.0.0, :: or the machine's address
    ports = listening(descendants(os.getpid()))
    assert len({pid for pid, _, _ in ports}) >= 4  # the driver, GCS, raylet, dashboard and its agents at least
    assert [p for p in ports if not is_loopback(p[1])] == []


@pytest.mark.reliability(kind="security", case="secret-looking parameters never logged")
def test_tracking_uri_is_always_absolute_and_secrets_are_never_params(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri(None) == f"sqlite:///{os.environ['DDPS_HOME']}/mlflow.db"
    monkeypatch.chdir(tmp_path)
    assert resolve_tracking_uri("sqlite:///rel.db") == f"sqlite:///{tmp_path / 'rel.db'}"
    params = loggable_params({"train.lr": 1e-3, "cluster.api_key": "x", "db.password": "y", "auth.token": "z",
                              "data.keypoints": 3})
    assert set(params) == {"train.lr", "data.keypoints"}
    secrets = ["mlflow.secret_value", "cloud.apikey", "ssh.private-key", "user.sshKey", "aws.accessKeyId",
               "tls.keyfile", "x.api-key", "key", "db.credentials"]
    plain = ["data.keypoints", "zoo.monkey", "train.lr", "eval.hotkeys_off", "base.backbone"]
    assert [n for n in secrets if not is_secret(n)] == [] and [n for n in plain if is_secret(n)] == []


@pytest.mark.reliability(kind="fault", case="MLflow server unreachable at start")
def test_an_unreachable_tracking_server_fails_before_any_compute():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(TrackingError, match=f"MLflow server http://127.0.0.1:{port} is unreachable"):
        Tracker(f"http://127.0.0.1:{port}")


def _stage2_weights(world: int, tmp_path, base, data_cfg):
    """k = 4 stage-2 steps on Ray Train with ``world`` workers; the final weights."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    def loop(config):
        import ray.train
        import ray.train.torch
        from ddps.config import from_flat
        from ddps.engine.reporter import NullReporter
        from ddps.engine.train_refiner import fit_stage, prepare_data
        from ddps.segmentors.checkpoint import base_from_payload, read_checkpoint
        torch.set_num_threads(1)
        ctx = ray.train.get_context()
        worker = Worker(ctx.get_world_rank(), ctx.get_world_size(), "cpu",
                        wrap=lambda m: ray.train.torch.prepare_model(m, move_to_device=False))
        cfg = from_flat(config["cfg"])
        payload = read_checkpoint(config["base"])
        base = base_from_payload(payload, config["base"]).freeze()
        data = prepare_data(cfg, base)
        out = fit_stage(cfg, "stage2", base, payload, data, path=None, reporter=NullReporter(), worker=worker)
        if worker.is_main:
            torch.save(out["model"], config["out"])

    out = tmp_path / f"world{world}.pt"
    TorchTrainer(loop, train_loop_config={"cfg": to_flat(data_cfg), "base": str(base), "out": str(out)},
                 torch_config=TorchConfig(backend="gloo"),
                 scaling_config=ScalingConfig(num_workers=world, resources_per_worker={"CPU": 0.5}),
                 run_config=RunConfig(name=f"equiv-{world}-{tmp_path.name}", storage_path=str(tmp_path / "ray"))).fit()
    return torch.load(out, weights_only=True)


def test_two_workers_of_batch_b_equal_one_worker_of_batch_2b(ray_local, tmp_path):
    """The real stage-2 step (random t, sampled noise, condition dropout, shuffled order), keyed by sample."""
    from ddps.engine.reporter import NullReporter
    from ddps.engine.train_base import fit as fit_base
    base = tmp_path / "base.pt"
    fit_base(resolve("smoke"), NullReporter(), checkpoint=base)
    cfg = resolve("smoke", overrides={"train.stage2_iters": 4, "train.batch_size": 8, "train.cond_dropout": 0.5,
                                      "denoiser.dropout": 0.0, "train.ema": False, "train.eval_every": 100})
    one = _stage2_weights(1, tmp_path, base, cfg)
    two = _stage2_weights(2, tmp_path, base, cfg)
    for key, value in one.items():
        assert torch.allclose(value, two[key], atol=1e-5, rtol=1e-4), key
    from ddps.refiner.build import build_denoiser, build_process
    process = build_process(cfg, 11)
    torch.manual_seed(cfg.train.seed + 1)  # the initial weights fit_stage starts from
    initial = build_denoiser(cfg, 11, cfg.base.feature_channels, process).state_dict()
    changed = sum(not torch.equal(initial[k], one[k]) for k in one if one[k].dtype.is_floating_point)
    assert changed > 10  # the weights did move


def test_demo_builds_the_data_runs_the_pipeline_and_prints_its_table(tmp_path):
    """`make demo`'s command on the smoke preset, as a user runs it (its own process and in-process Ray): data,
    the 2-worker pipeline, the base / step 1 / last table — and a console a person can read: one progress line
    per training, none of Ray's worker prefixes, tracebacks or start-up chatter, the rest in the log file."""
    import subprocess
    import sys
    env = {**os.environ, "DDPS_HOME": str(tmp_path / "home")}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("MLFLOW_LOGGING_LEVEL", None)
    done = subprocess.run([sys.executable, "-m", "ddps", "demo", "--preset", "smoke", "--cpus-per-worker", "0.5"],
                          env=env, capture_output=True, text=True, timeout=900)
    out = done.stdout
    assert done.returncode == 0, done.stderr[-3000:]
    assert "== 1/2 build fashion-scenes" in out and "Ray Train with 2 workers" in out
    for noise in ("RayTrainWorker", "TrainController", "PlacementGroupCleaner", "Traceback", "Grad strides",
                  "core_worker.cc", "INFO mlflow", "Started a local Ray instance"):
        assert noise not in out + done.stderr, noise
    for step, iters in (("base", 20), ("stage1", 6), ("stage2", 6)):
        assert re.search(rf"^\[{step}\] it {iters}/{iters} \| loss [0-9.]+ \| [0-9]+ img/s .*\| ETA 0s$", out, re.M), step
    log = next((tmp_path / "home" / "logs").glob("ddps-fashion-scenes-*.log")).read_text()
    assert f"log: {tmp_path / 'home' / 'logs'}" in out and "[stage2] it 6/6  loss " in log  # every record, in full
    rows = [line for line in out.splitlines() if line.startswith("| ")]
    assert [r.split("|")[1].strip() for r in rows[1:]] == ["base (segformer-mit_b0)", "DDPS step 1", "DDPS step 5 (last)"]
    report = tmp_path / "home" / "reports" / "ddps-fashion-scenes"  # written from MLflow, as `ddps report` does
    assert f"report: {report}/ddps-fashion-scenes.md" in out
    table, figures = (report / "ddps-fashion-scenes.md").read_text().split("\n## Figures")
    assert table.split("\n", 4)[-1].rstrip() in out and "![" not in out  # the table, not its figure links
    assert "-classes.png)" in figures
    assert {p.name for p in (report / "figures").glob("*-classes.png")}  # per-class IoU change of the demo's model
    assert f"sqlite:///{tmp_path / 'home'}/mlflow.db" in out


@pytest.mark.reliability(kind="bad_input", case="corrupt image found by a Ray Train worker")
def test_bad_data_in_a_ray_train_worker_is_the_one_line_error_not_rays_traceback(ray_local, tmp_path, capsys):
    """A corrupt training image is found by a Ray Train worker; the driver says what the worker said."""
    import numpy as np
    from PIL import Image

    from ddps.cli import main
    root = tmp_path / "data"
    for folder in ("images", "masks"):
        (root / folder).mkdir(parents=True)
    for i in range(8):
        Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(root / "images" / f"s{i}.png")
        Image.fromarray(np.full((40, 40), i % 3, np.uint8)).save(root / "masks" / f"s{i}.png")
    (root / "images" / "s5.png").write_bytes(b"not a png")
    (root / "classes.txt").write_text("bg\nshirt\nbag\n")
    workers_before = len(_train_workers())
    rc = main(["pipeline", "--preset", "smoke", "--set", "data.dataset=folder", "--set", f"data.root={root}",
               "--max-failures", "2", "--cpus-per-worker", "0.5", "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("ddps: error: cannot read image ") and "s5.png" in err[-1], err[-3:]
    # a ddps error is no transient fault: one worker group of 2 was started, not 3 (--max-failures 2 restarts)
    assert len(_train_workers()) - workers_before == 2


def _train_workers() -> list:
    """Every Ray Train worker actor this cluster has started (Ray's state API keeps dead ones)."""
    import ray
    from ray.util.state import list_actors
    return list_actors(address=ray.get_runtime_context().gcs_address, filters=[("class_name", "=", "RayTrainWorker")],
                       limit=10_000, raise_on_missing_output=False)
