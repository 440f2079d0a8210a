"""The tracking server goes down for 65 s in the middle of a real training (the engine's loop, reporting to a
real `mlflow server` through MLflowReporter): training goes on, its metrics are spooled, and when the server
is back every metric value logged is in MLflow — counted, none lost. Slow: ~2 minutes."""
import os
import threading
import time

import pytest

from ddps.config import resolve
from ddps.engine import train_base
from ddps.orchestration.tracking import MLflowReporter, Tracker
from procs import free_port, mlflow_server_command, start, stop, wait_http

pytestmark = pytest.mark.slow
OUTAGE_S = 65


class Stop(Exception):
    """Ends the (long) training once the test has seen what it needs."""


class Counting:
    """The reporter's echo: counts every metric value the training logs (what MLflow must end up holding)."""

    def __init__(self):
        self.values, self.keys, self.stop = 0, set(), threading.Event()

    def log(self, metrics: dict, step: int) -> None:
        if self.stop.is_set():
            raise Stop
        self.values += sum(1 for v in metrics.values() if v == v)
        self.keys.update(metrics)

    def info(self, message: str) -> None:
        print(message)


@pytest.mark.reliability(kind="fault", case="MLflow server down 65 s mid-training")
def test_a_server_down_for_65_s_mid_training_loses_no_metric(tmp_path, monkeypatch, reliability):
    port, log = free_port(), tmp_path / "server.log"
    command = mlflow_server_command(tmp_path, port)
    uri = f"http://127.0.0.1:{port}"
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    server = start(command, log, env)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # as a Ray Train worker sets them
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    try:
        wait_http(f"{uri}/health", server, log)
        tracker = Tracker(uri)
        run_id = tracker.start_run(tracker.experiment("outage"), "train-base")
        echo = Counting()
        reporter = MLflowReporter(Tracker(uri, check=False), run_id, every_s=1.0, retry_s=5.0, echo=echo)
        cfg = resolve("smoke", overrides={"train_base.iters": 100000, "train_base.log_every": 5,
                                          "train_base.eval_every": 200})
        failure = []

        def training():
            try:
                train_base.train(cfg, reporter, path=tmp_path / "base.pt")
            except Stop:
                pass
            except BaseException as e:  # noqa: BLE001 - reported by the test below
                failure.append(e)

        thread = threading.Thread(target=training, daemon=True)
        thread.start()
        deadline = time.monotonic() + 300
        while not tracker.history(run_id, "loss"):  # the first metrics reached the server
            assert thread.is_alive() and time.monotonic() < deadline, failure
            time.sleep(1)
        stop(server)
        before = echo.values
        time.sleep(OUTAGE_S)
        during = echo.values - before
        assert thread.is_alive(), failure  # the training went on while the server was down ...
        assert during > 0 and reporter.down_since is not None and reporter.spool.exists()  # ... and spooled
        server = start(command, log, env)
        wait_http(f"{uri}/health", server, log)
        deadline = time.monotonic() + 120
        while reporter.down_since is not None:  # the next retry replays the spool
            assert thread.is_alive() and time.monotonic() < deadline, failure
            time.sleep(1)
        echo.stop.set()
        thread.join(60)
        assert not thread.is_alive() and not failure, failure
        assert reporter.flush()  # what the worker sends at its end
        stored = sum(len(tracker.history(run_id, key)) for key in echo.keys)
        print(f"outage {OUTAGE_S} s: {echo.values} metric values logged, {during} while the server was down, "
              f"{stored} in MLflow, {echo.values - stored} lost")
        reliability.update(outage_s=OUTAGE_S, metrics_logged=echo.values, logged_while_down=during,
                           metrics_delivered=stored, metrics_lost=echo.values - stored)
        assert stored == echo.values and not reporter.spool.exists()
    finally:
        stop(server)
