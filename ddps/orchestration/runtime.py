"""Starting what the pipeline runs on: a Ray cluster to join or an in-process one, and the MLflow UI."""
from __future__ import annotations

import os
import subprocess
import sys

from ddps.paths import ddps_home

# what every Ray worker must see as the driver does (DESIGN.md): the work folder, offline albumentations,
# no telemetry, the tracking store
WORKER_ENV = ("DDPS_HOME", "NO_ALBUMENTATIONS_UPDATE", "MLFLOW_DISABLE_TELEMETRY", "RAY_USAGE_STATS_ENABLED",
              "MLFLOW_TRACKING_URI", "DDPS_FASHION_MNIST", "RAY_TRAIN_ENABLE_PRINT_PATCH")


def ensure_ray(cluster) -> None:
    """Join the cluster in RAY_ADDRESS (as under `ray job submit`), else start Ray in this process with
    enough logical CPUs for the workers (logical, not physical: DESIGN.md) and a bounded object store."""
    import ray
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    env = {k: os.environ[k] for k in WORKER_ENV if k in os.environ}
    env.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")  # else each progress line reaches the driver twice
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], runtime_env={"env_vars": env})
        return
    cpus = max(2, int(cluster.workers * cluster.cpus_per_worker + 0.999))
    # the dashboard serves the state API that Ray Train's placement-group cleaner polls; loopback only
    ray.init(address="local", num_cpus=cpus, include_dashboard=True, dashboard_host="127.0.0.1",
             object_store_memory=256 * 2**20, runtime_env={"env_vars": env})


def serve_ui(host: str = "127.0.0.1", port: int = 5000, tracking_uri: str | None = None) -> int:
    """`mlflow server` over the store (one worker, no job runner: ~0.5 GB), bound to ``host``."""
    from ddps.orchestration.tracking import resolve_tracking_uri
    uri = resolve_tracking_uri(tracking_uri)
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--host", host,
               "--port", str(port), "--workers", "1",
               "--artifacts-destination", str(ddps_home() / "mlartifacts")]
    print(f"MLflow UI on http://{host}:{port} over {uri} (Ctrl-C stops it)")
    try:
        return subprocess.call(command, env=env)
    except KeyboardInterrupt:
        return 0
