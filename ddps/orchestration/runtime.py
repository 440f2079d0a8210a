"""Starting what the pipeline runs on: a Ray cluster to join or an in-process one, and the MLflow UI."""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import subprocess
import sys

from ddps.paths import ddps_home

# what every Ray worker must see as the driver does (docs/design.md, "Environment"): the storage, offline
# albumentations, no telemetry, the tracking store. Not DDPS_HOME: it is each node's own cache (its datasets, Hub
# cache, spool); what another node must read lives in the storage (DDPS_STORAGE, ddps.storage)
WORKER_ENV = ("DDPS_STORAGE", "NO_ALBUMENTATIONS_UPDATE", "MLFLOW_DISABLE_TELEMETRY", "RAY_USAGE_STATS_ENABLED",
              "MLFLOW_TRACKING_URI", "DDPS_FASHION_MNIST", "RAY_TRAIN_ENABLE_PRINT_PATCH",
              "HF_HOME", "HF_HUB_CACHE", "HF_HUB_OFFLINE")  # published weights: the same Hub cache, offline alike


JOB_CONFIG_VAR = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # what Ray's job manager gives a submitted job's driver
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}  # Ray's single-node mode: every service on 127.0.0.1


def check_gpu(cluster) -> None:
    """With --gpu on an in-process Ray (no RAY_ADDRESS), the GPUs are this machine's: one line
    (DeviceError) when it has none, or fewer than a training's workers (whose trainings would wait for ever),
    before Ray or MLflow start. A cluster's GPUs are its nodes' (ensure_ray)."""
    if not cluster.use_gpu or os.environ.get("RAY_ADDRESS"):
        return
    import torch

    from ddps.engine.device import DeviceError, resolve_device
    resolve_device(True)
    visible = torch.cuda.device_count()
    if cluster.workers > visible:
        raise DeviceError(f"--gpu --workers {cluster.workers}: this machine has {visible} GPU(s) visible and each "
                          f"Ray Train worker takes one; give --workers {visible} or fewer")


def ensure_ray(cluster, extra_cpus: float = 0.0, log_to_driver: bool = True, log=print) -> None:
    """Join the cluster in RAY_ADDRESS (as under `ray job submit`), else start Ray in this process with
    enough logical CPUs for the workers plus ``extra_cpus`` (a Tune trial beside them; logical, not
    physical: docs/design.md, "Ray resources are logical") and a bounded object store. With --gpu on a
    cluster that has no GPU yet, one line says that its GPU work waits for GPU nodes.

    A local Ray stays on loopback: in Ray's single-node mode (no other node can join) its GCS, raylet,
    object manager and dashboard bind to 127.0.0.1 rather than the machine's address. Ray reads the switch
    when it is first imported, so the Makefile exports it too."""
    if not os.environ.get("RAY_ADDRESS"):
        for key, value in LOOPBACK_ENV.items():
            os.environ.setdefault(key, value)
    import ray
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    env = {k: os.environ[k] for k in WORKER_ENV if k in os.environ}
    env.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")  # else each progress line reaches the driver twice
    if os.environ.get("RAY_ADDRESS"):
        # under `ray job submit` the job's runtime_env already reaches every worker, and Ray refuses a
        # driver runtime_env that sets the same variables again: pass only what the job does not set
        job_env = json.loads(os.environ.get(JOB_CONFIG_VAR) or "{}").get("runtime_env") or {}
        env = {k: v for k, v in env.items() if k not in (job_env.get("env_vars") or {})}
        ray.init(address=os.environ["RAY_ADDRESS"], runtime_env={"env_vars": env} if env else None,
                 log_to_driver=log_to_driver)
        if cluster.use_gpu and not ray.cluster_resources().get("GPU"):
            log(f"--gpu: the cluster at {os.environ['RAY_ADDRESS']} has no GPU yet; the trainings and evaluations "
                f"wait for GPU nodes (an autoscaler adds them)")
        return
    # as many trials side by side as this machine's cores hold workers (one at a time with 2 workers on 2
    # cores; two with 1 worker each), each with its extra CPUs (logical) beside them
    per_trial = cluster.workers * cluster.cpus_per_worker
    side_by_side = max(1, int((os.cpu_count() or 1) // per_trial)) if extra_cpus else 1
    cpus = max(2, math.ceil(side_by_side * (per_trial + extra_cpus) - 1e-9))
    # the dashboard serves the state API that Ray Train's placement-group cleaner polls; loopback only
    gcs = own_address(env)
    os.environ[GCS_PORT_VAR] = gcs.rsplit(":", 1)[1]  # read once, when the head node starts
    try:
        context = ray.init(address="local", num_cpus=cpus, include_dashboard=True, dashboard_host="127.0.0.1",
                           _node_ip_address="127.0.0.1", object_store_memory=256 * 2**20,
                           runtime_env={"env_vars": env}, log_to_driver=log_to_driver,
                           logging_level=logging.INFO if log_to_driver else logging.WARNING)
    finally:
        os.environ.pop(GCS_PORT_VAR, None)
    if not log_to_driver:  # Ray's own start-up line is quieted: say where things are
        logs = os.path.join(ray._private.worker.global_worker.node.get_session_dir_path(), "logs")
        log(f"Ray: in-process on 127.0.0.1 ({cpus} CPUs), dashboard http://{context.dashboard_url}; the workers' "
            f"output is in {logs} (--verbose shows it here)")


GCS_PORT_VAR = "RAY_GCS_SERVER_PORT"  # the port Ray's head node gives its GCS (else a random one)


def own_address(env: dict) -> str:
    """The GCS address of the in-process cluster about to start (a free loopback port), named to its workers
    as RAY_ADDRESS.

    Ray Train's placement-group cleaner (a detached actor) asks the state API for the training's controller
    every second. With no RAY_ADDRESS, the API connects to "the latest cluster" — the address ``ray start``
    last wrote to /tmp/ray/ray_current_cluster: after any ``ray start`` on the machine (a test's, another
    user's, long dead) an in-process cluster's cleaner polled that one, each poll timed out waiting for its GCS
    (a 30-line RpcError traceback), and stopping the cleaner at the end of every training waited ~12 s and
    printed "Failed to stop PlacementGroupCleaner gracefully" — a cleaner that cannot reach its own cluster
    cannot clean up after a dead driver either. Named, the workers find this cluster and only this one."""
    address = f"127.0.0.1:{free_ports(1)[0]}"
    env["RAY_ADDRESS"] = address
    return address


RAY_WORKER_PORTS = (10002, 19999)  # Ray's default --min-worker-port / --max-worker-port


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """``n`` distinct ports free on ``host`` now, for servers about to start on them (a Ray GCS, a dashboard,
    an `mlflow server`).

    Drawn at random from above Ray's worker-port range and below the kernel's ephemeral range
    (/proc/sys/net/ipv4/ip_local_port_range), never by binding port 0: a port-0 bind gets an ephemeral port, and
    every process that binds port 0 meanwhile (Ray's raylet and gRPC servers starting beside it) draws from the
    same range — a Ray head's metrics port chosen that way went to another of its processes before its agent
    bound it, and the head's raylet died. Each socket stays bound until all ``n`` are chosen (no port twice)."""
    import random
    import socket
    low = RAY_WORKER_PORTS[1] + 1
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            ephemeral = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral = 32768  # Linux's default
    candidates = random.sample(range(low, ephemeral), ephemeral - low) if ephemeral - low >= 4 * n else []
    sockets, ports = [], []
    try:
        for port in candidates:
            s = socket.socket()
            try:
                s.bind((host, port))
            except OSError:
                s.close()
                continue
            sockets.append(s)
            ports.append(port)
            if len(ports) == n:
                return ports
        while len(ports) < n:  # no range between the two (a machine configured otherwise): the kernel's choice
            s = socket.socket()
            s.bind((host, 0))
            sockets.append(s)
            ports.append(s.getsockname()[1])
        return ports
    finally:
        for s in sockets:
            s.close()

def serve_ui(host: str = "127.0.0.1", port: int = 5000, tracking_uri: str | None = None) -> int:
    """`mlflow server` over the store (one worker, no job runner: ~0.5 GB), bound to ``host``, in a process group
    of its own that SIGTERM, SIGINT (Ctrl-C) or SIGHUP to `ddps ui` stops whole (``run_group``): nothing of it
    is left listening on the port. Prints where the runs are: links that open each experiment on its runs."""
    from ddps.orchestration.tracking import Tracker, resolve_tracking_uri, runs_url, sqlite_path
    uri = resolve_tracking_uri(tracking_uri)
    # a new store is created under its lock, not raced by a sweep starting beside
    tracker = Tracker(uri, check=False) if sqlite_path(uri) else None
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--host", host,
               "--port", str(port), "--workers", "1",
               "--artifacts-destination", str(ddps_home() / "mlartifacts")]
    server = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::', '') else host}:{port}"
    print(f"MLflow UI on http://{host}:{port} over {uri} (Ctrl-C stops it)")
    experiments = [e for e in tracker.client.search_experiments(max_results=100) if e.experiment_id != "0"] \
        if tracker else []
    for e in sorted(experiments, key=lambda e: e.name):
        print(f"  {e.name}: {runs_url(server, e.experiment_id)}")
    if not experiments:
        print(f"  runs: {runs_url(server)}")
    print("  (MLflow keeps its GenAI / Model training choice only once its sidebar switch is clicked: click "
          "'Model training' once to see training runs everywhere)")
    return run_group(command, env)


STOP_SIGNALS = ("SIGTERM", "SIGINT", "SIGHUP")


class _Stop(Exception):
    """A stop signal reached the process that runs a group (run_group)."""


def run_group(command: list[str], env: dict, grace_s: float = 10.0) -> int:
    """Run ``command`` in a new session (its own process group) until it exits: its exit status. When SIGTERM,
    SIGINT or SIGHUP reaches this process first, the group and every process below the command stop — SIGTERM,
    then SIGKILL to what is left after ``grace_s`` — and it returns 0. (The group is its own so that a terminal's
    Ctrl-C reaches it once, through here, and a `kill` of this process alone does not orphan it.)"""
    import signal

    def stop(signum, frame):
        raise _Stop(signum)

    signals = [getattr(signal, name) for name in STOP_SIGNALS]
    previous = {s: signal.signal(s, stop) for s in signals}
    proc = None
    try:
        proc = subprocess.Popen(command, env=env, start_new_session=True)
        status = proc.wait()
        stop_group(proc, grace_s)  # what the command left behind, if anything
        return status
    except _Stop:
        for s in signals:  # a second Ctrl-C does not interrupt the stopping
            signal.signal(s, signal.SIG_IGN)
        if proc is not None:
            stop_group(proc, grace_s)
        return 0
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def stop_group(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """Stop the process group led by ``proc`` and every process below it (found before any is signalled, so a
    child that left the group is stopped too): SIGTERM, then SIGKILL after ``grace_s`` seconds."""
    import signal

    import psutil
    try:
        tree = [psutil.Process(proc.pid)] + psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:  # the leader is gone (reaped): its group may still have members
        tree = []
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGTERM)
    for p in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.terminate()
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        pass
    _, alive = psutil.wait_procs(tree, timeout=grace_s)
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # anything the group started meanwhile
    proc.wait()
