"""Two Ray nodes on one machine: the smoke pipeline, submitted with `ray job submit`, trains each step with one
Ray Train worker on each node, keeps every checkpoint in an S3 bucket (moto's server) and nothing on the nodes.

What it shows (issue 21, item 3):

- a cluster of two nodes — `ray start --head` and `ray start --address <head>` — each with its own Ray temp dir,
  its own DDPS_HOME, its own ports (every one from one ``free_ports`` call: no two alike) and one CPU, so the two
  workers of 1 CPU of each training cannot share a node. Ray's single-node guard
  (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0: the Makefile, ddps/orchestration/runtime.py, tests/conftest.py) is
  lifted (=1) in the environment of these `ray start` processes only: with it on, a second node is refused;
- the pipeline's job runs with ``--storage s3://<bucket>/two-nodes?endpoint_override=...``; Ray's state API
  (``list_actors``, which keeps dead actors) puts the two RayTrainWorker actors of each training on the two
  nodes; their node ids are printed;
- DDPS_HOME is not handed from the driver to the workers: the worker node's own DDPS_HOME gets the datasets its
  worker built there;
- no checkpoint outside the bucket after the run: no ``*.pt`` under either DDPS_HOME (but its features/ cache,
  which the storage design keeps on each node), either Ray temp dir or the job's working dir (unpacked in the
  temp dirs); the bucket holds the three checkpoints, Ray Train's run state and the MLflow server's copy of the
  refiner (its artifacts live in the bucket too);
- a rerun with both nodes' DDPS_HOME deleted reuses every step (``[base] reusing`` ... ``[eval] reusing``) and
  starts no Ray Train worker;
- the evaluation (mIoU and mBIoU per refinement step, the summary) equals that of the same pipeline run on one
  node (an in-process Ray, its own DDPS_HOME, its own MLflow store and storage prefix: reuse is found by
  content hash across experiments, so a shared store would only reuse).

Ray (2.60) on two nodes of one machine:

- not every port can stay on loopback. With the guard lifted, ``ray start`` turns ``--node-ip-address
  127.0.0.1`` and the ``--address 127.0.0.1:<port>`` of the head into the machine's routable address
  (``resolve_ip_for_localhost``: the interface of the route to 8.8.8.8; 127.0.0.1 only on a machine without
  one), the nodes register under it, the job's RAY_ADDRESS names it, and the GCS, raylets, object managers and
  agents' gRPC ports listen on all interfaces; the dashboard (``--dashboard-host``), the agents' HTTP ports and
  the client server stay on 127.0.0.1. The test keeps ``--node-ip-address 127.0.0.1`` and prints the address
  the nodes got;
- two temp dirs work (``--temp-dir`` is per node); under pytest's tmp_path Ray's socket paths would pass the
  108-character limit, hence a short folder in /tmp;
- each node's worker processes take ports of their own ``--worker-port-list`` (no node takes the other's, nor
  the default range 10002-19999 that another local Ray may use); a node starts about 20 over both jobs;
- SIGTERM makes a `ray start --block` drain for 30 s first (RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S): set to 0.

Slow: marked ``slow``. Every process is started in its own session and stopped by its process group.
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest

from procs import (S3_CREDENTIALS, free_ports, mlflow_server_command, s3_objects, serving_mlflow, start,
                   stop, wait_http, wait_ray_nodes)

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
STEPS = ("base", "stage1", "stage2")
WORKER_PORTS = 40  # worker processes a node may start at once: each takes one port of its own list


def node_env(home: Path) -> dict:
    """A `ray start` process's environment: its node's own DDPS_HOME, the bucket's credentials, the
    single-node guard lifted (a second node is refused otherwise)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "DDPS_STORAGE")}
    return {**env, **S3_CREDENTIALS, "DDPS_HOME": str(home), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1",
            "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "NO_ALBUMENTATIONS_UPDATE": "1",
            "MLFLOW_DISABLE_TELEMETRY": "true", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
            # SIGTERM stops a node at once: else the head waits 30 s for a drain that its own job agent holds up
            "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0", "PATH": f"{BIN}:{os.environ.get('PATH', '')}"}


def node_options(temp_dir: Path, ports: list[int]) -> list[str]:
    """What both `ray start` commands take: one CPU, loopback, their own temp dir and ports."""
    object_manager, node_manager, agent, agent_grpc, runtime_env, metrics, *workers = ports
    return ["--block", "--node-ip-address", "127.0.0.1", "--num-cpus", "1", "--temp-dir", str(temp_dir),
            "--object-manager-port", str(object_manager), "--node-manager-port", str(node_manager),
            "--dashboard-agent-listen-port", str(agent), "--dashboard-agent-grpc-port", str(agent_grpc),
            "--runtime-env-agent-port", str(runtime_env), "--metrics-export-port", str(metrics),
            "--worker-port-list", ",".join(map(str, workers)),
            "--object-store-memory", str(100 * 2**20), "--disable-usage-stats"]


@pytest.fixture
def two_nodes(tmp_path):
    """`ray start --head` and a second `ray start --address`, each with its own DDPS_HOME and temp dir; the
    nodes' ids. A short temp dir root (Ray's socket paths under it must stay below 108 characters)."""
    temp = Path(tempfile.mkdtemp(prefix="ddps-2n-", dir="/tmp"))
    homes = {"head": tmp_path / "home-head", "node": tmp_path / "home-node"}
    temps = {"head": temp / "head", "node": temp / "node"}
    gcs, dashboard_port, client, *rest = free_ports(3 + 2 * (6 + WORKER_PORTS))
    per_node = {"head": rest[:6 + WORKER_PORTS], "node": rest[6 + WORKER_PORTS:]}
    dashboard = f"http://127.0.0.1:{dashboard_port}"
    head = [str(BIN / "ray"), "start", "--head", "--port", str(gcs), "--dashboard-host", "127.0.0.1",
            "--dashboard-port", str(dashboard_port), "--ray-client-server-port", str(client),
            *node_options(temps["head"], per_node["head"])]
    node = [str(BIN / "ray"), "start", "--address", f"127.0.0.1:{gcs}",
            *node_options(temps["node"], per_node["node"])]
    logs = {name: tmp_path / f"ray-{name}.log" for name in homes}
    procs = []
    try:
        procs.append(start(head, logs["head"], node_env(homes["head"])))
        wait_http(f"{dashboard}/api/version", procs[0], logs["head"])
        procs.append(start(node, logs["node"], node_env(homes["node"])))
        nodes = wait_ray_nodes(dashboard, 2, procs[1], logs["node"])
        ids = {"head" if n.is_head_node else "node": n.node_id for n in nodes}
        ips = {"head" if n.is_head_node else "node": n.node_ip for n in nodes}
        yield SimpleNamespace(dashboard=dashboard, homes=homes, temps=temps, ids=ids, ips=ips, logs=logs)
    finally:
        for proc in reversed(procs):  # the worker node first, then the head (its GCS)
            stop(proc)
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture
def mlflow_s3(s3_bucket, tmp_path):
    """A real `mlflow server` (SQLite, one worker, 127.0.0.1) whose artifacts live in the bucket, under mlflow/."""
    endpoint, bucket = s3_bucket
    port, = free_ports(1)
    store, log = tmp_path / "mlflow", tmp_path / "mlflow-server.log"
    store.mkdir()
    env = {**os.environ, **S3_CREDENTIALS, "MLFLOW_S3_ENDPOINT_URL": endpoint,
           "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "PATH": f"{BIN}:{os.environ.get('PATH', '')}"}
    with serving_mlflow(mlflow_server_command(store, port, f"s3://{bucket}/mlflow"), log, env) as url:
        yield url


def submit(cluster, argv: list[str]) -> str:
    """`ray job submit` of ``ddps <argv>`` with this checkout as its working dir; the job's output. The job's
    runtime env sets no DDPS_HOME: the driver and each worker see their node's own."""
    runtime_env = {"env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}}
    command = [str(BIN / "ray"), "job", "submit", "--address", cluster.dashboard, "--working-dir", str(REPO),
               "--runtime-env-json", json.dumps(runtime_env), "--", sys.executable, "-m", "ddps", *argv]
    env = node_env(cluster.homes["head"])
    deadline = time.monotonic() + 180
    while True:  # the head's job agent registers some seconds after the dashboard answers
        out = subprocess.run(command, capture_output=True, text=True, timeout=1200, env=env, cwd=REPO)
        if "No available agent to submit job" not in out.stderr + out.stdout or time.monotonic() > deadline:
            break
        time.sleep(3)
    log = out.stdout + out.stderr
    assert out.returncode == 0 and "succeeded" in out.stdout, log[-6000:]
    return log


def train_workers(dashboard: str) -> dict[str, list[str]]:
    """The node ids of the RayTrainWorker actors of each training (its placement group), dead ones included."""
    from ray.util.state import list_actors
    groups = defaultdict(list)
    for actor in list_actors(address=dashboard, filters=[("class_name", "=", "RayTrainWorker")], limit=1000,
                             detail=True, raise_on_missing_output=False):
        groups[actor.placement_group_id].append(actor.node_id)
    return dict(groups)


def evaluation(tracking_uri: str) -> dict:
    """The pipeline's evaluation in an MLflow store: mIoU and mBIoU per step, and its summary."""
    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracking_uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              "tags.`ddps.step` = 'eval'")
    assert len(runs) == 1, [r.info.run_id for r in runs]
    run = runs[0]
    per_step = {score: [(m.step, m.value) for m in sorted(client.get_metric_history(run.info.run_id, score),
                                                         key=lambda m: m.step)] for score in ("mIoU", "mBIoU")}
    return {**per_step, "summary": json.loads(run.data.tags["ddps.summary"])}


def checkpoints_in(*folders: Path) -> list[Path]:
    """Every *.pt under the folders but in a DDPS_HOME's features/ (each node's copy of a feature cache)."""
    return [p for folder in folders for p in folder.rglob("*.pt") if p.parent != folder / "features"]


@pytest.fixture
def one_node(s3_bucket, tmp_path):
    """The same pipeline on one node — an in-process Ray (the guard on), its own DDPS_HOME, MLflow store and
    storage prefix — started first, beside the two-node cluster and its job (the cores are shared, the waits
    overlap); calling it waits for the run and returns its evaluation."""
    endpoint, bucket = s3_bucket
    tracking, log = f"sqlite:///{tmp_path}/one-node-mlflow.db", tmp_path / "one-node.log"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "DDPS_STORAGE")}
    env.update({**S3_CREDENTIALS, "DDPS_HOME": str(tmp_path / "home-one"), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
                "RAY_AUTH_MODE": "disabled", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0", "PYTHONPATH": str(REPO)})
    command = [sys.executable, "-m", "ddps", "pipeline", "--preset", "smoke", "--workers", "2", "--cpus-per-worker",
               "1", "--storage", f"s3://{bucket}/one-node?endpoint_override={endpoint}", "--tracking-uri", tracking,
               "--mlflow-experiment", "one-node"]
    proc = start(command, log, env)

    def result() -> dict:
        proc.wait(1200)
        assert proc.returncode == 0, log.read_text()[-6000:]
        return evaluation(tracking)
    try:
        yield result
    finally:
        stop(proc)


def test_the_smoke_pipeline_on_two_nodes_keeps_its_checkpoints_in_the_bucket(one_node, two_nodes, mlflow_s3,
                                                                                s3_bucket):
    endpoint, bucket = s3_bucket
    storage = f"s3://{bucket}/two-nodes?endpoint_override={endpoint}"
    pipeline = ["pipeline", "--preset", "smoke", "--workers", "2", "--cpus-per-worker", "1", "--storage", storage,
                "--tracking-uri", mlflow_s3, "--mlflow-experiment", "two-nodes"]
    t0 = time.monotonic()
    log = submit(two_nodes, pipeline)
    print(f"two-node run: {time.monotonic() - t0:.0f} s")
    assert "| DDPS step 1 |" in log, log[-6000:]  # the job's table

    # each training's two workers on the two nodes (Ray's state API keeps dead actors)
    workers = train_workers(two_nodes.dashboard)
    print(f"nodes: head {two_nodes.ids['head']} ({two_nodes.ips['head']}), "
          f"second {two_nodes.ids['node']} ({two_nodes.ips['node']})")
    for group, nodes in workers.items():
        print(f"RayTrainWorker node ids (placement group {group}): {nodes}")
    assert len(workers) == len(STEPS), workers
    assert all(sorted(nodes) == sorted(two_nodes.ids.values()) for nodes in workers.values()), workers

    # DDPS_HOME stays the node's: the second node's worker built its own datasets there
    assert list((two_nodes.homes["node"] / "datasets").glob("fashion-scenes-*.npz")), \
        sorted(p.relative_to(two_nodes.homes["node"]) for p in two_nodes.homes["node"].rglob("*"))
    # no checkpoint outside the bucket; the bucket holds them, Ray Train's state and MLflow's model copy
    local = [*two_nodes.homes.values(), *two_nodes.temps.values()]
    assert checkpoints_in(*local) == []
    objects = s3_objects(endpoint, bucket)
    stored = [o.split("/")[-1] for o in objects if o.startswith("two-nodes/checkpoints/") and o.endswith(".pt")]
    assert len(stored) == len(STEPS) and all(any(f"{step}-" in name for name in stored) for step in STEPS), objects
    assert all(f"two-nodes/checkpoints/{name}.sha256" in objects for name in stored), objects
    assert any(o.startswith("two-nodes/ray/") for o in objects), objects
    assert any(o.startswith("mlflow/") and o.endswith(".pt") for o in objects), objects
    first = evaluation(mlflow_s3)
    print(f"two-node evaluation, (step, score) per step: mIoU {first['mIoU']}, mBIoU {first['mBIoU']}")

    # both homes deleted: the rerun reuses every step from the bucket and MLflow, and trains nothing
    for home in two_nodes.homes.values():
        shutil.rmtree(home, ignore_errors=True)
    t0 = time.monotonic()
    rerun = submit(two_nodes, pipeline)
    print(f"rerun: {time.monotonic() - t0:.0f} s")
    for step in (*STEPS, "eval"):
        assert f"[{step}] reusing" in rerun, rerun[-6000:]
    assert train_workers(two_nodes.dashboard) == workers
    assert checkpoints_in(*local) == []
    assert evaluation(mlflow_s3) == first

    # the same results as one node's
    t0 = time.monotonic()
    one = one_node()
    print(f"one-node run: waited {time.monotonic() - t0:.0f} s more")
    assert one == first
