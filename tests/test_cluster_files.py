"""The cluster files cannot be launched here; parse them and check the fields that matter."""
import re
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest
import yaml

from ddps.config.choices import DATASET_NAMES  # noqa: F401  (the package imports)

ROOT = Path(__file__).resolve().parents[1]
PINS = {"torch==2.14.1", "torchvision==0.29.1", "segmentation-models-pytorch==0.6.0", "timm==1.0.31",
        "albumentations==2.0.8", "mlflow==3.17.2", "pyarrow==25.0.1"}
STORAGE = "s3://your-bucket/ddps"
DATA_ROOT = "/data/ADEChallengeData2016"  # the raw dataset: copied onto each node, not in the storage
SECRET_WORDS = ("password", "token", "secret", "access_key", "credential")


def _runtime_env() -> dict:
    return yaml.safe_load((ROOT / "cluster/runtime_env.yaml").read_text())


def _rayjob() -> tuple[dict, dict]:
    """cluster/rayjob.yaml: its ServiceAccount and its RayJob."""
    docs = {d["kind"]: d for d in yaml.safe_load_all((ROOT / "cluster/rayjob.yaml").read_text())}
    return docs["ServiceAccount"], docs["RayJob"]


def _readme_section(title: str) -> str:
    text = (ROOT / "cluster/README.md").read_text()
    start = text.index(f"## {title}")
    end = text.find("\n## ", start + 1)
    return text[start:] if end < 0 else text[start:end]


def _assert_node_local_storage_env(variables: dict) -> None:
    """DDPS_STORAGE names the bucket, without credentials; DDPS_HOME is each node's own folder, not NFS."""
    uri = urlparse(variables["DDPS_STORAGE"])
    assert variables["DDPS_STORAGE"] == STORAGE and uri.scheme == "s3" and uri.netloc and uri.path.strip("/")
    assert uri.username is None and uri.password is None  # no key:secret@bucket
    assert not any(word in key.lower() for key in parse_qs(uri.query) for word in SECRET_WORDS)
    home = variables["DDPS_HOME"]
    assert home.startswith("/") and not home.startswith("/mnt/shared")


def _assert_no_secrets(variables: dict) -> None:
    assert not any(word in key.lower() for key in variables for word in SECRET_WORDS)
    assert not any(re.search(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b", str(value)) for value in variables.values())


def test_runtime_env_pins_the_stack_and_sets_the_environment():
    env = _runtime_env()
    assert PINS <= set(env["pip"]["packages"])
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert all(pin.split("==")[1] in pyproject for pin in PINS)  # the same pins as the project
    variables = env["env_vars"]
    assert variables["NO_ALBUMENTATIONS_UPDATE"] == "1" and variables["MLFLOW_DISABLE_TELEMETRY"] == "true"
    assert variables["RAY_USAGE_STATS_ENABLED"] == "0"
    _assert_node_local_storage_env(variables)
    _assert_no_secrets(variables)


@pytest.mark.reliability(kind="security", case="cluster storage: credentials from the nodes' roles, none in the "
                                                "storage URI or the cluster files")
def test_cluster_files_carry_no_storage_credentials():
    _assert_no_secrets(_runtime_env()["env_vars"])
    account, job = _rayjob()
    _assert_no_secrets(yaml.safe_load(job["spec"]["runtimeEnvYAML"])["env_vars"])
    spec = job["spec"]["rayClusterSpec"]
    for template in [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]:
        for container in template["spec"]["containers"] + template["spec"].get("initContainers", []):
            _assert_no_secrets({e["name"]: e.get("value", "") for e in container.get("env", [])})
            assert "envFrom" not in container  # a Secret would belong to the cluster's own setup, not this file
    assert account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].startswith("arn:aws:iam::")
    for name in ("runtime_env.yaml", "ray-cluster.yaml", "rayjob.yaml", "submit.sh", "README.md"):
        text = (ROOT / "cluster" / name).read_text()
        assert not re.search(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b", text), name  # an AWS access key id
        assert not re.search(r"(s3|gs)://[^\s/`'\"]*@", text), name  # credentials in a storage URI
        assert not re.search(r"(?i)aws_secret_access_key\s*[:=]\s*\S", text), name  # a secret given a value


@pytest.mark.reliability(kind="security", case="cluster launcher: Ray token auth, cluster-internal security group")
def test_cluster_launcher_turns_token_auth_on_and_scales_gpu_workers():
    cfg = yaml.safe_load((ROOT / "cluster/ray-cluster.yaml").read_text())
    assert cfg["available_node_types"]["gpu_worker"]["resources"]["GPU"] == 1
    assert cfg["available_node_types"]["gpu_worker"]["max_workers"] >= 1
    starts = " ".join(cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"])
    assert starts.count("RAY_AUTH_MODE=token") == 2
    assert cfg["provider"]["security_group"]["GroupName"] == "ddps-cluster-internal"  # cluster network only
    assert "ray[default,train,tune]==2.60.0" in " ".join(cfg["setup_commands"])


def test_cluster_launcher_reaches_the_bucket_through_instance_profiles_with_nfs_as_the_alternative():
    text = (ROOT / "cluster/ray-cluster.yaml").read_text()
    cfg = yaml.safe_load(text)
    profiles = {name: node["node_config"]["IamInstanceProfile"]["Arn"]
                for name, node in cfg["available_node_types"].items()}
    assert set(profiles) == {"head", "gpu_worker"}
    assert all(":instance-profile/" in arn for arn in profiles.values()) and len(set(profiles.values())) == 2
    setup = " ".join(cfg["setup_commands"])
    assert "mount" not in setup and "/mnt/shared" not in setup  # no NFS unless chosen
    assert f"s3://your-bucket/datasets/ADEChallengeData2016 {DATA_ROOT}" in setup  # the raw data on every node
    nfs = [line for line in text.splitlines() if "mount -t nfs4" in line]
    assert nfs and all(line.lstrip().startswith("#") and "|| true" not in line for line in nfs)  # commented, loud


@pytest.mark.reliability(kind="security", case="MLflow behind basic-auth (cluster/README)")
def test_cluster_readme_puts_mlflow_behind_authentication():
    text = (ROOT / "cluster/README.md").read_text()
    assert "--app-name basic-auth" in text and "MLFLOW_TRACKING_USERNAME" in text and "MLFLOW_TRACKING_PASSWORD" in text


def test_cluster_readme_documents_the_storage_uri_its_layout_and_nfs_as_the_alternative():
    section = _readme_section("3. Shared storage: a bucket, or NFS")
    layout = {row.split("|")[1].strip(): row.split("|")[2] for row in section.splitlines() if row.startswith("| `")}
    assert set(layout) == {"`checkpoints/`", "`features/`", "`ray/<run name>/`", "`ray/tune/`", "`spool/`"}
    assert "`.sha256`" in layout["`checkpoints/`"] and "content hash" in layout["`ray/<run name>/`"]
    text = " ".join(section.split())
    assert "`--storage URI`" in text and "`DDPS_STORAGE`" in text
    for command in ("train-base", "train", "eval", "refine", "pipeline", "sweep", "demo"):
        assert f"`{command}`" in text, command
    assert "fails its sha256" in text and "not trained again" in text  # the fallback and the reuse are stated
    assert "AWS_ENDPOINT_URL" in text and "?endpoint_override=" in text  # an S3-compatible server
    assert "never in the URI" in text and "instance profile" in text and "IRSA" in text
    assert "--storage /mnt/shared/ddps" in text and "DDPS_STORAGE: /mnt/shared/ddps" in text  # NFS, the alternative
    assert "each node's own cache" in text and "must be the same path on every node" not in text
    assert "--artifacts-destination s3://your-bucket/mlflow" in text  # MLflow is not in the storage
    submit = _readme_section("4. Submit").split("```")[1].replace("\\\n", " ")
    commands = [line for line in submit.splitlines() if line.startswith("cluster/submit.sh")]
    assert len(commands) == 3
    assert all(f"--storage {STORAGE}" in line and f"--data-root {DATA_ROOT}" in line for line in commands)
    assert "/mnt/shared" not in submit


@pytest.mark.reliability(kind="security", case="KubeRay job: token auth, ClusterIP only")
def test_rayjob_runs_the_pipeline_inside_the_cluster_network_with_token_auth():
    _, job = _rayjob()
    assert job["kind"] == "RayJob" and job["spec"]["entrypoint"].startswith("python -m ddps pipeline")
    spec = job["spec"]["rayClusterSpec"]
    assert spec["rayVersion"] == "2.60.0" and spec["authOptions"]["mode"] == "token"
    assert spec["headGroupSpec"]["serviceType"] == "ClusterIP"
    gpu = spec["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert gpu["nvidia.com/gpu"] == "1"


def test_rayjob_uses_the_bucket_through_an_irsa_service_account_and_the_runtime_env_of_submit():
    account, job = _rayjob()
    assert account["metadata"]["name"] == "ddps"
    role = account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"]
    assert re.fullmatch(r"arn:aws:iam::\d{12}:role/[\w+=,.@-]+", role)
    spec = job["spec"]["rayClusterSpec"]
    templates = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
    assert all(t["spec"]["serviceAccountName"] == "ddps" for t in templates)
    assert "persistentVolumeClaim" not in str(spec)  # no NFS volume unless chosen
    for t in templates:  # the raw dataset is copied onto each pod where the entrypoint says it is
        sync = " ".join(t["spec"]["initContainers"][0]["args"])
        assert sync.startswith("s3 sync") and sync.endswith(DATA_ROOT)
        mounts = [m["mountPath"] for c in t["spec"]["containers"] for m in c["volumeMounts"]]
        assert DATA_ROOT.startswith(mounts[0] + "/")
    assert f"--data-root {DATA_ROOT}" in job["spec"]["entrypoint"]
    runtime, submitted = yaml.safe_load(job["spec"]["runtimeEnvYAML"]), _runtime_env()
    _assert_node_local_storage_env(runtime["env_vars"])
    assert runtime["pip"]["packages"] == submitted["pip"]["packages"]  # the job installs what submit.sh's does
    drop = lambda env: {k: v for k, v in env.items() if k != "MLFLOW_TRACKING_URI"}  # noqa: E731
    assert drop(runtime["env_vars"]) == drop(submitted["env_vars"])


def test_submit_script_uses_the_runtime_env_and_refuses_without_an_address():
    import subprocess
    script = ROOT / "cluster/submit.sh"
    text = script.read_text()
    assert "ray job submit" in text and "runtime_env.yaml" in text and "python -m ddps" in text
    code = "\n".join(line for line in text.splitlines() if not line.startswith("#"))
    assert "/mnt/shared" not in code and "DDPS_HOME" not in code and "DDPS_STORAGE" not in code  # the runtime_env's
    out = subprocess.run(["bash", str(script), "pipeline"], capture_output=True, text=True,
                         env={"PATH": "/usr/bin:/bin"}, timeout=30)
    assert out.returncode != 0 and "set RAY_ADDRESS" in out.stderr
