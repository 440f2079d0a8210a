"""Importing the official DDPS checkpoints: their DDPS head, renamed into ours, gives the logits of a reference
written in the tests from their layout (tests/official_reference.py), at their time index, with their noise and
their step list."""
from __future__ import annotations

import contextlib
import io
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from messages import one_line
from mmseg_reference import EncoderDecoder, mmcv_file, randomize
from official_reference import Head
from ddps.cli import main
from ddps.config import from_flat
from ddps.data.classes import ADE20K
from ddps.refiner.checkpoint import load_refiner
from ddps.segmentors.checkpoint import read_checkpoint
from ddps.segmentors.inference import pad
from ddps.config import resolve
from ddps.refiner.build import build_codec, build_denoiser, build_process
from ddps.refiner.official import OfficialLayout, denoiser_state, refiner_overrides, split_ema, unet_key
from ddps.refiner.sampler import refine, step_times

# (dim, out_dim, mults, states, embed, T): the ADE20K SegFormer-B2 multi-step layout from the official config;
# the Cityscapes ones inferred from the published parameter counts (MiT-B0 15.1 M = SegFormer-B0 + UNet-S with
# the head's default out_dim 256; MiT-B2 65.5 M = SegFormer-B2 + UNet-M) and the paper's "20 training steps for
# small-size models and 100 for the others"
LAYOUTS = {
    "ade20k-b2 (official config)": (256, 256, (1, 1, 1), 151, 16, 100),
    "cityscapes-b0 (inferred)": (128, 256, (1, 1, 1), 20, 16, 20),
    "cityscapes-b2 (inferred)": (256, 256, (1, 1, 1), 20, 16, 100),
}


class Foreign:
    """A class an mmcv meta must not bring in."""


def randomised(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Perturb every parameter (norm gains included) so that a wrongly mapped key cannot go unnoticed."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return module.eval()


def official_head(layout: str, seed: int = 0) -> Head:
    dim, out_dim, mults, states, embed, T = LAYOUTS[layout]
    return randomised(Head(dim, out_dim, 256 + embed, mults, states, embed, T), seed)


def imported_denoiser(head: Head, state: dict):
    dim, out_dim, mults, states, embed, T = next(v for v in LAYOUTS.values() if v[0] == head.unet.init_conv.out_channels
                                                and v[3] == head.num_states and v[5] == head.T)
    size = {64: "T", 128: "S", 256: "M"}[dim]
    layout = OfficialLayout(size, out_dim, 256 + embed, embed, states, T,
                            "ade20k" if states == 151 else "cityscapes", tuple(f"c{i}" for i in range(states - 1)))
    cfg = resolve("paper", None, {k: v for k, v in refiner_overrides(layout, "mit_b0").items()
                                  if not k.startswith("base.arch")})
    process = build_process(cfg, states - 1)
    denoiser = build_denoiser(cfg, states - 1, 256, process)
    denoiser.load_state_dict(denoiser_state(state, "test"))
    return cfg, process, denoiser.eval()


def test_their_unet_keys_map_one_to_one_onto_ours():
    head = official_head("cityscapes-b0 (inferred)")
    state = {"decode_head." + k: v for k, v in head.state_dict().items()}
    ours = denoiser_state(state, "test")
    _, _, denoiser = imported_denoiser(head, state)
    assert set(ours) == set(denoiser.state_dict())  # strict: nothing left over, nothing missing
    assert unet_key("downs.0.2.fn.norm.g") == "downs.0.2.norm.gain"
    assert unet_key("final_res_block.mlp.1.weight") == "final_block.time_proj.1.weight"


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_every_call_gives_the_reference_logits_at_their_time_index_and_noise(layout):
    torch.manual_seed(0)
    head = official_head(layout)
    state = {"decode_head." + k: v for k, v in head.state_dict().items()}
    cfg, process, denoiser = imported_denoiser(head, state)
    T, K = head.T, cfg.infer.steps
    assert K == 20 and cfg.infer.times == "official"
    features = torch.randn(1, 256, 8, 8)

    fed, seen_t = [], []   # what our sampler feeds the network: masks and the UNet's time input
    hooks = [denoiser.embed.register_forward_pre_hook(lambda m, args: fed.append(args[0].clone())),
             denoiser.unet.register_forward_pre_hook(lambda m, args: seen_t.append(args[1].clone()))]
    with torch.no_grad():
        trajectory = refine(denoiser, process, features, K, generator=torch.Generator().manual_seed(1),
                            times=cfg.infer.times)
    for h in hooks:
        h.remove()

    their_steps = head.timesteps(K)
    assert len(their_steps) == K + (K < T) == len(trajectory.logits)    # K calls, then the last at i = T − 1
    assert [int(t[0]) for t in seen_t] == their_steps                  # the UNet sees their index i = T − t
    assert trajectory.times == [T - i for i in their_steps]
    assert trajectory.times == step_times(T, K, "official")
    with torch.no_grad():
        previous, kept, expected, variance = None, 0, 0.0, 0.0
        for k, (i, mask, ours) in enumerate(zip(their_steps, fed, trajectory.logits)):
            reference = head.call(features, mask, i)
            # float32 sums in another order: equal to ~1e-6 of the logits' scale
            torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5 * float(reference.abs().max()))
            if previous is not None:
                # their noise: q(x_n | argmax of the previous prediction) at n = T − 1 − i over all states; ours
                # gives the same probabilities at t = n + 1 and the fed mask keeps the argmax as often as it says
                x0 = previous.argmax(1)
                theirs = head.q_pred_probs(x0, i)
                torch.testing.assert_close(process.q_probs(x0, T - i).float(), theirs, rtol=1e-4, atol=1e-6)
                keep = theirs.gather(1, x0[:, None])                        # (B, 1, h, w): P(x_n = x_0)
                expected, variance = expected + float(keep.sum()), variance + float((keep * (1 - keep)).sum())
                kept += int((mask == x0).sum())
            previous = reference
    # over every re-noising together, the fed masks keep the argmax as often as their noise says (4 sigma)
    assert abs(kept - expected) < 4 * variance ** 0.5, (kept, expected, variance ** 0.5)
    assert fed[0].max() > head.num_states // 2  # the first mask is uniform over every state, the ignore state too


@pytest.mark.parametrize("T, K", [(100, 20), (50, 20), (100, 30), (20, 20), (100, 1), (7, 3)])
def test_the_official_step_list_is_theirs_for_any_k(T, K):
    their_steps = Head(8, 8, 8, (1,), 3, 2, T).timesteps(K) if T > 1 else [0]
    assert step_times(T, K, "official") == [T - i for i in their_steps]
    assert step_times(T, K, "even") == [T - k * (T // K) for k in range(K)]


def test_the_plain_keys_are_the_ema_weights_and_ema_copies_the_raw_ones():
    head = official_head("cityscapes-b0 (inferred)")
    plain = {"decode_head." + k: v for k, v in head.state_dict().items()}
    raw = {"ema_" + k.replace(".", "_"): v + 1 for k, v in plain.items()}
    kept, copies = split_ema({**plain, **raw})
    assert set(kept) == set(plain) == set(copies)
    key = "decode_head.unet.init_conv.weight"
    assert torch.equal(kept[key], plain[key]) and torch.equal(copies[key], plain[key] + 1)
    assert split_ema(plain)[1] is None


def test_a_key_the_import_cannot_map_is_refused_in_one_line():
    from messages import one_line
    from ddps.errors import CheckpointError
    from ddps.refiner.official import check_keys
    head = official_head("cityscapes-b0 (inferred)")
    state = {"decode_head." + k: v for k, v in head.state_dict().items()}
    check_keys({**state, "backbone.layers.0.0.projection.weight": torch.zeros(1)}, "test")  # all known
    with pytest.raises(CheckpointError) as e:
        check_keys({**state, "decode_head.aux_head.weight": torch.zeros(1)}, "ddps.pth")
    assert "cannot be mapped (e.g. decode_head.aux_head.weight)" in one_line(e.value)


def test_the_codec_scores_the_classes_and_the_process_diffuses_every_state():
    cfg = resolve("paper", None, {"diffusion.ignore_state": True, "diffusion.steps": 20, "infer.steps": 20,
                                  "denoiser.size": "XXS"})
    codec = build_codec(cfg)
    logits = torch.arange(4.0)[None, :, None, None].expand(1, 4, 2, 2)
    assert codec.classes(logits).shape[1] == 3 and float(codec.classes(logits)[0, 0, 0, 0]) == 1.0
    assert torch.equal(codec.states(torch.tensor([[[0, 2]]])), torch.tensor([[[1, 3]]]))
    assert build_process(cfg, 150).num_classes == 151


# ---- a whole official file: written in the published layout, imported by the CLI, evaluated ----------------

def write_official_ade20k_b2(folder: Path) -> tuple[Path, Path, object, Head]:
    """The published ADE20K SegFormer-B2 layout: an mmcv checkpoint (meta with numpy values, state_dict with the
    MMSeg backbone and head convs, the DDPS head, the EMA hook's ema_* copies, optimizer) and MMSeg's base
    checkpoint it was trained on (with its classifier)."""
    base = randomize(EncoderDecoder("mit_b2", channels=256, num_classes=150), seed=2).eval()
    head = official_head("ade20k-b2 (official config)", seed=3)
    frozen = {k: v for k, v in base.state_dict().items() if not k.startswith("decode_head.conv_seg.")}
    plain = {**frozen, **{"decode_head." + k: v for k, v in head.state_dict().items()}}
    # saved at an evaluation interval: EMA weights under the plain keys, the raw ones in ema_* (+ 0.01 here)
    raw = {"ema_" + k.replace(".", "_"): (v + 0.01 if k.startswith("decode_head.unet.") else v.clone())
           for k, v in plain.items()}
    meta = {"CLASSES": ("background",) + ADE20K, "iter": np.int64(144000), "hook_msgs": {"best_score": np.float64(0.4973)},
            "mmcv_version": "1.7.0", "env_info": "..."}
    ddps_file = folder / "best_mIoU_iter_144000.pth"
    torch.save({"meta": meta, "state_dict": {**plain, **raw}, "optimizer": {"state": {}, "param_groups": []}},
               ddps_file)
    base_file = mmcv_file(folder / "segformer_mit-b2_512x512_160k_ade20k.pth", base.state_dict())
    return ddps_file, base_file, base, head


def write_ade20k_folder(root: Path, n: int = 2, size: int = 64) -> Path:
    g = np.random.default_rng(0)
    for split in ("validation",):
        (root / "images" / split).mkdir(parents=True)
        (root / "annotations" / split).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(g.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(
                root / "images" / split / f"ADE_val_{i:08d}.jpg")
            label = np.zeros((size, size), np.uint8)          # 0: "other", ignored (reduce_zero_label)
            label[: size // 2] = 1 + i                          # wall / building
            label[size // 2:, : size // 2] = 3                  # sky
            Image.fromarray(label).save(root / "annotations" / split / f"ADE_val_{i:08d}.png")
    return root


def ddps_cli(*args) -> subprocess.CompletedProcess:
    """``ddps ARGS`` run in this process (the CLI's own main): its exit code, stdout and stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def test_an_official_ade20k_b2_file_imports_and_evaluates_as_the_reference(tmp_path):
    ddps_file, base_file, ref_base, head = write_official_ade20k_b2(tmp_path)
    out = ddps_cli("import", "official", ddps_file, "--base", base_file, "--out", tmp_path / "imported")
    assert out.returncode == 0, out.stderr
    print(out.stdout)
    assert "ade20k, SegFormer mit_b2 base, UNet-M (out 256), T = 100, 151 states, EMA + raw weights" in out.stdout
    refiner_file = tmp_path / "imported" / "best_mIoU_iter_144000-refiner.pt"
    assert (tmp_path / "imported" / "best_mIoU_iter_144000-base.pt").is_file() and refiner_file.is_file()

    # the imported base and denoiser against the references, on one image of the folder's size
    denoiser, process, base, payload = load_refiner(refiner_file)
    cfg = from_flat(payload["config"])
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        features, logits = ref_base(x)
        ours = base(pad(x, base.pad_multiple))
        torch.testing.assert_close(ours.features, features, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(ours.logits, logits, rtol=1e-4, atol=1e-4)
        mask = torch.randint(0, 151, (1, 16, 16), generator=torch.Generator().manual_seed(5))
        for i in (0, 45, 99):                                  # their time index; the EMA weights by default
            reference = head.call(features, mask, i)
            got = denoiser(features, mask, torch.full((1,), cfg.diffusion.steps - i))
            torch.testing.assert_close(got, reference, rtol=1e-5, atol=1e-5 * float(reference.abs().max()))
        raw_denoiser = load_refiner(refiner_file, use_ema=False)[0]  # the ema_* copies: the raw weights
        assert torch.equal(raw_denoiser.unet.init_conv.weight, head.unet.init_conv.weight + 0.01)

    data = write_ade20k_folder(tmp_path / "ADEChallengeData2016")
    out = ddps_cli("eval", refiner_file, "--json", "--set", f"data.root={data}", "--set", "data.test_resize=0")
    assert out.returncode == 0, out.stderr
    print(out.stdout)
    record = json.loads(out.stdout)
    assert record["images"] == 2 and len(record["steps"]) == 21 and record["steps"][-1]["t"] == 1
    assert all(0 <= s["mIoU"] <= 100 for s in [record["base"], *record["steps"]])
    image = data / "images" / "validation" / "ADE_val_00000000.jpg"
    out = ddps_cli("refine", image, "--checkpoint", refiner_file, "--out", tmp_path / "masks",
                   "--set", "data.test_resize=0")
    assert out.returncode == 0, out.stderr
    mask = np.array(Image.open(tmp_path / "masks" / "ADE_val_00000000.png"))
    assert mask.shape == (64, 64) and mask.max() < 150 and (tmp_path / "masks" / "ADE_val_00000000-strip.png").is_file()

    # the imported base is a base like any other: named as base.pretrained, the base step imports it
    base_file = tmp_path / "imported" / "best_mIoU_iter_144000-base.pt"
    out = ddps_cli("train-base", "--preset", "paper", "--set", f"base.pretrained={base_file}",
                   "--set", f"data.root={data}", "--out", tmp_path / "again.pt")
    assert out.returncode == 0, out.stderr
    again = read_checkpoint(tmp_path / "again.pt")
    assert again["imported_from"]["kind"] == "ddps" and again["history"] == []
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in again["model"].items())


def test_a_foreign_class_in_the_meta_and_a_deeplab_head_are_refused_in_one_line(tmp_path):
    torch.save({"meta": {"obj": Foreign()}, "state_dict": {}}, tmp_path / "foreign.pth")
    out = ddps_cli("import", "official", tmp_path / "foreign.pth", "--base", tmp_path / "foreign.pth",
                   "--out", tmp_path / "o")
    assert out.returncode == 2 and one_line(out.stderr.strip()) and "Foreign" in out.stderr and "refused" in out.stderr
    head = official_head("cityscapes-b0 (inferred)")
    deeplab = {"backbone.stem.0.weight": torch.zeros(32, 3, 3, 3), "decode_head.image_pool.1.conv.weight":
               torch.zeros(512, 2048, 1, 1), **{"decode_head." + k: v for k, v in head.state_dict().items()}}
    torch.save({"meta": {}, "state_dict": deeplab}, tmp_path / "deeplab.pth")
    out = ddps_cli("import", "official", tmp_path / "deeplab.pth", "--base", tmp_path / "deeplab.pth",
                   "--out", tmp_path / "o")
    assert out.returncode == 2 and one_line(out.stderr.strip()) and "not public" in out.stderr
    out = ddps_cli("import", "official", tmp_path / "deeplab.pth", "--out", tmp_path / "o")
    assert out.returncode == 2 and one_line(out.stderr.strip()) and "--base" in out.stderr


def test_training_in_the_official_layout_is_refused_before_any_compute(tmp_path):
    from ddps.errors import ConfigError
    from ddps.orchestration.plan import load_experiment, plan
    root = Path(__file__).resolve().parents[1]
    out = ddps_cli("train", "--preset", "smoke", "--set", "diffusion.ignore_state=true", "--out", tmp_path)
    assert out.returncode == 2 and "training with it is not supported" in one_line(out.stderr.strip())
    assert not any(tmp_path.iterdir())
    with pytest.raises(ConfigError):
        plan(load_experiment(root / "experiments" / "table3a.yaml"), "smoke", {"diffusion.ignore_state": True})


def test_a_cell_label_may_hold_a_colon():
    from ddps.orchestration.plan import parse_cell_set
    assert parse_cell_set(["test_steps=2 (official list: 3):infer.cfg_scale=0.4"]) == [
        ("test_steps", "2 (official list: 3)", {"infer.cfg_scale": 0.4})]
