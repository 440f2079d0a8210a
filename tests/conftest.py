import gzip
import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest

from procs import S3_CREDENTIALS, create_bucket, free_port, moto_command, start, stop, wait_http

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test asks the Hugging Face Hub: published weights come from a cache
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # local Ray on 127.0.0.1 only (read at import)
for _key, _value in S3_CREDENTIALS.items():  # the moto bucket's fake credentials, before any Ray starts
    os.environ.setdefault(_key, _value)


# ---- reliability records (make reliability) --------------------------------------------------------
# A test marked @pytest.mark.reliability(kind, case) — kind: fault | bad_input | security — writes one JSON
# line per run to $DDPS_RELIABILITY_LOG: its outcome and what it counted (the `reliability` fixture's
# numbers, e.g. fuzz examples tried / refused, metrics logged / lost). scripts/reliability.py sums them
# into README's "Reliability" section.

@pytest.fixture
def reliability(request):
    """Numbers a reliability test reports beside its outcome: reliability["lost"] = 0, ..."""
    numbers: dict = {}
    request.node.user_properties.append(("reliability", numbers))
    return numbers


def pytest_runtest_logreport(report):
    path = os.environ.get("DDPS_RELIABILITY_LOG")
    marker = getattr(report, "reliability_marker", None)
    if not path or marker is None or (report.when != "call" and report.passed):
        return
    numbers = next((v for k, v in report.user_properties if k == "reliability"), {})
    with open(path, "a") as f:
        f.write(json.dumps({"test": report.nodeid, "outcome": report.outcome, "when": report.when, **marker,
                            "numbers": numbers}) + "\n")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    marker = item.get_closest_marker("reliability")
    if marker is not None:
        case = marker.kwargs.get("case") or item.name
        if hasattr(item, "callspec"):  # a parametrized case: the parameters name it
            case = f"{case} [{item.callspec.id}]"
        outcome.get_result().reliability_marker = {"kind": marker.kwargs["kind"], "case": case}


@pytest.fixture(autouse=True, scope="session")
def ddps_home(tmp_path_factory):
    """Every test session gets its own DDPS_HOME, so caches never leak between runs."""
    home = tmp_path_factory.mktemp("ddps-home")
    os.environ["DDPS_HOME"] = str(home)
    os.environ.pop("DDPS_STORAGE", None)  # never a developer's real bucket: the tests that want one set it
    return home


@pytest.fixture(scope="module")
def ray_local():
    """An in-process Ray on loopback with room for two workers of half a CPU; shut down after the module."""
    import ray

    from ddps.orchestration.ray_train import Cluster
    from ddps.orchestration.runtime import ensure_ray
    os.environ["RAY_AUTH_MODE"] = "disabled"
    os.environ["RAY_TRAIN_ENABLE_PRINT_PATCH"] = "0"
    ensure_ray(Cluster(workers=2, cpus_per_worker=0.5))
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def s3_endpoint(tmp_path_factory):
    """moto's S3 server on a free loopback port (one per test module): its endpoint URL."""
    port, log = free_port(), tmp_path_factory.mktemp("moto") / "moto.log"
    proc = start(moto_command(port), log, dict(os.environ))
    try:
        wait_http(f"http://127.0.0.1:{port}/moto-api/", proc, log, timeout=60)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(proc)


@pytest.fixture
def s3_bucket(s3_endpoint, tmp_path):
    """A fresh bucket on the moto server: (endpoint, bucket name)."""
    bucket = f"ddps-{tmp_path.name.lower().replace('_', '-')[:40].strip('-')}"
    create_bucket(s3_endpoint, bucket)
    return s3_endpoint, bucket


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", n) for n in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def blob(rng, label):
    """A 28x28 'garment': a filled rectangle with a hole, brightness by class."""
    img = np.zeros((28, 28), np.uint8)
    img[4:24, 6:22] = 60 + 15 * label
    img[10:14, 12:16] = 0  # an enclosed hole: the silhouette fills it
    return img


@pytest.fixture
def tiny_fashion(tmp_path):
    """A Fashion-MNIST look-alike: train photos have classes 0-4 only, test photos 5-9 only."""
    rng = np.random.default_rng(0)
    root = tmp_path / "fmnist"
    root.mkdir()
    for stem, n, classes in (("train", 50, range(0, 5)), ("t10k", 20, range(5, 10))):
        labels = np.array([list(classes)[i % len(classes)] for i in range(n)], np.uint8)
        images = np.stack([blob(rng, int(c)) for c in labels])
        write_idx(root / f"{stem}-images-idx3-ubyte.gz", images)
        write_idx(root / f"{stem}-labels-idx1-ubyte.gz", labels)
    return root
