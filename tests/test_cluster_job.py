"""Real processes: a local Ray cluster (`ray start --head` on 127.0.0.1) runs the smoke pipeline submitted with
`ray job submit`, and a real `mlflow server` (SQLite, one worker, 127.0.0.1) receives its runs over HTTP.

Each process is started on free ports in its own session and stopped by its process group (never by name).
Slow: marked ``slow``.
"""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from procs import free_port, free_ports, mlflow_server_command, serving_mlflow, start, stop, wait_http, wait_ray_nodes

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def base_env(tmp_path: Path) -> dict:
    return {**os.environ, "DDPS_HOME": str(tmp_path / "home"), "RAY_AUTH_MODE": "disabled",
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",  # SIGTERM: stop at once, not after a 30 s drain
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "PATH": f"{BIN}:{os.environ.get('PATH', '')}"}


@pytest.fixture
def mlflow_server(tmp_path):
    with serving_mlflow(mlflow_server_command(tmp_path, free_port()), tmp_path / "mlflow-server.log",
                       base_env(tmp_path)) as url:
        yield url


@pytest.fixture
def ray_head(tmp_path):
    """`ray start --head --block`: the blocking process owns the cluster's processes; stopping its group
    stops them all."""
    gcs, dashboard, client, agent, agent_grpc, runtime_env, metrics = free_ports(7)
    log = tmp_path / "ray-head.log"
    command = [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
               "--port", str(gcs), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
               "--ray-client-server-port", str(client), "--num-cpus", "2",
               # the job agent's ports too: another Ray on this machine holds the defaults (52365, ...)
               "--dashboard-agent-listen-port", str(agent), "--dashboard-agent-grpc-port", str(agent_grpc),
               "--runtime-env-agent-port", str(runtime_env), "--metrics-export-port", str(metrics),
               "--object-store-memory", str(200 * 2**20), "--disable-usage-stats"]
    proc = start(command, log, base_env(tmp_path))
    try:
        url = f"http://127.0.0.1:{dashboard}"
        wait_http(f"{url}/api/version", proc, log)
        wait_ray_nodes(url, 1, proc, log)  # the head's raylet registered (its dashboard answers before)
        yield url
    finally:
        stop(proc)


def test_ray_job_submit_runs_the_smoke_pipeline_into_a_real_mlflow_server(ray_head, mlflow_server, tmp_path):
    from mlflow.tracking import MlflowClient
    env = base_env(tmp_path)
    job_env = {k: env[k] for k in ("DDPS_HOME", "NO_ALBUMENTATIONS_UPDATE", "MLFLOW_DISABLE_TELEMETRY",
                                   "RAY_TRAIN_ENABLE_PRINT_PATCH") if k in env}
    submit = [str(BIN / "ray"), "job", "submit", "--address", ray_head, "--working-dir", str(REPO),
              "--runtime-env-json", json.dumps({"env_vars": job_env}), "--",
              sys.executable, "-m", "ddps", "pipeline", "--preset", "smoke", "--workers", "2",
              "--cpus-per-worker", "0.5", "--tracking-uri", mlflow_server, "--mlflow-experiment", "job-test"]
    deadline = time.monotonic() + 180
    while True:  # the head's job agent registers some seconds after the dashboard answers (longer on a busy machine)
        out = subprocess.run(submit, capture_output=True, text=True, timeout=1200, env=env, cwd=REPO)
        if "No available agent to submit job" not in out.stderr + out.stdout or time.monotonic() > deadline:
            break
        time.sleep(3)
    log = out.stdout[-4000:] + out.stderr[-2000:]
    assert out.returncode == 0 and "succeeded" in out.stdout, log
    assert "| base (segformer-mit_b0) |" in out.stdout and "| DDPS step 1 |" in out.stdout, log  # the job's table

    client = MlflowClient(mlflow_server)  # over HTTP, as the UI sees it
    exp = client.get_experiment_by_name("job-test")
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    parent = next(r for name, r in runs.items() if name.startswith("pipeline-"))
    assert parent.info.status == "FINISHED"
    for step in ("base", "stage1", "stage2", "eval"):
        assert runs[step].data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert runs[step].info.status == "FINISHED"
    history = client.get_metric_history(runs["eval"].info.run_id, "mIoU")
    assert sorted(m.step for m in history) == list(range(6))  # the base (step 0) and 5 refinement steps
    assert len(client.get_metric_history(runs["stage2"].info.run_id, "loss")) >= 2
    artifacts = {a.path for a in client.list_artifacts(runs["eval"].info.run_id)}
    assert {"config.yaml", "strips", "probabilities.npz", "model"} <= artifacts
