"""The cluster files cannot be launched here; parse them and check the fields that matter."""
from pathlib import Path

import pytest
import yaml

from ddps.config.choices import DATASET_NAMES  # noqa: F401  (the package imports)

ROOT = Path(__file__).resolve().parents[1]
PINS = {"torch==2.14.1", "torchvision==0.29.1", "segmentation-models-pytorch==0.6.0", "timm==1.0.31",
        "albumentations==2.0.8", "mlflow==3.17.2", "pyarrow==25.0.1"}


def test_runtime_env_pins_the_stack_and_sets_the_environment():
    env = yaml.safe_load((ROOT / "cluster/runtime_env.yaml").read_text())
    assert PINS <= set(env["pip"]["packages"])
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert all(pin.split("==")[1] in pyproject for pin in PINS)  # the same pins as the project
    variables = env["env_vars"]
    assert variables["NO_ALBUMENTATIONS_UPDATE"] == "1" and variables["MLFLOW_DISABLE_TELEMETRY"] == "true"
    assert variables["RAY_USAGE_STATS_ENABLED"] == "0" and variables["DDPS_HOME"].startswith("/mnt/shared")
    assert not any(word in key.lower() for key in variables for word in ("password", "token", "secret"))


@pytest.mark.reliability(kind="security", case="cluster launcher: Ray token auth, cluster-internal security group")
def test_cluster_launcher_turns_token_auth_on_and_scales_gpu_workers():
    cfg = yaml.safe_load((ROOT / "cluster/ray-cluster.yaml").read_text())
    assert cfg["available_node_types"]["gpu_worker"]["resources"]["GPU"] == 1
    assert cfg["available_node_types"]["gpu_worker"]["max_workers"] >= 1
    starts = " ".join(cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"])
    assert starts.count("RAY_AUTH_MODE=token") == 2
    assert cfg["provider"]["security_group"]["GroupName"] == "ddps-cluster-internal"  # cluster network only
    assert "ray[default,train,tune]==2.60.0" in " ".join(cfg["setup_commands"])


@pytest.mark.reliability(kind="security", case="MLflow behind basic-auth (cluster/README)")
def test_cluster_readme_puts_mlflow_behind_authentication():
    text = (ROOT / "cluster/README.md").read_text()
    assert "--app-name basic-auth" in text and "MLFLOW_TRACKING_USERNAME" in text and "MLFLOW_TRACKING_PASSWORD" in text


@pytest.mark.reliability(kind="security", case="KubeRay job: token auth, ClusterIP only")
def test_rayjob_runs_the_pipeline_inside_the_cluster_network_with_token_auth():
    job = yaml.safe_load((ROOT / "cluster/rayjob.yaml").read_text())
    assert job["kind"] == "RayJob" and job["spec"]["entrypoint"].startswith("python -m ddps pipeline")
    spec = job["spec"]["rayClusterSpec"]
    assert spec["rayVersion"] == "2.60.0" and spec["authOptions"]["mode"] == "token"
    assert spec["headGroupSpec"]["serviceType"] == "ClusterIP"
    gpu = spec["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert gpu["nvidia.com/gpu"] == "1"
    runtime = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    assert runtime["env_vars"]["DDPS_HOME"].startswith("/mnt/shared")


def test_submit_script_uses_the_runtime_env_and_refuses_without_an_address():
    import subprocess
    script = ROOT / "cluster/submit.sh"
    text = script.read_text()
    assert "ray job submit" in text and "runtime_env.yaml" in text and "python -m ddps" in text
    out = subprocess.run(["bash", str(script), "pipeline"], capture_output=True, text=True,
                         env={"PATH": "/usr/bin:/bin"}, timeout=30)
    assert out.returncode != 0 and "set RAY_ADDRESS" in out.stderr
