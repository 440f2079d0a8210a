"""An unwritable or full output folder is a one-line error, and no partial checkpoint ever becomes the
latest one. (The tests run as root, for whom permission bits do not bind: a full disk is a file-size limit
in a subprocess, an unwritable folder a path under a regular file.)"""
import os
import subprocess
import sys

import pytest
import torch

from ddps.checkpoint_io import read_state_file, save_atomic
from ddps.errors import CheckpointError

FULL_DISK = """
import resource, signal, sys
from pathlib import Path
import torch
from ddps.engine.loop import FolderCheckpointer
from ddps.errors import CheckpointError
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # past the limit, write() fails with EFBIG instead of a kill
states = FolderCheckpointer(Path(sys.argv[1]), every=1, keep=2, log=print)
states.save({"iter": 1, "w": torch.zeros(10)}, 1)
resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))  # the disk is 'full' past 200 kB
try:
    states.save({"iter": 2, "w": torch.zeros(1_000_000)}, 2)
except CheckpointError as e:
    print("ERROR", e)
print("LATEST", states.latest()["iter"])
"""


@pytest.mark.reliability(kind="fault", case="disk full while saving a training state")
def test_a_full_disk_is_one_line_and_the_previous_state_stays_the_latest(tmp_path):
    out = subprocess.run([sys.executable, "-c", FULL_DISK, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines == [f"ERROR cannot write {tmp_path}/state-00000002.pt: File too large", "LATEST 1"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state-00000001.pt", "state-00000001.pt.sha256"]  # no temp


@pytest.mark.reliability(kind="fault", case="output folder that cannot be created")
def test_an_output_path_under_a_file_is_one_line(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match=r"cannot write .*file/sub/b\.pt: Not a directory") as e:
        save_atomic(tmp_path / "file" / "sub" / "b.pt", {"w": torch.zeros(3)})
    assert "\n" not in str(e.value)


@pytest.mark.reliability(kind="fault", case="DDPS_HOME that cannot be a folder")
def test_ddps_home_that_cannot_be_a_folder_stops_before_any_work(tmp_path):
    (tmp_path / "home").write_text("not a folder")
    env = {**os.environ, "DDPS_HOME": str(tmp_path / "home")}
    out = subprocess.run([sys.executable, "-m", "ddps", "train-base", "--preset", "smoke"], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [f"ddps: error: DDPS_HOME {tmp_path / 'home'} cannot be created (File "
                                               f"exists); set DDPS_HOME to a writable folder"]


@pytest.mark.reliability(kind="fault", case="final checkpoint truncated or altered")
def test_a_truncated_or_altered_final_checkpoint_fails_its_checksum(tmp_path):
    path = save_atomic(tmp_path / "b.pt", {"kind": "x", "w": torch.arange(1000.0)}, checksum=True)
    assert read_state_file(path, "checkpoint")["w"][999] == 999
    data = path.read_bytes()
    for damaged in (data[: len(data) // 2], data[:-9] + b"123456789"):
        path.write_bytes(damaged)
        with pytest.raises(CheckpointError, match=r"checkpoint .*b\.pt fails its sha256 checksum \(b\.pt\.sha256\): "
                                                  r"truncated or altered; restore it, or delete it to train it again"):
            read_state_file(path, "checkpoint")
