"""Fault injection with real processes: SIGKILL one Ray Train worker mid-stage (issue 7, item 1).

Ray Train notices the dead actor, tears the worker group down, starts a new one (``FailureConfig``), and the
new group resumes from the last reported training state. With deterministic CPU settings (gloo all-reduce of
two workers, every RNG and the data position in the state) the final weights equal an uninterrupted run's.
Each case runs twice: with Ray Train's state and the checkpoints in DDPS_HOME, and in an S3 bucket (moto's
server, --storage): the resume, and the damaged-checkpoint fallback, go through the URI.
"""
import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

from ddps.config import resolve, to_flat
from ddps.orchestration import ray_train
from ddps.orchestration.ray_train import Cluster
from ddps.checkpoint_io import read_state_file
from ddps.storage import STORAGE_VAR, folder

pytestmark = pytest.mark.slow

ITERS, EVERY = 24, 6


def _stage2(tmp_path, base, cfg, name, pid_dir=None):
    out = folder("checkpoints") / f"{name}-{tmp_path.name}.pt"  # in the storage when there is one
    config = {"cfg": to_flat(cfg), "out": str(out), "label": name, "iters": ITERS, "tracking_uri": None,
              "run_id": None, "pid_dir": str(pid_dir) if pid_dir else None, "stage": "stage2",
              "base": str(base), "init": None}
    ray_train.run("refiner", config, Cluster(workers=2, cpus_per_worker=0.5, checkpoint_every=EVERY, max_failures=2),
                  name=f"{name}-{tmp_path.name}")
    return read_state_file(out, "checkpoint")


def _registered_checkpoint(run_folder) -> dict | None:
    """The latest checkpoint Ray Train's controller has registered (its persisted snapshot), if any.

    A checkpoint folder exists before the controller has registered the report; a worker killed in between
    restarts from the previous registered checkpoint, so the test waits for the registration."""
    try:
        snapshot = json.loads((run_folder / "checkpoint_manager_snapshot.json").read_text())
    except (OSError, ValueError):
        return None
    return snapshot.get("latest_checkpoint_result")


def _kill_after_checkpoint(run_folder, pid_file: Path, killed: dict, stop: threading.Event, at: int,
                           damage: bool) -> None:
    """Once Ray Train has registered a checkpoint of this run at iteration >= ``at``, (with ``damage``, truncate
    that checkpoint's state so its checksum fails, then) SIGKILL the rank-1 worker by its PID."""
    while not stop.is_set():
        latest = _registered_checkpoint(run_folder)
        if latest and latest["metrics"]["iter"] >= at and pid_file.exists():
            if damage:
                state = run_folder / latest["checkpoint_dir_name"] / ray_train.STATE_FILE
                state.write_bytes(state.read_bytes()[:100])
            pid = int(pid_file.read_text())
            os.kill(pid, signal.SIGKILL)
            killed.update(pid=pid, iter=latest["metrics"]["iter"])
            return
        time.sleep(0.05)


CFG = {"train.stage2_iters": ITERS, "train.eval_every": 1000, "train.cond_dropout": 0.3, "train.ema_every": 5}


@pytest.fixture(scope="module")
def straight(ray_local, tmp_path_factory):
    """A base, and stage 2 on it straight through (in DDPS_HOME): what every interrupted run must end equal to."""
    from ddps.engine.reporter import NullReporter
    from ddps.engine.train_base import fit as fit_base
    tmp_path = tmp_path_factory.mktemp("straight")
    base = tmp_path / "base.pt"
    fit_base(resolve("smoke"), NullReporter(), checkpoint=base)
    return base, _stage2(tmp_path, base, resolve("smoke", overrides=CFG), "straight")


@pytest.fixture(params=["home", "s3"])
def storage(request, monkeypatch):
    """Where the run's state and checkpoints live: DDPS_HOME, or a bucket on moto's S3 server."""
    if request.param == "s3":
        endpoint, bucket = request.getfixturevalue("s3_bucket")
        monkeypatch.setenv(STORAGE_VAR, f"s3://{bucket}/ddps?endpoint_override={endpoint}")
    else:
        monkeypatch.delenv(STORAGE_VAR, raising=False)
    return request.param


def _straight_and_interrupted(tmp_path, straight, name: str, at: int, damage: bool):
    """The stage 2 run straight through, and the same with its rank-1 worker killed mid-stage."""
    base, straight = straight
    cfg = resolve("smoke", overrides=CFG)
    pid_dir = tmp_path / "pids"
    pid_dir.mkdir()
    killed, stop = {}, threading.Event()
    watcher = threading.Thread(target=_kill_after_checkpoint, daemon=True,
                               args=(folder("ray") / f"{name}-{tmp_path.name}", pid_dir / "rank1.pid", killed,
                                     stop, at, damage))
    watcher.start()
    try:
        interrupted = _stage2(tmp_path, base, cfg, name, pid_dir=pid_dir)
    finally:
        stop.set()
        watcher.join(5)
    assert killed and 0 < killed["iter"] < ITERS, "the worker was never killed mid-stage"
    resumed = {int((pid_dir / f"rank{r}.resumed").read_text()) for r in (0, 1)}
    return straight, interrupted, killed, resumed, int((pid_dir / "rank1.pid").read_text())


def _same_weights(a: dict, b: dict) -> None:
    for part in ("model", "ema"):
        for key, value in a[part].items():
            assert torch.equal(value, b[part][key]), (part, key)


@pytest.mark.reliability(kind="fault", case="Ray Train worker SIGKILLed mid-stage")
def test_a_sigkilled_worker_is_replaced_and_the_stage_ends_with_the_same_weights(straight, storage, tmp_path,
                                                                                  reliability):
    straight, interrupted, killed, resumed, replacement = _straight_and_interrupted(tmp_path, straight, "killed",
                                                                                    EVERY, False)
    assert replacement != killed["pid"]  # a new worker group took over: the kill landed mid-run
    with pytest.raises(ProcessLookupError):
        os.kill(killed["pid"], 0)
    # both ranks resumed mid-stage from the same checkpoint, not at 0: the one registered when the kill landed or,
    # when the ranks' next report was already on its way to the controller (a loaded machine), that one
    (resumed_at,) = resumed
    assert resumed_at in range(killed["iter"], ITERS, EVERY), (resumed_at, killed)
    _same_weights(straight, interrupted)
    reliability.update(killed_at=killed["iter"], resumed_at=resumed_at, weights="bit-identical")


@pytest.mark.reliability(kind="fault", case="last Ray checkpoint truncated, then a worker SIGKILLed")
def test_a_damaged_last_checkpoint_is_detected_and_the_one_before_it_is_used(straight, storage, tmp_path, capfd,
                                                                             reliability):
    straight, interrupted, killed, resumed, _ = _straight_and_interrupted(tmp_path, straight, "damaged", 2 * EVERY,
                                                                          True)
    assert resumed == {killed["iter"] - EVERY}  # the checkpoint before the damaged one
    assert "is damaged (checksum); resuming from" in capfd.readouterr().out  # the user is told
    _same_weights(straight, interrupted)
    reliability.update(killed_at=killed["iter"], resumed_at=min(resumed), weights="bit-identical")
