"""Importing the official DDPS checkpoints: their DDPS head, renamed into ours, gives the logits of a reference
written in the tests from their layout (tests/official_reference.py), at their time index, with their noise and
their step list."""
from __future__ import annotations

import pytest
import torch

from official_reference import Head
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


def test_the_plain_keys_are_the_ema_weights_and_ema_copies_the_raw_ones():
    head = official_head("cityscapes-b0 (inferred)")
    plain = {"decode_head." + k: v for k, v in head.state_dict().items()}
    raw = {"ema_" + k.replace(".", "_"): v + 1 for k, v in plain.items()}
    kept, copies = split_ema({**plain, **raw})
    assert set(kept) == set(plain) == set(copies)
    key = "decode_head.unet.init_conv.weight"
    assert torch.equal(kept[key], plain[key]) and torch.equal(copies[key], plain[key] + 1)
    assert split_ema(plain)[1] is None


def test_the_codec_scores_the_classes_and_the_process_diffuses_every_state():
    cfg = resolve("paper", None, {"diffusion.ignore_state": True, "diffusion.steps": 20, "infer.steps": 20,
                                  "denoiser.size": "XXS"})
    codec = build_codec(cfg)
    logits = torch.arange(4.0)[None, :, None, None].expand(1, 4, 2, 2)
    assert codec.classes(logits).shape[1] == 3 and float(codec.classes(logits)[0, 0, 0, 0]) == 1.0
    assert torch.equal(codec.states(torch.tensor([[[0, 2]]])), torch.tensor([[[1, 3]]]))
    assert build_process(cfg, 150).num_classes == 151
