"""Base segmentors from smp: one interface, features at 1/4, freezing, checkpoints and their errors."""
import pytest
import torch

from ddps.errors import CheckpointError, ConfigError
from ddps.segmentors import BACKBONES, create_base, load_state
from ddps.segmentors.checkpoint import load_base, save_base

ALL = [(arch, bb) for arch, bbs in BACKBONES.items() for bb in bbs]


@pytest.mark.parametrize("arch, backbone", ALL)
def test_every_base_gives_logits_and_features_at_a_quarter(arch, backbone):
    torch.manual_seed(0)
    model = create_base(arch, backbone, num_classes=7, feature_channels=48).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 96))
    assert out.logits.shape == (1, 7, 16, 24)
    assert out.features.shape == (1, 48, 16, 24) and model.feature_channels == 48
    # the logits are the classifier applied to exactly these features
    assert torch.allclose(model.classifier(out.features), out.logits)
    assert model.segment(torch.randn(1, 3, 64, 96)).shape == (1, 7, 64, 96)


def test_segformer_b0_size_is_the_known_one():
    # MiT-B0 encoder 3.3M + all-MLP decoder; smp's SegFormer-B0 with a 256-channel head is 3.7M
    model = create_base("segformer", "mit_b0", 150)
    assert 3.6e6 < model.num_params() < 3.9e6


def test_freeze_stops_gradients_and_holds_batchnorm_statistics():
    model = create_base("deeplabv3plus", "mobilenet_v2", 3, feature_channels=32).freeze()
    bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    before = bn.running_mean.clone()
    model.train()  # a caller switching to train mode must not un-freeze the norm layers
    assert not model.training and not bn.training
    model(torch.randn(2, 3, 64, 64))
    assert torch.equal(bn.running_mean, before)
    assert all(not p.requires_grad for p in model.parameters())


@pytest.mark.reliability(kind="bad_input", case="unknown architecture or backbone")
def test_unknown_architecture_and_backbone_list_the_choices():
    with pytest.raises(ConfigError, match=r"unknown base architecture 'unet'; choose from: deeplabv3plus, mmseg-segformer, segformer"):
        create_base("unet", "mit_b0", 3)
    with pytest.raises(ConfigError, match=r"unknown backbone 'mit_b9' for segformer; choose from: mit_b0, .*mit_b5"):
        create_base("segformer", "mit_b9", 3)


def test_checkpoint_round_trip(tmp_path):
    model = create_base("segformer", "mit_b0", 5, feature_channels=32)
    path = save_base(tmp_path / "b.pt", model, config={"preset": "smoke"}, class_names="abcde",
                     metrics={"val_mIoU": 1.0}, history=[], content_hash="x")
    loaded, payload = load_base(path, num_classes=5)
    x = torch.randn(1, 3, 32, 32)
    assert torch.equal(model.eval()(x).logits, loaded.eval()(x).logits)
    assert payload["metrics"] == {"val_mIoU": 1.0} and payload["class_names"] == list("abcde")
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary file left behind


@pytest.mark.reliability(kind="bad_input", case="base checkpoint with other classes")
def test_checkpoint_with_other_classes_than_the_dataset(tmp_path):
    model = create_base("segformer", "mit_b0", 5, feature_channels=32)
    path = save_base(tmp_path / "b.pt", model, config={}, class_names="abcde", metrics={}, history=[],
                     content_hash="x")
    with pytest.raises(CheckpointError, match="predicts 5 classes but the dataset has 11"):
        load_base(path, num_classes=11)


@pytest.mark.reliability(kind="bad_input", case="state dict with missing / unexpected / mismatched keys")
def test_user_weights_missing_unexpected_and_mismatched_keys(tmp_path):
    model = create_base("segformer", "mit_b0", 5, feature_channels=32)
    state = model.state_dict()
    state.pop("classifier.weight")
    state["extra.weight"] = torch.zeros(1)
    state["classifier.bias"] = torch.zeros(9)
    torch.save({"state_dict": state}, tmp_path / "user.pth")
    with pytest.raises(CheckpointError, match=r"user\.pth does not fit: 1 missing keys \(e\.g\. classifier\.weight\); "
                                              r"1 unexpected keys \(e\.g\. extra\.weight\); 1 shape mismatches"):
        load_state(create_base("segformer", "mit_b0", 5, feature_channels=32), tmp_path / "user.pth", "weights")


def test_local_encoder_weights_are_loaded(tmp_path):
    donor = create_base("deeplabv3plus", "mobilenet_v2", 3, feature_channels=16)
    torch.save(donor.encoder.state_dict(), tmp_path / "enc.pth")
    model = create_base("deeplabv3plus", "mobilenet_v2", 3, feature_channels=16, encoder_weights=str(tmp_path / "enc.pth"))
    for a, b in zip(donor.encoder.state_dict().values(), model.encoder.state_dict().values()):
        assert torch.equal(a, b)


@pytest.mark.reliability(kind="bad_input", case="truncated or missing checkpoint")
def test_truncated_and_missing_checkpoint_files(tmp_path):
    model = create_base("segformer", "mit_b0", 5, feature_channels=32)
    path = save_base(tmp_path / "b.pt", model, config={}, class_names="abcde", metrics={}, history=[],
                     content_hash="x")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"b\.pt fails its sha256 checksum"):  # ddps's own: a sidecar
        load_base(path)
    path.with_name("b.pt.sha256").unlink()  # a file from elsewhere, without one
    with pytest.raises(CheckpointError, match=r"b\.pt is unreadable"):
        load_base(path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_base(tmp_path / "nope.pt")
