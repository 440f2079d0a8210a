"""Starting and stopping real processes in tests: free loopback ports, each process in its own session,
stopped by its process group (its PID), never by name."""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from ddps.orchestration.runtime import free_ports  # noqa: F401 (the tests' one port picker)


def free_port() -> int:
    return free_ports(1)[0]


def start(command: list[str], log: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen(command, stdout=log.open("a"), stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the process group the test started (its PID is the group's), SIGKILL after 30 s."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"{proc.args[:3]} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise AssertionError(f"{url} did not answer within {timeout} s:\n{log.read_text()[-3000:]}")


def alive_nodes(dashboard: str) -> list:
    """The ALIVE nodes of the Ray cluster whose dashboard is at ``dashboard``."""
    from ray.util.state import list_nodes
    return [n for n in list_nodes(address=dashboard, raise_on_missing_output=False) if n.state == "ALIVE"]


def wait_ray_nodes(dashboard: str, n: int, proc: subprocess.Popen, log: Path, timeout: float = 120) -> list:
    """The cluster's ALIVE nodes once there are ``n`` of them; an error with the log's tail if ``proc`` (the
    `ray start` that adds the last) exits first or ``timeout`` passes (a raylet that died at start-up: its
    dashboard answers, its node never registers)."""
    deadline = time.monotonic() + timeout
    while len(nodes := alive_nodes(dashboard)) < n:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"{n} Ray node(s) did not come up at {dashboard}:\n{log.read_text()[-3000:]}")
        time.sleep(1)
    return nodes


def mlflow_server_command(store: Path, port: int, artifacts: str | None = None) -> list[str]:
    """`mlflow server` over a SQLite store, one worker, on 127.0.0.1; its artifacts in ``artifacts`` (a folder or
    a URI such as s3://bucket/mlflow), else the store's mlartifacts/."""
    return [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{store}/mlflow.db",
            "--artifacts-destination", artifacts or str(store / "mlartifacts"), "--host", "127.0.0.1",
            "--port", str(port), "--workers", "1"]


@contextlib.contextmanager
def serving_mlflow(command: list[str], log: Path, env: dict):
    """The `mlflow server` of ``command`` (mlflow_server_command), started, answering /health: its URL; stopped
    by its process group on exit."""
    port = command[command.index("--port") + 1]
    proc = start(command, log, env)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/health", proc, log)
        yield url
    finally:
        stop(proc)


# ---- an S3-compatible object store: moto's standalone server ---------------------------------------------
# Tests that store checkpoints in a bucket start moto's server on a free loopback port (as Ray's own storage
# tests do) with fake credentials: moto accepts any, and pyarrow needs some (else it asks the EC2 metadata
# service). The credentials are set in conftest before Ray starts, so every Ray worker inherits them.

S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "ddps-test", "AWS_SECRET_ACCESS_KEY": "ddps-test",
                  "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}


def moto_command(port: int) -> list[str]:
    return [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]


def create_bucket(endpoint: str, bucket: str) -> None:
    """A bucket on the S3 endpoint (pyarrow's create_dir on a bucket name, as `aws s3 mb` would)."""
    import pyarrow.fs
    s3 = pyarrow.fs.S3FileSystem(endpoint_override=endpoint, region="us-east-1", allow_bucket_creation=True,
                                 access_key=S3_CREDENTIALS["AWS_ACCESS_KEY_ID"],
                                 secret_key=S3_CREDENTIALS["AWS_SECRET_ACCESS_KEY"])
    s3.create_dir(bucket)


def s3_objects(endpoint: str, bucket: str, prefix: str = "") -> list[str]:
    """Every object key under ``bucket/prefix``."""
    import pyarrow.fs
    s3 = pyarrow.fs.S3FileSystem(endpoint_override=endpoint, region="us-east-1",
                                 access_key=S3_CREDENTIALS["AWS_ACCESS_KEY_ID"],
                                 secret_key=S3_CREDENTIALS["AWS_SECRET_ACCESS_KEY"])
    root = f"{bucket}/{prefix}".rstrip("/")
    infos = s3.get_file_info(pyarrow.fs.FileSelector(root, recursive=True, allow_not_found=True))
    return sorted(i.path[len(bucket) + 1:] for i in infos if i.type == pyarrow.fs.FileType.File)


def start_ui(tmp_path: Path) -> tuple[subprocess.Popen, int, Path]:
    """`python -m ddps ui` on a free loopback port over the embedded store of a fresh DDPS_HOME (``tmp_path``),
    answering /health: (its process, the port, its log)."""
    port, log = free_port(), tmp_path / "ui.log"
    env = {**os.environ, "DDPS_HOME": str(tmp_path)}
    env.pop("MLFLOW_TRACKING_URI", None)
    ui = start([sys.executable, "-m", "ddps", "ui", "--port", str(port)], log, env)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", ui, log)
    except BaseException:
        stop(ui)
        raise
    return ui, port, log
