"""The storage (--storage URI, ddps/storage.py) on a real S3-compatible server: moto's standalone server on
loopback (the s3_endpoint / s3_bucket fixtures). Checkpoints written to and read from the bucket, checked by
their sha256 sidecars; bad storage URIs refused in one line before any compute; the smoke pipeline writes
every checkpoint to the bucket and a rerun from an empty DDPS_HOME reuses them all.
"""
import os
import pickle
from pathlib import Path

import pytest
import torch

from ddps.checkpoint_io import read_checked, read_state_file, save_atomic, write_checked
from ddps.errors import CheckpointError, ConfigError
from ddps.storage import STORAGE_VAR, StoragePath, check_storage, folder, location, ray_storage
from procs import s3_objects


def _uri(endpoint: str, bucket: str, prefix: str) -> str:
    return f"s3://{bucket}/{prefix}?endpoint_override={endpoint}"


def test_a_checkpoint_round_trips_through_the_bucket_with_its_checksum(s3_bucket):
    endpoint, bucket = s3_bucket
    path = location(_uri(endpoint, bucket, "p")) / "checkpoints" / "x.pt"
    assert isinstance(path, StoragePath) and not path.exists()
    payload = {"model": {"w": torch.arange(6.0)}, "hash": "abc"}
    save_atomic(path, payload, checksum=True)
    assert s3_objects(endpoint, bucket) == ["p/checkpoints/x.pt", "p/checkpoints/x.pt.sha256"]
    again = location(str(path))  # the full URI, endpoint included, reopens it (how a Ray worker gets it)
    assert again == path and pickle.loads(pickle.dumps(path)).read_bytes() == path.read_bytes()
    assert torch.equal(read_state_file(again, "checkpoint")["model"]["w"], torch.arange(6.0))
    assert path.with_suffix(".json").name == "x.json" and path.parent.name == "checkpoints"


def test_a_damaged_object_fails_its_checksum_in_one_line_and_a_training_state_is_skipped(s3_bucket):
    endpoint, bucket = s3_bucket
    path = location(_uri(endpoint, bucket, "p")) / "state.pt"
    write_checked(path, {"iter": 3})
    assert read_checked(path) == {"iter": 3}
    path.write_bytes(path.read_bytes()[:100])  # truncated, as a partial upload by another tool would be
    with pytest.raises(CheckpointError, match=r"fails its sha256 checksum \(state.pt.sha256\)") as e:
        read_state_file(path, "checkpoint")
    assert "\n" not in str(e.value)
    assert read_checked(path) is None  # the training-state fallback then takes the one before it
    with pytest.raises(CheckpointError, match="does not exist"):
        read_state_file(path.with_name("missing.pt"), "checkpoint")


@pytest.mark.reliability(kind="bad_input", case="--storage URIs that cannot work")
def test_bad_storage_is_refused_in_one_line_before_any_compute(s3_endpoint, tmp_path):
    cases = {
        "relative/folder": "is a relative folder",
        f"s3://no-such-bucket/p?endpoint_override={s3_endpoint}": "bucket 'no-such-bucket' does not exist",
        "s3://b/p?endpoint_override=http://127.0.0.1:9&access_key=AKIA&secret_key=x": "credentials do not belong",
        "s3://b/p?endpoint_override=http://127.0.0.1:9": "the store does not answer",
        "hdfs://namenode:8020/x": r"storage URIs are s3://bucket/prefix or gs://bucket/prefix \(or an absolute",
    }
    for uri, message in cases.items():
        with pytest.raises(ConfigError, match=message) as e:
            check_storage(uri)
        assert "\n" not in str(e.value), uri
    assert check_storage(str(tmp_path / "nfs") + "/") == str(tmp_path / "nfs")  # a folder: absolute, created


def test_every_shared_file_lives_under_the_storage_and_ray_gets_its_filesystem(s3_bucket, monkeypatch, tmp_path):
    from ddps.config import resolve
    from ddps.engine import train_base, train_refiner
    endpoint, bucket = s3_bucket
    cfg = resolve("smoke")
    monkeypatch.delenv(STORAGE_VAR, raising=False)
    assert train_base.default_checkpoint(cfg).parent == Path(os.environ["DDPS_HOME"]) / "checkpoints"
    monkeypatch.setenv(STORAGE_VAR, _uri(endpoint, bucket, "team/ddps"))
    base = train_base.default_checkpoint(cfg)
    stage = train_refiner.stage_checkpoint(cfg, "stage1", "h")
    assert str(base).startswith(f"s3://{bucket}/team/ddps/checkpoints/base-") and endpoint in str(base)
    assert str(stage).startswith(f"s3://{bucket}/team/ddps/checkpoints/refiner-ddps-stage1-")
    path, filesystem = ray_storage("ray")
    assert path == f"{bucket}/team/ddps/ray" and filesystem.type_name == "s3"
    monkeypatch.setenv(STORAGE_VAR, str(tmp_path / "nfs"))  # a mounted folder: plain paths under it
    assert folder("checkpoints") == tmp_path / "nfs" / "checkpoints" and ray_storage("ray") == (
        str(tmp_path / "nfs" / "ray"), None)


@pytest.mark.slow
def test_the_pipeline_keeps_every_checkpoint_in_the_bucket_and_a_rerun_from_an_empty_home_reuses_them(
        ray_local, s3_bucket, tmp_path, monkeypatch, capsys):
    from ddps.cli import main
    endpoint, bucket = s3_bucket
    uri = _uri(endpoint, bucket, "ddps")
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv(STORAGE_VAR, "")  # restored after the test: main() sets it from --storage
    monkeypatch.setenv("DDPS_HOME", str(tmp_path / "home"))  # the session's has other tests' checkpoints
    args = ["pipeline", "--preset", "smoke", "--cpus-per-worker", "0.5", "--storage", uri, "--tracking-uri", tracking]
    assert main(args) == 0
    first = capsys.readouterr().out
    objects = s3_objects(endpoint, bucket, "ddps")
    checkpoints = [o for o in objects if o.startswith("ddps/checkpoints/") and o.endswith(".pt")]
    assert len(checkpoints) == 3 and {o.split("/")[2].split("-")[0] for o in checkpoints} == {"base", "refiner"}
    assert all(f"{o}.sha256" in objects for o in checkpoints)
    assert any(o.startswith("ddps/features/train-") for o in objects)  # published for the other nodes
    assert any(o.startswith("ddps/ray/stage2-") for o in objects)  # Ray Train's run state
    assert not list((tmp_path / "home").glob("checkpoints/*.pt"))  # none in DDPS_HOME: all in the bucket

    monkeypatch.setenv("DDPS_HOME", str(tmp_path / "fresh-home"))  # a node that has never seen this run
    assert main(args) == 0
    rerun = capsys.readouterr().out
    for step in ("base", "stage1", "stage2"):
        assert f"[{step}] reusing s3://{bucket}/ddps/checkpoints/" in rerun
    assert "[eval] reusing MLflow run" in rerun
    assert first.split("| Method")[1].split("\n\n")[0] == rerun.split("| Method")[1].split("\n\n")[0]
    assert s3_objects(endpoint, bucket, "ddps/checkpoints") == [o for o in objects if "/checkpoints/" in o]
    assert not (tmp_path / "fresh-home" / "checkpoints").exists() or not list(
        (tmp_path / "fresh-home" / "checkpoints").iterdir())


def test_the_single_process_commands_train_into_and_evaluate_from_the_bucket(s3_bucket, monkeypatch, capsys):
    from ddps.cli import main
    endpoint, bucket = s3_bucket
    uri = _uri(endpoint, bucket, "solo")
    monkeypatch.setenv(STORAGE_VAR, "")  # restored after the test: main() sets it from --storage
    assert main(["train-base", "--preset", "smoke", "--storage", uri]) == 0
    out = capsys.readouterr().out
    checkpoint = next(line.split(": ", 1)[1] for line in out.splitlines() if line.startswith("checkpoint: "))
    assert checkpoint.startswith(f"s3://{bucket}/solo/checkpoints/base-")
    objects = s3_objects(endpoint, bucket, "solo")
    name = checkpoint.split("?")[0].split("/")[-1]
    assert {f"solo/checkpoints/{name}", f"solo/checkpoints/{name}.sha256",
            f"solo/checkpoints/{name[:-3]}.json"} == set(objects)  # the metrics JSON beside it
    assert main(["eval", checkpoint, "--no-ms", "--json"]) == 0  # read back from the bucket by its URI
    assert '"mIoU"' in capsys.readouterr().out
    assert main(["train-base", "--preset", "smoke"]) == 0  # DDPS_STORAGE, as a worker sees it: reused
    assert f"reusing s3://{bucket}/solo/checkpoints/{name}" in capsys.readouterr().out
    # a base in the bucket as base.pretrained (what `ddps import official --out s3://…` leaves there): loaded from
    # the bucket, and hashed as a local copy of the same file would be
    from ddps.segmentors.pretrained import load_pretrained, source_identity
    local = location(checkpoint).download(Path(os.environ["DDPS_HOME"]) / "copies" / name)
    assert source_identity(checkpoint) == source_identity(str(local))
    assert load_pretrained(checkpoint).spec.num_classes == load_pretrained(str(local)).spec.num_classes
    with pytest.raises(CheckpointError, match="no such ddps base checkpoint in the storage"):
        load_pretrained(checkpoint.replace(name, "missing.pt"))


def test_a_node_without_the_feature_cache_fetches_it_from_the_storage_instead_of_computing_it(s3_bucket, tmp_path):
    from ddps.engine.features import FeatureCache, stored_cache
    endpoint, bucket = s3_bucket
    shared = location(_uri(endpoint, bucket, "p")) / "features" / "train-x.pt"
    cache = FeatureCache(torch.randn(4, 3, 2, 2).half(), torch.randn(4, 5, 2, 2).half(),
                         torch.zeros(4, 8, 8, dtype=torch.uint8))
    first, reused = stored_cache(tmp_path / "node-a" / "train-x.pt", lambda: cache, 4, shared=shared)
    assert not reused and shared.is_file()  # computed on node a, published

    def compute():
        raise AssertionError("node b computed the features the storage holds")
    second, reused = stored_cache(tmp_path / "node-b" / "train-x.pt", compute, 4, shared=shared)
    assert reused and torch.equal(second.features, cache.features) and (tmp_path / "node-b" / "train-x.pt").is_file()
    shared.unlink()  # a storage that lacks it gets it from a node that holds it
    assert stored_cache(tmp_path / "node-b" / "train-x.pt", compute, 4, shared=shared)[1] and shared.is_file()
