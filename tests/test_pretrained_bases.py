"""Bases from published weights: smp's ImageNet encoders by name, and whole bases imported with
base.pretrained (an smp save_pretrained folder here) — offline, never touching the Hugging Face Hub."""
import json
import os
from pathlib import Path

import pytest
import segmentation_models_pytorch as smp
import torch
from huggingface_hub import constants as hub_constants
from safetensors.torch import save_file

from ddps import names
from ddps.cli import main
from ddps.config import resolve
from ddps.config.schema import BaseConfig
from ddps.data.fashion_scenes import CLASS_NAMES
from ddps.engine import train_base
from ddps.engine.reporter import NullReporter
from ddps.errors import CheckpointError, ConfigError
from ddps.segmentors import create_base
from ddps.segmentors.checkpoint import load_base, read_checkpoint
from ddps.segmentors.pretrained import (check_weights, imagenet_source, load_pretrained, source_identity,
                                        source_kind)

ROOT = Path(__file__).resolve().parents[1]
HUB_NAME = "smp-hub/segformer-b2-512x512-ade-160k"
K = len(CLASS_NAMES)  # fashion-scenes: background + 10 garments


@pytest.fixture(autouse=True)
def offline_hub(tmp_path, monkeypatch):
    """The Hub offline, its cache an empty folder of this test (huggingface_hub read both at import: patched)."""
    cache = tmp_path / "hf-home" / "hub"
    cache.mkdir(parents=True)
    for key, value in (("HF_HUB_OFFLINE", "1"), ("HF_HOME", str(cache.parent)), ("HF_HUB_CACHE", str(cache))):
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    return cache


def _saved_segformer(folder: Path, classes: int = K, seed: int = 0) -> smp.Segformer:
    """An smp SegFormer-B0 with random weights (and BatchNorm statistics), written by save_pretrained."""
    torch.manual_seed(seed)
    model = smp.Segformer("mit_b0", encoder_weights=None, classes=classes, decoder_segmentation_channels=64)
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if "running" in name:
                buffer.uniform_(0.5, 1.5)
    model.eval().save_pretrained(str(folder))
    return model


def _quarter_logits(model: smp.Segformer, x: torch.Tensor) -> torch.Tensor:
    """smp's own forward with the head's x4 upsampling taken out: its logits at 1/4."""
    model.segmentation_head[1] = torch.nn.Identity()
    with torch.no_grad():
        return model.eval()(x)


def test_an_smp_folder_imports_bit_identically_and_its_checkpoint_reloads(tmp_path, tiny_fashion):
    folder = tmp_path / "segformer-b0"
    _saved_segformer(folder)
    assert source_kind(str(folder)) == "folder" and source_kind(HUB_NAME) == "smp-hub"
    x = torch.randn(2, 3, 64, 96)
    reference = _quarter_logits(smp.from_pretrained(str(folder)), x)

    base = load_pretrained(str(folder), num_classes=K).eval()
    assert (base.spec.arch, base.spec.backbone, base.num_classes, base.feature_channels) == ("segformer", "mit_b0", K, 64)
    with torch.no_grad():
        out = base(x)
    assert out.logits.shape == (2, K, 16, 24) and torch.equal(out.logits, reference)

    # the base step's checkpoint: the same logits, where it came from, no training
    cfg = resolve("smoke", overrides={"base.pretrained": str(folder), "data.root": str(tiny_fashion)})
    path = tmp_path / "imported.pt"
    payload = train_base.import_base(cfg, NullReporter(), path)
    loaded, stored = load_base(path, num_classes=K)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x).logits, reference)
    assert stored["kind"] == "base_segmentor" and stored["hash"] == train_base.base_hash(cfg) == payload["hash"]
    assert stored["metrics"] == {"imported_from": str(folder), "images_seen": 0} and stored["history"] == []
    assert stored["imported_from"]["kind"] == "folder" and stored["imported_from"]["identity"].startswith("sha256:")
    # the stored config names the imported model, not the config's (unused) base.feature_channels
    assert stored["config"]["base.feature_channels"] == 64 and stored["config"]["base.pretrained"] == str(folder)


def test_an_import_is_checked_against_the_dataset_and_what_ddps_builds(tmp_path):
    _saved_segformer(tmp_path / "five", classes=5)
    with pytest.raises(CheckpointError, match=rf"base.pretrained=.*five predicts 5 classes but the dataset has {K}$"):
        load_pretrained(str(tmp_path / "five"), num_classes=K)
    smp.Unet("resnet18", encoder_weights=None, classes=K).save_pretrained(str(tmp_path / "unet"))
    with pytest.raises(ConfigError, match=r"is an smp Unet; ddps's bases are: Segformer \(segformer\)"):
        load_pretrained(str(tmp_path / "unet"))
    smp.DeepLabV3Plus("resnet34", encoder_weights=None, classes=K).save_pretrained(str(tmp_path / "r34"))
    with pytest.raises(ConfigError, match=r"is a deeplabv3plus with backbone 'resnet34'; ddps's deeplabv3plus takes"):
        load_pretrained(str(tmp_path / "r34"))
    smp.DeepLabV3Plus("resnet18", encoder_weights=None, classes=K, encoder_output_stride=8
                      ).save_pretrained(str(tmp_path / "os8"))
    with pytest.raises(ConfigError, match=r"sets encoder_output_stride=8; ddps builds its deeplabv3plus with "
                                          r"encoder_output_stride=16"):
        load_pretrained(str(tmp_path / "os8"))


def _fill_imagenet_cache(cache: Path, backbone: str) -> dict:
    """The Hub cache layout huggingface_hub reads offline for smp's pinned ImageNet repo: refs/main and
    snapshots/<revision>/{config.json, model.safetensors}, with weights of our own (and an ImageNet head)."""
    repo_id, revision = imagenet_source(backbone)
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    encoder = smp.encoders.get_encoder(backbone, weights=None)
    generator = torch.Generator().manual_seed(7)
    state = {k: torch.randn(v.shape, generator=generator) if v.is_floating_point() else v.clone()
             for k, v in encoder.state_dict().items()}
    save_file({**state, "head.weight": torch.zeros(1000, 256), "head.bias": torch.zeros(1000)},
              str(snapshot / "model.safetensors"))
    (snapshot / "config.json").write_text(json.dumps({"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}))
    return state


def test_imagenet_encoder_weights_by_name_from_a_filled_offline_cache(offline_hub):
    state = _fill_imagenet_cache(offline_hub, "mit_b0")
    check_weights(BaseConfig(encoder_weights="imagenet"))  # in the cache: no error, no network
    base = create_base("segformer", "mit_b0", K, feature_channels=32, encoder_weights="imagenet")
    own = base.encoder.state_dict()
    assert set(own) == set(state)  # the ImageNet classifier is dropped by smp's encoder
    assert all(torch.equal(own[k], state[k]) for k in state)
    # part of the base's hashed config: a base trained from ImageNet is another base
    cfg = resolve("smoke")
    assert train_base.base_hash(cfg) != train_base.base_hash(resolve("smoke", overrides={"base.encoder_weights": "imagenet"}))


@pytest.mark.reliability(kind="bad_input", case="published weights absent offline")
def test_absent_weights_offline_stop_the_pipeline_and_sweep_before_any_compute(tmp_path, monkeypatch, capsys,
                                                                               offline_hub):
    import ddps.orchestration.pipeline as pipeline
    import ddps.orchestration.runtime as runtime
    import ddps.orchestration.sweep as sweep

    def no_compute(*args, **kwargs):
        raise AssertionError("compute started")
    monkeypatch.setattr(runtime, "ensure_ray", no_compute)
    monkeypatch.setattr(pipeline, "Pipeline", no_compute)
    monkeypatch.setattr(sweep, "run_sweeps", no_compute)
    uri = ["--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]
    cases = [
        (["pipeline", "--preset", "smoke", "--set", f"base.pretrained={HUB_NAME}"],
         rf"base.pretrained={HUB_NAME} is not in the Hugging Face cache \({offline_hub}\) and the Hub is offline "
         rf"\(HF_HUB_OFFLINE=1\): fetch it with `hf download {HUB_NAME}` .* or set base.pretrained to a local folder"),
        (["sweep", str(ROOT / "experiments" / "table1.yaml"), "--preset", "smoke", "--set", "base.encoder_weights=imagenet"],
         r"base.encoder_weights=imagenet \(\w+: smp-hub/\w+.imagenet at revision \w+\) is not in the Hugging Face "
         r"cache .* fetch it with `hf download smp-hub/\w+.imagenet --revision \w+`"),
        (["pipeline", "--preset", "smoke", "--set", f"base.pretrained={tmp_path / 'missing'}"],
         rf"base.pretrained={tmp_path / 'missing'}: no such folder \({tmp_path / 'missing'}\)"),
        (["train-base", "--preset", "smoke", "--set", f"base.pretrained={tmp_path / 'missing.pth'}"],
         rf"base.pretrained={tmp_path / 'missing.pth'}: no such MMSegmentation checkpoint file"),
    ]
    import re
    for argv, message in cases:
        assert main(argv + (uri if argv[0] != "train-base" else [])) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and re.search(message, err), err
    assert not (tmp_path / "mlflow.db").exists() and not list(offline_hub.iterdir())  # nothing fetched


def test_the_dry_run_lists_an_imported_base_with_no_training_time(tmp_path, capsys):
    # table3a: its cells share one base (table1's six bases need one published base each: --cell-set, test_plan.py)
    argv = ["sweep", str(ROOT / "experiments" / "table3a.yaml"), "--dry-run", "--set", f"base.pretrained={HUB_NAME}",
            "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]
    assert main(argv + ["--preset", "paper"]) == 0
    out = capsys.readouterr().out
    assert f"imported (from {HUB_NAME}), not trained  to import" in out and "base (imported)" in out
    assert not [line for line in out.splitlines() if line.strip().startswith("base ") and " it x " in line]

    from ddps.orchestration.estimates import training_seconds, trial_seconds
    from ddps.orchestration.plan import load_experiment, plan
    p = plan(load_experiment(ROOT / "experiments" / "table3a.yaml"), "smoke", {"base.pretrained": HUB_NAME})
    bases = [t for t in p.trainings if t.step == "base"]
    assert bases and all(t.imported == HUB_NAME and t.iters == 0 for t in bases)
    assert all(training_seconds(t) == 0 == trial_seconds(t) for t in bases)


def test_the_pipelines_base_step_imports_a_folder_once_and_reuses_it(tmp_path, monkeypatch, tiny_fashion):
    import ddps.orchestration.ray_train as ray_train
    from ddps.orchestration.pipeline import Pipeline
    from ddps.orchestration.plan import chain_of

    def no_training(*args, **kwargs):
        raise AssertionError("a training started")
    monkeypatch.setattr(ray_train, "run", no_training)
    monkeypatch.setattr(train_base, "train", no_training)
    folder = tmp_path / "segformer-b0"
    _saved_segformer(folder)
    data = {"data.root": str(tiny_fashion)}
    cfg = resolve("smoke", overrides={"base.pretrained": str(folder), **data})
    chain = chain_of(cfg)
    base = chain[0]
    assert base.imported == str(folder) and base.iters == 0 and base.path.name.startswith("base-imported-")
    # the hash covers what was imported, not the training settings
    assert chain_of(resolve("smoke", overrides={"base.pretrained": str(folder), "train_base.iters": 7,
                                                "base.backbone": "mit_b3", **data}))[0].hash == base.hash
    assert base.hash == train_base.base_hash(cfg) and source_identity(str(folder)).startswith("sha256:")

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first = Pipeline(cfg, tracking_uri=uri, experiment="imported", log=lambda line: None)
    first.parent = first.tracker.start_run(first.experiment_id, "parent", {})  # what Pipeline.run starts
    run_id = first.train(chain, 0)
    assert base.path.exists()
    payload = read_checkpoint(base.path)
    assert payload["hash"] == base.hash and payload["metrics"]["images_seen"] == 0
    run = first.tracker.client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags[names.STEP] == "base"
    assert run.data.tags[names.IMPORTED_FROM] == str(folder) and run.data.tags[names.CONTENT_HASH] == base.hash
    assert run.data.params["base.pretrained"] == str(folder)

    mtime = base.path.stat().st_mtime_ns
    second = Pipeline(cfg, tracking_uri=uri, experiment="imported", log=lambda line: None, parent=first.parent)
    assert second.train(chain_of(cfg), 0) == run_id and base.path.stat().st_mtime_ns == mtime

    # other weights in the same folder: another base
    _saved_segformer(folder, seed=1)
    os.utime(folder / "model.safetensors", ns=(mtime + 10**9, mtime + 10**9))
    assert chain_of(cfg)[0].hash != base.hash
