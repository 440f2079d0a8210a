"""Security: the local MLflow UI and Ray listen on loopback only, names cannot escape their folder, a
checkpoint cannot run code when it is read. (Ray's own loopback test: tests/test_pipeline.py.)"""
import os

import pytest
import torch

from ddps.config.load import resolve
from ddps.errors import CheckpointError, ConfigError
from messages import one_line
from procs import start_ui, stop
from sockets import descendants, is_loopback, listening


@pytest.mark.reliability(kind="security", case="MLflow UI listens on 127.0.0.1 only")
def test_the_mlflow_ui_listens_on_loopback_only(tmp_path):
    ui, port, _ = start_ui(tmp_path)
    try:
        ports = listening(descendants(ui.pid))
        assert any(p == port for _, _, p in ports)
        assert [p for p in ports if not is_loopback(p[1])] == []
    finally:
        stop(ui)


@pytest.mark.reliability(kind="security", case="names cannot escape their folder")
def test_names_that_would_escape_their_folder_are_refused(tmp_path):
    from ddps.orchestration.pipeline import Pipeline
    from ddps.orchestration.tracking import Tracker
    from ddps.report.write import write_report
    with pytest.raises(ConfigError, match=r"MLflow experiment '\.\./x' is not a safe name") as e:
        Pipeline(resolve("smoke"), tracking_uri=f"sqlite:///{tmp_path / 'm.db'}", experiment="../x")
    one_line(e.value)
    tracker = Tracker(f"sqlite:///{tmp_path / 'm.db'}")
    tracker.experiment("../../evil")  # a name some other client created on the server
    with pytest.raises(ConfigError, match="is not a safe name"):
        write_report(tracker, ["../../evil"], tmp_path / "out")
    assert not list(tmp_path.parent.glob("evil*")) and not (tmp_path / "out").exists()


@pytest.mark.reliability(kind="security", case="checkpoints load with weights_only (a pickle cannot run code)")
def test_a_checkpoint_carrying_code_is_refused_without_running_it(tmp_path):
    from ddps.segmentors.checkpoint import read_checkpoint
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"kind": "base_segmentor", "spec": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="evil.pt") as e:
        read_checkpoint(tmp_path / "evil.pt")
    one_line(e.value)
    assert not marker.exists()



