"""Processes that open one new SQLite store at the same instant (a sweep and `ddps ui`, two sweeps started
together, a driver and the poller of a test): MLflow migrates a fresh file in several steps, so without
ddps's lock one of them dies with "table ... already exists". Each process here waits for the same instant,
then opens the store through Tracker and creates its own experiment; all must succeed."""
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
OPEN = """
import sys, time
from ddps.orchestration.tracking import Tracker
start = float(sys.argv[2])
while time.time() < start:
    time.sleep(0.001)
Tracker(sys.argv[1]).experiment(sys.argv[3])
"""


@pytest.mark.reliability(kind="fault", case="four processes create one new SQLite store at once")
def test_processes_opening_a_new_sqlite_store_at_once_all_succeed(tmp_path):
    uri = f"sqlite:///{tmp_path / 'new' / 'mlflow.db'}"  # its folder does not exist yet either
    start = time.time() + 6  # after every interpreter has imported mlflow
    procs = [subprocess.Popen([sys.executable, "-c", OPEN, uri, str(start), f"e{i}"], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(4)]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, "\n".join(o[-1500:] for o in outputs)
    from ddps.orchestration.tracking import Tracker
    assert {"e0", "e1", "e2", "e3"} <= set(Tracker(uri).experiment_names())
