"""MMSeg's SegFormer as a base (mmseg-segformer): its layout, MMSeg checkpoints read weights-only and converted.

The reference (tests/mmseg_reference.py) is written from MMSeg's definition of MixVisionTransformer + SegformerHead (module names
and data flow as mmseg/models/backbones/mit.py and decode_heads/segformer_head.py define them), not from
ddps's code: a file saved from it must give ddps's base the same features and logits.
"""
import numpy as np
import pytest
import torch
from torch import nn

from mmseg_reference import EncoderDecoder, mmcv_file, randomize
from ddps.errors import CheckpointError
from ddps.segmentors import BaseSegmentor, SegmentorSpec, create_base
from ddps.segmentors.mmseg import (base_from_mmseg, base_from_mmseg_file, infer_variant, mmseg_mit_to_smp,
                                   mmseg_to_base_state)


@pytest.fixture(scope="module")
def reference():
    return randomize(EncoderDecoder("mit_b0", channels=32, num_classes=5)).eval()


def ddps_outputs(base: BaseSegmentor, x):
    with torch.no_grad():
        return base.double().eval()(x)


def reference_outputs(ref: EncoderDecoder, x):
    with torch.no_grad():
        return ref.double()(x)


# ---- (a) the conversion against the reference --------------------------------------------------------

def test_mmseg_file_gives_the_reference_features_and_logits(tmp_path, reference):
    path = mmcv_file(tmp_path / "segformer.pth", reference.state_dict())
    base = base_from_mmseg_file(path, num_classes=5)
    assert base.spec == SegmentorSpec("mmseg-segformer", "mit_b0", 5, feature_channels=32)
    assert base.pad_multiple == 16
    x = torch.randn(2, 3, 64, 48, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    features, logits = reference_outputs(reference, x)
    out = ddps_outputs(base, x)
    assert out.features.shape == (2, 32, 16, 12) and out.logits.shape == (2, 5, 16, 12)
    torch.testing.assert_close(out.features, features, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(out.logits, logits, rtol=1e-9, atol=1e-9)


def _swap_q_k(state):  # what a conversion that read in_proj as k, q, v would compute
    key = "backbone.layers.1.1.0.attn.attn.in_proj_weight"
    c = state[key].shape[0] // 3
    state[key] = torch.cat([state[key][c:2 * c], state[key][:c], state[key][2 * c:]])


def _reverse_stages(state):  # a head concatenating the stages 3, 2, 1, 0
    key = "decode_head.fusion_conv.conv.weight"
    state[key] = torch.cat(list(state[key].chunk(4, dim=1))[::-1], dim=1)


@pytest.mark.parametrize("mutate", [_swap_q_k, _reverse_stages])
def test_the_comparison_fails_for_a_wrong_conversion(reference, mutate):
    """The reference test can fail: a q/k mix-up or another stage order changes the outputs."""
    state = {k: v.clone() for k, v in reference.state_dict().items()}
    mutate(state)
    base = base_from_mmseg(state, "mutated", num_classes=5)
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    features, _ = reference_outputs(reference, x)
    assert not torch.allclose(ddps_outputs(base, x).features, features, rtol=1e-4, atol=1e-4)


def test_layernorm_eps_is_mmseg_s(reference):
    """smp builds the patch-embedding and spatial-reduction norms with eps 1e-5; MMSeg's MiT uses 1e-6."""
    base = base_from_mmseg(reference.state_dict(), "reference")
    eps = {m.eps for m in base.encoder.modules() if isinstance(m, nn.LayerNorm)}
    assert eps == {1e-6}


def test_backbone_keys_map_to_smp_s(reference):
    state = reference.state_dict()
    smp_state = mmseg_mit_to_smp(state)
    c = state["backbone.layers.0.1.0.attn.attn.in_proj_weight"].shape[1]
    assert torch.equal(smp_state["block1.0.attn.q.weight"], state["backbone.layers.0.1.0.attn.attn.in_proj_weight"][:c])
    assert smp_state["block1.0.attn.kv.bias"].shape == (2 * c,)
    assert smp_state["block1.0.mlp.fc1.weight"].shape == (4 * c, c)  # a 1x1 conv as a Linear
    assert smp_state["block1.0.mlp.dwconv.dwconv.weight"].shape == (4 * c, 1, 3, 3)
    assert "block4.0.attn.sr.weight" not in smp_state and "block1.0.attn.sr.weight" in smp_state  # sr 1 vs 8
    assert set(smp_state) == set(create_base("segformer", "mit_b0", 5).encoder.state_dict())


# ---- (b) the variant from the shapes ------------------------------------------------------------------

def test_variant_and_classes_are_inferred_from_the_shapes():
    with torch.device("meta"):
        b2 = EncoderDecoder("mit_b2", channels=256, num_classes=150).state_dict()
        b1 = EncoderDecoder("mit_b1", channels=256, num_classes=150).state_dict()
        b0 = EncoderDecoder("mit_b0", channels=256, num_classes=150).state_dict()
    assert infer_variant(b0) == "mit_b0" and infer_variant(b1) == "mit_b1" and infer_variant(b2) == "mit_b2"
    # every key of the b2 file lands on a key of the same shape in ddps's mit_b2 base
    from ddps.segmentors import check_state
    check_state(create_base("mmseg-segformer", "mit_b2", 150), mmseg_to_base_state(b2), "b2")


def test_shapes_of_no_variant_are_one_line(reference):
    state = dict(reference.state_dict())
    state.pop("backbone.layers.3.1.1.norm1.weight")  # stage 4 keeps a key of its block 1: depth still 2
    for k in [k for k in state if k.startswith("backbone.layers.2.1.1.")]:
        del state[k]  # stage 3 has one block: depths (2, 2, 1, 2)
    with pytest.raises(CheckpointError, match=r"^x\.pth: MiT embed dims \(32, 64, 160, 256\) and depths "
                                              r"\(2, 2, 1, 2\) .* fit no variant of mit_b0.*mit_b5$"):
        base_from_mmseg(state, "x.pth")


# ---- (c) what is refused --------------------------------------------------------------------------------

class Foreign:
    pass


@pytest.mark.reliability(kind="security", case="MMSeg checkpoint with a foreign class in its meta")
def test_a_foreign_class_in_the_meta_is_refused_by_name(tmp_path, reference):
    path = mmcv_file(tmp_path / "evil.pth", reference.state_dict(), {"hook": Foreign()})
    with pytest.raises(CheckpointError) as err:
        base_from_mmseg_file(path)
    message = str(err.value)
    assert "\n" not in message and "evil.pth" in message and "test_mmseg_segformer.Foreign" in message
    assert "refused (weights-only loading)" in message


@pytest.mark.reliability(kind="bad_input", case="MMSeg checkpoint with unknown, missing or misshapen keys")
def test_unknown_missing_and_misshapen_keys_are_one_line(tmp_path, reference):
    state = dict(reference.state_dict())
    for key, pattern in (("backbone.layers.0.1.0.attn.extra.weight", r"backbone\.layers\.0\.1\.0\.attn\.extra\.weight"),
                         ("auxiliary_head.conv_seg.weight", r"auxiliary_head\.conv_seg\.weight")):
        path = mmcv_file(tmp_path / "odd.pth", {**state, key: torch.zeros(1)})
        with pytest.raises(CheckpointError, match=rf"^MMSeg checkpoint .*odd\.pth: {pattern} is not a key of"):
            base_from_mmseg_file(path)
    path = mmcv_file(tmp_path / "short.pth", {k: v for k, v in state.items() if k != "decode_head.convs.2.bn.bias"})
    with pytest.raises(CheckpointError, match=r"short\.pth does not fit: 1 missing keys \(e\.g\. decoder\.convs\.2\.bn\.bias\)$"):
        base_from_mmseg_file(path)
    path = mmcv_file(tmp_path / "wide.pth", {**state, "backbone.layers.0.2.weight": torch.zeros(7)})
    with pytest.raises(CheckpointError, match=r"wide\.pth does not fit: 1 shape mismatches \(e\.g\. encoder\.norm1\.weight"):
        base_from_mmseg_file(path)
    with pytest.raises(CheckpointError, match=r"predicts 5 classes but 150 are expected"):
        base_from_mmseg_file(mmcv_file(tmp_path / "k.pth", state), num_classes=150)


@pytest.mark.reliability(kind="bad_input", case="MMSeg checkpoint missing or truncated")
def test_missing_and_truncated_files_are_one_line(tmp_path, reference):
    with pytest.raises(CheckpointError, match=r"^MMSeg checkpoint .*nope\.pth does not exist$"):
        base_from_mmseg_file(tmp_path / "nope.pth")
    path = mmcv_file(tmp_path / "cut.pth", reference.state_dict())
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=r"^MMSeg checkpoint .*cut\.pth is unreadable \(") as err:
        base_from_mmseg_file(path)
    assert "\n" not in str(err.value)


def test_numpy_1_names_of_the_meta_are_read(tmp_path, reference):
    """Files written under numpy 1.x name its reconstructors numpy.core.multiarray.*: allowed as well."""
    import zipfile
    from ddps.checkpoint_io import read_foreign_checkpoint
    new = mmcv_file(tmp_path / "new.pth", {"w": torch.ones(2)})
    old = tmp_path / "old.pth"
    with zipfile.ZipFile(new) as zin, zipfile.ZipFile(old, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info)
            if info.filename.endswith("data.pkl"):
                assert b"numpy._core.multiarray" in data
                data = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
            zout.writestr(info, data)
    payload = read_foreign_checkpoint(old, "MMSeg checkpoint")
    assert payload["meta"]["iter"] == 160000 and payload["meta"]["mean"].shape == (3,)
    assert torch.equal(payload["state_dict"]["w"], torch.ones(2))


# ---- (d) the architecture through the engine ----------------------------------------------------------

def test_mmseg_segformer_trains_and_pads_to_16(tmp_path):
    from dataclasses import replace

    from ddps.config import resolve
    from ddps.data import build_dataset
    from ddps.engine.evaluate import evaluate_base
    from ddps.engine.features import base_batch
    from ddps.engine.reporter import NullReporter
    from ddps.engine.train_base import fit
    from ddps.refiner.codecs import ResizeCodec
    from ddps.segmentors.checkpoint import load_base

    cfg = resolve("smoke", overrides={"base.arch": "mmseg-segformer", "train_base.iters": 3, "train_base.warmup_iters": 1,
                                      "train_base.eval_every": 3, "train_base.log_every": 1})
    reporter = NullReporter()
    path = fit(cfg, reporter, checkpoint=tmp_path / "b.pt")
    assert all(np.isfinite(m["loss"]) for _, m in reporter.history if "loss" in m)
    model, payload = load_base(path, num_classes=11)
    assert payload["spec"]["arch"] == "mmseg-segformer" and model.pad_multiple == 16

    seen = []
    model.register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape[-2:])))
    val = build_dataset(cfg.data, "val")
    scores = evaluate_base(model, val, cfg.eval, multiscale=True)  # smoke scales 0.5, 1: 16 x 16 and 32 x 32
    assert 0 <= scores.mIoU <= 100 and set(seen) == {(32, 32)}  # 16 x 16 is padded to MiT's smallest input
    seen.clear()
    wide = evaluate_base(model, val, replace(cfg.eval, scales=(1.5,)), multiscale=True)  # 48 x 48
    assert set(seen) == {(48, 48)} and 0 <= wide.mIoU <= 100  # a multiple of 16: not padded to 64
    seen.clear()
    batch = base_batch(model, torch.randn(2, 3, 40, 56), torch.zeros(2, 40, 56, dtype=torch.long), ResizeCodec(4))
    assert seen == [(48, 64)]  # padded to multiples of 16, not to (64, 64)
    assert batch.features.shape[-2:] == (10, 14)


def test_pad_to_16_and_to_32_as_before():
    from ddps.segmentors.inference import pad
    for h, w in ((32, 32), (33, 64), (40, 56), (17, 95), (64, 100)):
        x = torch.zeros(1, 3, h, w)
        assert pad(x).shape[-2:] == (-(-h // 32) * 32, -(-w // 32) * 32)  # the smp bases: unchanged
    assert pad(torch.zeros(1, 3, 40, 56), 16).shape[-2:] == (48, 64)
    assert pad(torch.zeros(1, 3, 16, 48), 16).shape[-2:] == (32, 48)  # MiT's smallest input is 32
