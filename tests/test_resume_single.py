"""Single-process resume (``ddps train-base`` / ``ddps train`` outside Ray): a training interrupted for real —
Ctrl-C (SIGINT) to the command in a subprocess, or KeyboardInterrupt in the loop — and the same command run
again continues from its last training state: the refiner to weights and EMA equal to an uninterrupted run's,
the base at the saved iteration and data position (and, with train_base.num_workers = 0, to equal weights).
--force starts over; a damaged last state falls back to the one before; states live in the storage.
"""
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ddps.checkpoint_io import read_checked
from ddps.config import resolve
from ddps.data import build_dataset
from ddps.engine import train_base, train_refiner
from ddps.engine.loop import FolderCheckpointer, GlobalOrder, single_process_states, state_folder
from ddps.engine.reporter import NullReporter
from ddps.segmentors.checkpoint import read_checkpoint
from ddps.storage import STORAGE_VAR, StoragePath

ROOT = Path(__file__).resolve().parents[1]
EVERY = 2


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tensors this small gain nothing from threads, and on a busy host the threads' waiting dominates; the
    commands run in subprocesses get train.threads=1 / train_base.threads=1 (not hashed) for the same reason."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Recorder(NullReporter):
    """Records what the loop logs and says; raises KeyboardInterrupt (Ctrl-C) when it logs iteration ``stop``."""

    def __init__(self, stop: int | None = None):
        super().__init__()
        self.stop, self.messages = stop, []

    def info(self, message: str) -> None:
        self.messages.append(message)

    def log(self, metrics: dict, step: int) -> None:
        super().log(metrics, step)
        if step == self.stop:
            raise KeyboardInterrupt

    def steps(self) -> list[int]:
        return [step for step, metrics in self.history if "loss" in metrics]


def logged_steps(output: str, name: str) -> list[int]:
    """The iterations a ConsoleReporter printed (the last one twice: its loss, then its evaluation)."""
    return list(dict.fromkeys(int(s) for s in re.findall(rf"^\[{name}\] it (\d+)/", output, re.M)))


def same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key, value in a.items():
        assert torch.equal(value, b[key]), key


def state_iters(folder: Path) -> list[int]:
    return [int(p.name[6:14]) for p in FolderCheckpointer(folder).files()]


def interrupt_once_saved(command: list[str], states: Path, log: Path) -> int:
    """Run ``command``, press Ctrl-C (SIGINT) once it has saved a training state (its checksum sidecar, renamed
    last, is there); the iteration of the latest sound state it left."""
    with log.open("w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH":
                                str(ROOT)}, cwd=ROOT)
        deadline = time.monotonic() + 300
        while not list(states.glob("state-*.pt.sha256")) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert proc.poll() is None, (  # the runs below are long enough after their first state for a loaded machine
            f"the run ended (exit {proc.returncode}) before a state in {states} was seen\n" + log.read_text()[-3000:])
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 130, log.read_text()[-3000:]
    assert "ddps: interrupted; rerun the same command to resume from its last training state" in log.read_text()
    return FolderCheckpointer(states, log=lambda m: None).latest()["iter"]


def rerun(command: list[str]) -> str:
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
                          cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


# ---- the refiner ---------------------------------------------------------------------------------------

# stage 2 runs on for ~2 s after its first state (~50 ms an iteration): room for the test's polling to see that
# state and press Ctrl-C even on a loaded machine (with 8 iterations, once, the run ended first)
REFINER = {"train.stage1_iters": 4, "train.stage2_iters": 40, "train.eval_every": 100, "train.log_every": 1,
           "train.threads": 1}
STAGE1 = {**REFINER, "train.stage2_iters": 1}  # the same stage 1 (its hash leaves stage2_iters out), a short stage 2


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A base trained for 2 iterations: the refiner only needs one to condition on."""
    path = tmp_path_factory.mktemp("base") / "base.pt"
    cfg = resolve("smoke", overrides={"train_base.iters": 2, "train_base.warmup_iters": 1, "train_base.eval_every": 100})
    return train_base.fit(cfg, NullReporter(), checkpoint=path)


@pytest.fixture(scope="module")
def straight(base, tmp_path_factory) -> dict:
    """Both refiner stages straight through, no training states: what every interrupted run must end equal to
    ({stage: its checkpoint's payload})."""
    out = tmp_path_factory.mktemp("straight")
    cfg = resolve("smoke", overrides=REFINER)
    train_refiner.fit(cfg, base, lambda s, i: NullReporter(), out_dir=out, log=lambda m: None)
    return {stage: read_checkpoint(train_refiner.stage_checkpoint(cfg, stage, read_checkpoint(base)["hash"], out))
            for stage in ("stage1", "stage2")}


def refiner_states(cfg, stage: str, base_path: Path) -> Path:
    return state_folder(train_refiner.stage_checkpoint(cfg, stage, read_checkpoint(base_path)["hash"]).stem)


def fit_refiner(cfg, base, out, stop=None, every=EVERY, **kw) -> tuple[dict, dict]:
    """train_refiner.fit with a Recorder per stage (the one of ``stop=(stage, iteration)`` presses Ctrl-C):
    (stage 1's payload, the reporters)."""
    reporters = {}

    def factory(stage, iters):
        reporters[stage] = Recorder(stop[1] if stop and stop[0] == stage else None)
        return reporters[stage]
    train_refiner.fit(cfg, base, factory, out_dir=out, log=lambda m: None, checkpoint_every=every, **kw)
    return read_checkpoint(train_refiner.stage_checkpoint(cfg, "stage1", read_checkpoint(base)["hash"], out)), \
        reporters


def test_train_cli_ctrl_c_then_the_same_command_resumes_to_the_weights_of_an_uninterrupted_run(
        base, straight, tmp_path):
    """The user's path: `ddps train` in a process of its own, SIGINT once stage 2 has saved a state, the same
    command again: stage 1 reused, stage 2 resumed from the saved iteration, model and EMA equal to a straight run."""
    cfg = resolve("smoke", overrides=REFINER)
    states = refiner_states(cfg, "stage2", base)
    command = [sys.executable, "-m", "ddps", "train", "--preset", "smoke", "--base", str(base), "--out",
               str(tmp_path / "out"), "--checkpoint-every", str(EVERY),
               *[a for k, v in REFINER.items() for a in ("--set", f"{k}={v}")]]
    resume_at = interrupt_once_saved(command, states, tmp_path / "first.log")
    assert 0 < resume_at < REFINER["train.stage2_iters"]

    again = rerun(command)
    assert "[stage1] reusing" in again
    assert f"[stage2] resuming from iteration {resume_at} (state {states}/state-{resume_at:08d}.pt)" in again
    assert logged_steps(again, "stage2") == list(range(resume_at + 1, REFINER["train.stage2_iters"] + 1))
    assert not states.exists()  # finished: no state left

    resumed = read_checkpoint(train_refiner.stage_checkpoint(cfg, "stage2", read_checkpoint(base)["hash"],
                                                             tmp_path / "out"))
    same_tensors(straight["stage2"]["model"], resumed["model"])
    same_tensors(straight["stage2"]["ema"], resumed["ema"])
    assert straight["stage2"]["history"] == resumed["history"]


def test_a_damaged_last_state_falls_back_to_the_one_before_with_a_message(base, straight, tmp_path):
    cfg = resolve("smoke", overrides=STAGE1)
    states = refiner_states(cfg, "stage1", base)
    FolderCheckpointer(states).clear()  # what a failed earlier run of this test may have left
    with pytest.raises(KeyboardInterrupt):
        fit_refiner(cfg, base, tmp_path, stop=("stage1", 3), every=1)  # Ctrl-C at iteration 3 of stage 1
    assert state_iters(states) == [1, 2]  # the last two kept
    last = states / "state-00000002.pt"
    last.write_bytes(last.read_bytes()[:1000])  # truncated
    payload, reporters = fit_refiner(cfg, base, tmp_path, every=1)
    said = reporters["stage1"].messages
    assert any(f"{last} is damaged" in m and "using the one before it" in m for m in said), said
    assert f"resuming from iteration 1 (state {states / 'state-00000001.pt'})" in said
    assert reporters["stage1"].steps() == [2, 3, 4]
    assert reporters["stage2"].steps() == [1]  # stage 2 then trains from its start
    same_tensors(straight["stage1"]["model"], payload["model"])
    same_tensors(straight["stage1"]["ema"], payload["ema"])
    assert not states.exists()


def test_force_starts_over_from_iteration_0_and_clears_the_states(base, straight, tmp_path):
    cfg = resolve("smoke", overrides=STAGE1)
    states = refiner_states(cfg, "stage1", base)
    FolderCheckpointer(states).clear()
    with pytest.raises(KeyboardInterrupt):
        fit_refiner(cfg, base, tmp_path, stop=("stage1", 3))
    assert state_iters(states) == [2]
    payload, reporters = fit_refiner(cfg, base, tmp_path, force=True)
    assert not any("resuming" in m for m in reporters["stage1"].messages)
    assert reporters["stage1"].steps() == [1, 2, 3, 4]
    assert not states.exists()
    same_tensors(straight["stage1"]["model"], payload["model"])


def test_the_image_path_resumes_its_augmentation_where_it_was(base, tmp_path):
    """train.feature_cache=false: batches are augmented images through the frozen base; the state holds where
    the augmentation's random streams were (in-process loading), so the resumed stage's weights are equal too."""
    cfg = resolve("smoke", overrides={**STAGE1, "train.feature_cache": False})
    states = refiner_states(cfg, "stage1", base)
    FolderCheckpointer(states).clear()
    straight, _ = fit_refiner(cfg, base, tmp_path / "straight", every=None)
    with pytest.raises(KeyboardInterrupt):
        fit_refiner(cfg, base, tmp_path / "run", stop=("stage1", 3))
    assert read_checked(states / "state-00000002.pt")["augment"] is not None
    resumed, reporters = fit_refiner(cfg, base, tmp_path / "run")
    assert reporters["stage1"].steps() == [3, 4]
    same_tensors(straight["model"], resumed["model"])
    same_tensors(straight["ema"], resumed["ema"])


# ---- the base --------------------------------------------------------------------------------------------

BASE = {"train_base.iters": 40, "train_base.eval_every": 100, "train_base.log_every": 1, "train_base.threads": 1}


def test_train_base_cli_ctrl_c_then_the_same_command_resumes_at_the_saved_iteration_and_data_position(tmp_path):
    cfg = resolve("smoke", overrides=BASE)
    states = state_folder(train_base.default_checkpoint(cfg).stem)
    out = tmp_path / "base.pt"
    command = [sys.executable, "-m", "ddps", "train-base", "--preset", "smoke", "--out", str(out),
               "--checkpoint-every", str(EVERY), *[a for k, v in BASE.items() for a in ("--set", f"{k}={v}")]]
    resume_at = interrupt_once_saved(command, states, tmp_path / "first.log")
    assert 0 < resume_at < BASE["train_base.iters"] and not out.exists()
    state = read_checked(states / f"state-{resume_at:08d}.pt")
    order = GlobalOrder(len(build_dataset(cfg.data, "train")), cfg.train_base.batch_size, cfg.train_base.seed)
    assert state["iter"] == resume_at and state["position"] == order.after(resume_at)  # epochs of 8 batches
    assert state["augment"] is not None  # num_workers 0: where the augmentation's streams were

    again = rerun(command)
    assert f"[train-base] resuming from iteration {resume_at} (state {states}/state-{resume_at:08d}.pt)" in again
    assert logged_steps(again, "train-base") == list(range(resume_at + 1, BASE["train_base.iters"] + 1))
    payload = read_checkpoint(out)
    assert payload["metrics"]["images_seen"] == BASE["train_base.iters"] * cfg.train_base.batch_size
    assert not states.exists()


def test_the_base_resumed_in_process_ends_with_the_weights_of_an_uninterrupted_run(tmp_path):
    """train_base.num_workers = 0: the state holds the augmentation's random streams and the global RNG, so
    the resumed base is bit-identical; with loader workers it resumes at the same iteration and data position
    but re-seeds the augmentation (README, 'Resuming')."""
    cfg = resolve("smoke", overrides={**BASE, "train_base.iters": 6, "train_base.seed": 1})
    states = state_folder(train_base.default_checkpoint(cfg).stem)
    straight = read_checkpoint(train_base.fit(cfg, NullReporter(), checkpoint=tmp_path / "straight.pt"))
    with pytest.raises(KeyboardInterrupt):
        train_base.fit(cfg, Recorder(stop=5), checkpoint=tmp_path / "b.pt", checkpoint_every=EVERY)
    assert state_iters(states) == [2, 4]
    reporter = Recorder()
    resumed = read_checkpoint(train_base.fit(cfg, reporter, checkpoint=tmp_path / "b.pt", checkpoint_every=EVERY))
    assert reporter.steps() == [5, 6]
    same_tensors(straight["model"], resumed["model"])
    assert straight["history"] == resumed["history"]
    assert not states.exists()


# ---- where the states live, and the command line ---------------------------------------------------------

def test_training_states_live_in_a_storage_bucket(s3_bucket, monkeypatch):
    endpoint, bucket = s3_bucket
    monkeypatch.setenv(STORAGE_VAR, f"s3://{bucket}/p?endpoint_override={endpoint}")
    said = []
    states = single_process_states("base-x-0123456789abcdef", 1, log=said.append)
    assert isinstance(states.folder, StoragePath) and str(states.folder).startswith(f"s3://{bucket}/p/states/base-x-")
    assert states.latest() is None  # nothing there yet
    for step in (1, 2, 3):
        states.save({"iter": step, "w": torch.full((2,), float(step))}, step)
    assert [p.name for p in states.files()] == ["state-00000002.pt", "state-00000003.pt"]  # the last 2
    last = states.files()[-1]
    last.write_bytes(last.read_bytes()[:50])
    assert states.latest()["iter"] == 2 and states.source.name == "state-00000002.pt"
    assert "/state-00000003.pt?" in said[0] and "is damaged" in said[0]  # its full URI
    single_process_states("base-x-0123456789abcdef", 1, fresh=True)  # --force
    assert states.files() == [] and list(states.folder.iterdir()) == []


def test_checkpoint_every_is_a_training_option_of_train_and_train_base():
    from ddps.cli import build_parser
    parser = build_parser()
    assert parser.parse_args(["train-base"]).checkpoint_every == 500
    assert parser.parse_args(["train", "--checkpoint-every", "0"]).checkpoint_every == 0
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--checkpoint-every", "-1"])
