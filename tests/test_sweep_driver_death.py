"""Fault injection with real processes: the sweep's driver dies mid-sweep (issue 7, item 2).

`ddps sweep` runs as its own process group (its in-process Ray goes with it); once MLflow holds its first
finished evaluation, the whole group is SIGKILLed. The same command run again marks what the dead driver
left RUNNING as KILLED, finishes only the missing cells, and leaves no duplicate cell or training.
"""
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
GRID = {
    "name": "driver-death", "title": "Driver death: learning rate x test steps",
    "axes": [{"name": "lr", "key": "train.lr", "values": [0.001, 0.002]},
             {"name": "test_steps", "key": "infer.steps", "values": [2, 3, 4, 5]}],
    "rows": ["lr"], "columns": ["test_steps"],
    "presets": {"smoke": {"train": {"stages": "multi-step"}, "data": {"val_scenes": 8}}},
}


def _finished_evaluations(runs) -> set[str]:
    return {r.info.run_id for r in runs if r.data.tags.get("ddps.step") == "eval" and r.info.status == "FINISHED"}


def _runs(db: Path):
    """Through Tracker, so this poller never migrates the new store while the driver does (its lock)."""
    from ddps.orchestration.tracking import Tracker
    client = Tracker(f"sqlite:///{db}").client
    found = client.get_experiment_by_name("driver-death")
    return client.search_runs([found.experiment_id], max_results=1000) if found else []


@pytest.mark.reliability(kind="fault", case="sweep driver SIGKILLed mid-sweep")
def test_a_killed_sweep_driver_is_resumed_by_the_same_command_without_duplicates(tmp_path):
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(GRID))
    db = tmp_path / "mlflow.db"
    env = {**os.environ, "DDPS_HOME": str(tmp_path / "home"), "RAY_AUTH_MODE": "disabled",
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    command = [sys.executable, "-m", "ddps", "sweep", str(path), "--preset", "smoke", "--workers", "2",
               "--cpus-per-worker", "0.5", "--tracking-uri", f"sqlite:///{db}"]
    first = subprocess.Popen(command, stdout=(tmp_path / "first.log").open("w"), stderr=subprocess.STDOUT, env=env,
                             cwd=REPO, start_new_session=True)
    deadline = time.monotonic() + 900
    try:
        while time.monotonic() < deadline and first.poll() is None:
            if _finished_evaluations(_runs(db)):
                break
            time.sleep(1)
        assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        os.killpg(first.pid, signal.SIGKILL)  # the driver and everything it started
        first.wait(30)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    assert "INFO mlflow" not in (tmp_path / "first.log").read_text()  # it created the store, quietly
    before = _runs(db)
    assert any(r.info.status == "RUNNING" for r in before)  # what the dead driver left behind
    finished_before = {r.info.run_id for r in before if r.info.status == "FINISHED"}
    evaluated_before = _finished_evaluations(before)
    # a half-done sweep: some cells were evaluated before the kill (not a kill during the trainings, within
    # the deadline), and not all of them
    assert 0 < len(evaluated_before) < 8, (len(evaluated_before), (tmp_path / "first.log").read_text()[-3000:])

    second = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env, cwd=REPO)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-2000:]
    runs = _runs(db)
    assert not [r for r in runs if r.info.status == "RUNNING"]
    assert {r.info.status for r in runs} <= {"FINISHED", "KILLED"}
    finished = [r for r in runs if r.info.status == "FINISHED"]
    cells = Counter(r.data.tags["ddps.cell"] for r in finished if r.data.tags["ddps.step"] == "eval")
    assert len(cells) == 8 and set(cells.values()) == {1}  # every cell once
    trainings = Counter(r.data.tags["ddps.content_hash"] for r in finished
                        if r.data.tags["ddps.step"] in ("base", "multistep"))
    assert len(trainings) == 3 and set(trainings.values()) == {1}  # every model trained and logged once
    assert finished_before <= {r.info.run_id for r in finished}  # finished work was kept, not redone
    assert evaluated_before < _finished_evaluations(runs)  # the rerun evaluated the missing cells (once each: above)
    assert "marked" in second.stdout and "as KILLED" in second.stdout
