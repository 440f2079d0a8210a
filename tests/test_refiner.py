"""The refiner pieces: codec, denoiser input/output, stride schedule, CFG, Algorithm 1's targets, the
learning-rate and EMA rules, the mask-reliance diagnostic, and config checks of the new sections."""
import pytest
import torch

from ddps.config import resolve
from ddps.config.schema import DENOISER_SIZES, TRANSITIONS
from ddps.denoiser import UNET_SIZES
from ddps.diffusion import TRANSITIONS as DIFFUSION_TRANSITIONS
from ddps.diffusion import BitDiffusion, MaskDiffusion
from ddps.diffusion.rng import SampleRNG
from ddps.engine.features import FeatureCache
from ddps.engine.evaluate_refiner import evaluate_refiner
from ddps.engine.train_refiner import EMA, refiner_lr, stage_hash, stage_iters, stages_of
from ddps.errors import ConfigError
from ddps.refiner.codecs import ResizeCodec
from ddps.refiner.model import MaskDenoiser
from ddps.refiner.objective import Batch, first_prediction, refiner_loss
from ddps.refiner.sampler import guided_logits, refine, step_times

K, C = 5, 8


def denoiser(mask_input="embed", states=K, bits=0, seed=0):
    torch.manual_seed(seed)
    return MaskDenoiser(feature_channels=C, num_classes=K, size="XXS", mask_input=mask_input, num_states=states,
                        bits=bits, dropout=0.0).eval()


def test_config_choices_match_the_registries():
    assert set(DENOISER_SIZES) == set(UNET_SIZES)
    assert tuple(TRANSITIONS) == tuple(DIFFUSION_TRANSITIONS)


@pytest.mark.reliability(kind="bad_input", case="refiner config (incl. test steps > train steps)")
@pytest.mark.parametrize("override, message", [
    ({"diffusion.steps": 10, "infer.steps": 20}, "infer.steps=20 is out of range.*cannot exceed train steps"),
    ({"diffusion.transition": "gaussian"}, "diffusion.transition='gaussian'.*choose from: mask, uniform, uniform\\+mask"),
    ({"denoiser.size": "XL"}, "denoiser.size='XL'.*choose from: .*L, M, S, T"),
    ({"train.target": "oracle"}, "train.target='oracle'.*choose from: first, gt, initial"),
    ({"train.accumulate": 3}, "train.accumulate=3.*must divide train.batch_size"),
    ({"train.unknown": 1}, "unknown config key 'train.unknown'"),
    ({"infer.cfg_scale": "lots"}, "infer.cfg_scale='lots' has the wrong type"),
])
def test_bad_refiner_configs_are_one_line_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        resolve("cpu", overrides=override)


def test_resize_codec_takes_cell_centres_and_decodes_to_the_label_size():
    labels = torch.arange(8 * 8).reshape(1, 8, 8)
    codec = ResizeCodec(4)
    assert codec.encode(labels).tolist() == [[[18, 22], [50, 54]]]  # rows/cols 2 and 6
    odd = torch.zeros(2, 9, 7, dtype=torch.long)
    assert codec.encode(odd).shape == (2, 3, 2) == (2, *codec.mask_size(9, 7))
    assert codec.decode(torch.randn(2, K, 3, 2), (9, 7)).shape == (2, K, 9, 7)


def test_denoiser_reads_features_mask_and_time():
    net = denoiser()
    f, x, t = torch.randn(2, C, 8, 8), torch.randint(0, K, (2, 8, 8)), torch.tensor([3, 3])
    out = net(f, x, t)
    assert out.shape == (2, K, 8, 8)
    assert not torch.allclose(out, net(f, (x + 1) % K, t))          # the mask input is live
    assert not torch.allclose(out, net(f, x, torch.tensor([9, 9])))  # the time input is live
    dropped = net(f, x, t, drop_cond=torch.tensor([True, False]))
    assert torch.allclose(dropped[0], net(torch.zeros_like(f), x, t)[0]) and torch.allclose(dropped[1], out[1])
    assert not net.embed.weight.requires_grad  # frozen random embedding by default (official code)
    head = denoiser("none")
    assert head(f).shape == (2, K, 8, 8)


def test_step_times_follow_the_stride_convention():
    assert step_times(20, 20) == list(range(20, 0, -1))
    assert step_times(20, 5) == [20, 16, 12, 8, 4]
    assert step_times(20, 1) == [20]
    assert step_times(20, 3) == [20, 14, 8]  # K does not divide T: the stride rounds down
    with pytest.raises(ValueError):
        step_times(10, 11)


def test_refine_visits_the_stride_times_and_returns_every_step():
    net, process = denoiser(), MaskDiffusion(K, 20)
    seen = []
    original = net.forward

    def spy(f, x, t, drop_cond=None):
        seen.append(int(t[0]))
        return original(f, x, t, drop_cond)
    net.forward = spy
    traj = refine(net, process, torch.randn(2, C, 6, 6), steps=5, generator=torch.Generator().manual_seed(0))
    assert seen == traj.times == [20, 16, 12, 8, 4] and len(traj.logits) == 5
    assert traj.final.shape == (2, K, 6, 6)


@pytest.mark.parametrize("renoise", ["free", "posterior", "fresh"])
def test_refine_is_deterministic_per_seed_for_every_renoising(renoise):
    net, process, f = denoiser(), MaskDiffusion(K, 10, transition="uniform+mask"), torch.randn(2, C, 6, 6)
    net = MaskDenoiser(feature_channels=C, num_classes=K, size="XXS", num_states=process.num_states).eval()
    a = refine(net, process, f, 5, renoise, generator=torch.Generator().manual_seed(1))
    b = refine(net, process, f, 5, renoise, generator=torch.Generator().manual_seed(1))
    assert all(torch.equal(x, y) for x, y in zip(a.logits, b.logits))


def test_cfg_scale_zero_is_the_conditional_output_and_s_mixes_linearly():
    net = denoiser()
    f, x, t = torch.randn(2, C, 6, 6), torch.randint(0, K, (2, 6, 6)), torch.tensor([5, 5])
    assert torch.equal(guided_logits(net, f, x, t, 0.0), net(f, x, t))
    cond, uncond = net(f, x, t), net(torch.zeros_like(f), x, t)
    assert torch.allclose(guided_logits(net, f, x, t, 0.4), 1.4 * cond - 0.4 * uncond, atol=1e-5)


def test_bit_diffusion_refines_through_the_same_sampler():
    process = BitDiffusion(K, 10)
    net = denoiser("bits", bits=process.bits)
    for renoise in ("free", "posterior"):
        traj = refine(net, process, torch.randn(2, C, 6, 6), 5, renoise, generator=torch.Generator().manual_seed(0))
        assert traj.final.shape == (2, K, 6, 6)


def keyed(n, seed=0):
    return SampleRNG(seed, torch.arange(n))


def _batch(B=3, h=4):
    labels = torch.randint(0, K, (B, 4 * h, 4 * h))
    return Batch(features=torch.randn(B, C, h, h), labels=labels, base_pred=torch.randint(0, K, (B, h, h)))


def test_first_prediction_target_is_computed_without_gradient():
    net, process = denoiser(), MaskDiffusion(K, 10)
    grad_modes = []
    original = net.forward

    def spy(*args, **kwargs):
        grad_modes.append(torch.is_grad_enabled())
        return original(*args, **kwargs)
    net.forward = spy
    net.train()
    loss, _ = refiner_loss(net, process, _batch(), ResizeCodec(4), stage=2, target="first", rng=keyed(3))
    assert grad_modes == [False, True]  # the first prediction, then the trained call
    loss.backward()
    assert net.classifier.weight.grad is not None
    first = first_prediction(net, process, torch.randn(2, C, 4, 4))
    assert first.dtype == torch.long and not first.requires_grad


@pytest.mark.parametrize("target", ["gt", "initial", "first"])
def test_stage1_noises_at_max_t_and_targets_pick_their_x0(target, monkeypatch):
    net, process, batch = denoiser(), MaskDiffusion(K, 10), _batch()
    calls = []
    original = process.q_sample

    def spy(x0, t, generator=None, noise=None):
        calls.append((x0.clone(), t.clone()))
        return original(x0, t, generator, noise)
    monkeypatch.setattr(process, "q_sample", spy)
    refiner_loss(net, process, batch, ResizeCodec(4), stage=1, target=target, rng=keyed(3))
    x0, t = calls[-1]
    assert (t == 10).all()
    if target == "gt":
        assert torch.equal(x0, ResizeCodec(4).encode(batch.labels))
    elif target == "initial":
        assert torch.equal(x0, batch.base_pred)


def test_hybrid_loss_adds_a_vlb_term():
    net, process, batch = denoiser(), MaskDiffusion(K, 10), _batch()
    _, parts = refiner_loss(net, process, batch, ResizeCodec(4), stage=2, target="gt", loss="hybrid", rng=keyed(3))
    assert parts["vlb"] >= 0 and "ce" in parts


def test_lr_warms_up_then_halves_down_to_min_lr():
    tc = resolve("cpu", overrides={"train.lr": 1.0, "train.warmup_iters": 10, "train.halve_every": 100,
                                   "train.min_lr": 0.2}).train
    assert refiner_lr(0, tc) == pytest.approx(0.1) and refiner_lr(9, tc) == pytest.approx(1.0)
    assert refiner_lr(99, tc) == 1.0 and refiner_lr(100, tc) == 0.5 and refiner_lr(250, tc) == 0.25
    assert refiner_lr(10_000, tc) == 0.2


def test_ema_moves_by_one_minus_decay_every_n_iterations():
    net = torch.nn.Linear(2, 2)
    ema = EMA(net, decay=0.9, every=5)
    before = ema.state["weight"].clone()
    with torch.no_grad():
        net.weight.add_(1.0)
    ema.update(net, 4)
    assert torch.equal(ema.state["weight"], before)  # not a multiple of 5: unchanged
    ema.update(net, 5)
    assert torch.allclose(ema.state["weight"], 0.9 * before + 0.1 * net.weight)


def test_stage_plan_and_hashes():
    cfg = resolve("cpu")
    assert stages_of(cfg) == ["stage1", "stage2"]
    assert stages_of(resolve("cpu", overrides={"train.stages": "multi-step"})) == ["multistep"]
    head = resolve("cpu", overrides={"denoiser.method": "head"})
    assert stages_of(head) == ["head"]
    assert stage_iters(head, "head") == cfg.train.stage1_iters + cfg.train.stage2_iters
    longer = resolve("cpu", overrides={"train.stage2_iters": 999})
    assert stage_hash(cfg, "stage1", "b") == stage_hash(longer, "stage1", "b")  # stage 1 is shared
    assert stage_hash(cfg, "stage2", "b") != stage_hash(longer, "stage2", "b")
    assert stage_hash(cfg, "stage1", "b") != stage_hash(cfg, "stage1", "other-base")
    chatty = resolve("cpu", overrides={"train.log_every": 1, "infer.steps": 5})
    assert stage_hash(cfg, "stage2", "b") == stage_hash(chatty, "stage2", "b")  # not what it computes
    checking = resolve("cpu", overrides={"train.check_reliance": True})  # what only multi-step checks read
    assert stage_hash(cfg, "stage1", "b") == stage_hash(checking, "stage1", "b")
    assert stage_hash(cfg, "stage2", "b") != stage_hash(checking, "stage2", "b")  # its history differs
    head_checking = resolve("cpu", overrides={"denoiser.method": "head", "train.check_reliance": True})
    assert stage_hash(head, "head", "b") == stage_hash(head_checking, "head", "b")


class GroundTruthReader(torch.nn.Module):
    """A 'denoiser' that copies its mask input: perfect when fed the ground truth, blind to features."""

    def forward(self, features, x_t=None, t=None, drop_cond=None):
        return torch.nn.functional.one_hot(x_t, K).permute(0, 3, 1, 2).float() * 10


def test_reliance_diagnostic_separates_a_mask_reader_from_random_input():
    cfg = resolve("smoke", overrides={"infer.oracle_t": 1, "diffusion.steps": 10, "infer.steps": 5})
    labels = torch.randint(0, K, (8, 16, 16))
    codec = ResizeCodec(4)
    labels = torch.nn.functional.interpolate(codec.encode(labels)[:, None].float(), scale_factor=4)[:, 0].long()
    cache = FeatureCache(torch.zeros(8, C, 4, 4).half(), torch.randn(8, K, 4, 4).half(), labels.to(torch.uint8))
    result = evaluate_refiner(GroundTruthReader(), MaskDiffusion(K, 10), cache, cfg, num_classes=K,
                              ignore_index=255, reliance=True)
    r = result.reliance
    assert r.oracle > 95 and r.random < 40 and len(result.steps) == 5


def test_the_reliance_diagnostic_leaves_the_trajectorys_scores_as_they_are_over_several_batches():
    """Its draws come from a generator of its own: with or without it, every batch's trajectory draws the same."""
    cfg = resolve("smoke", overrides={"diffusion.steps": 10, "infer.steps": 5, "eval.batch_size": 2})
    torch.manual_seed(0)
    net = MaskDenoiser(feature_channels=C, num_classes=K, size="XXS", num_states=K, dropout=0.0).eval()
    labels = torch.randint(0, K, (8, 16, 16))
    cache = FeatureCache(torch.randn(8, C, 4, 4).half(), torch.randn(8, K, 4, 4).half(), labels.to(torch.uint8))
    runs = [evaluate_refiner(net, MaskDiffusion(K, 10), cache, cfg, num_classes=K, ignore_index=255,
                             reliance=reliance) for reliance in (False, True)]
    assert [s.mIoU for s in runs[0].steps] == [s.mIoU for s in runs[1].steps]  # 4 batches of 2
    assert runs[0].reliance is None and runs[1].reliance.own == runs[1].steps[-1].mIoU


@pytest.mark.parametrize("process", [MaskDiffusion(K, 10), MaskDiffusion(K, 10, transition="uniform+mask"),
                                     BitDiffusion(K, 10)], ids=["uniform", "uniform+mask", "bits"])
def test_keyed_draws_make_the_loss_independent_of_how_a_batch_is_split(process):
    """What data parallelism needs: the mean loss of the halves equals the loss of the whole batch."""
    states = getattr(process, "num_states", K)
    torch.manual_seed(0)
    net = MaskDenoiser(feature_channels=C, num_classes=K, size="XXS", num_states=states, dropout=0.0,
                       mask_input="bits" if isinstance(process, BitDiffusion) else "embed",
                       bits=getattr(process, "bits", 0))
    batch = _batch(B=4)
    keys = torch.tensor([11, 3, 7, 42])
    batch = Batch(batch.features, batch.labels, batch.base_pred, keys=keys)
    kw = dict(stage=2, target="first", cond_dropout=0.5)
    whole, _ = refiner_loss(net, process, batch, ResizeCodec(4), rng=SampleRNG(5, keys), **kw)
    halves = [refiner_loss(net, process, part, ResizeCodec(4), rng=SampleRNG(5, part.keys), **kw)[0]
              for part in batch.split(2)]
    assert torch.allclose(whole, sum(halves) / 2, atol=1e-5)
    other, _ = refiner_loss(net, process, batch, ResizeCodec(4), rng=SampleRNG(6, keys), **kw)
    assert not torch.allclose(whole, other)  # the draws are live: another seed, another loss


def test_sample_rng_depends_on_key_and_stream_only():
    a = SampleRNG(1, torch.tensor([5, 9])).rand((3,), stream=2)
    b = SampleRNG(1, torch.tensor([9, 5, 1])).rand((3,), stream=2)
    assert torch.equal(a[0], b[1]) and torch.equal(a[1], b[0])
    assert not torch.equal(a, SampleRNG(1, torch.tensor([5, 9])).rand((3,), stream=3))


def test_residual_denoiser_starts_at_the_base_and_learns_corrections():
    """denoiser.residual: untrained, every refinement step is exactly the base's prediction; the
    conditioning carries the base's logits; condition dropout removes them with the features."""
    from ddps.engine.features import conditioning
    from ddps.refiner.build import build_denoiser
    cfg = resolve("smoke", overrides={"denoiser.residual": True, "diffusion.steps": 10, "infer.steps": 5})
    process = MaskDiffusion(K, 10)
    torch.manual_seed(0)
    net = build_denoiser(cfg, K, C, process).eval()
    labels = torch.randint(0, K, (8, 16, 16), dtype=torch.uint8)
    cache = FeatureCache(torch.randn(8, C, 4, 4).half(), torch.randn(8, K, 4, 4).half(), labels)
    result = evaluate_refiner(net, process, cache, cfg, num_classes=K, ignore_index=255)
    assert all(step == result.base for step in result.steps)
    batch = conditioning(cache.batch(torch.arange(8)), residual=True)
    assert batch.features.shape == (8, C + K, 4, 4)
    x, t = torch.randint(0, K, (8, 4, 4)), torch.full((8,), 10)
    torch.testing.assert_close(net(batch.features, x, t), batch.features[:, C:])
    dropped = net(batch.features, x, t, drop_cond=torch.ones(8, dtype=torch.bool))
    assert torch.count_nonzero(dropped) == 0  # no features, no base logits: the unconditional branch
    loss, _ = refiner_loss(net.train(), process, batch, ResizeCodec(4), stage=2, target="first",
                           rng=SampleRNG(0, torch.arange(8)), ignore_index=255)
    loss.backward()
    assert net.classifier.weight.grad.abs().sum() > 0  # the zero-initialised classifier is trained


def test_the_multiscale_test_averages_scales_and_flips_and_an_untrained_residual_refiner_keeps_the_base():
    """The 'ms' column of Tables 1, 2, 4: base and last step scored on probabilities averaged over rescaled
    and mirrored copies; a residual refiner whose classifier is still zero predicts exactly the base there too."""
    import numpy as np

    from ddps.config import resolve
    from ddps.data.datasets import ArrayDataset
    from ddps.data.transforms import EvalTransform
    from ddps.refiner.build import build_denoiser, build_process
    from ddps.segmentors import create_base
    cfg = resolve("smoke", None, {"denoiser.residual": True, "eval.scales": [0.75, 1.0, 1.5], "eval.batch_size": 3,
                                  "infer.steps": 2})
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (5, 32, 32, 3), dtype=np.uint8)
    masks = rng.integers(0, K, (5, 32, 32), dtype=np.uint8)
    dataset = ArrayDataset("random", images, masks, [f"c{i}" for i in range(K)], 255, EvalTransform(cfg.data))
    torch.manual_seed(0)
    base = create_base("segformer", "mit_b0", K, feature_channels=C).freeze()
    process = build_process(cfg, K)

    def multiscale(denoiser, process, cfg):
        return evaluate_refiner(denoiser, process, None, cfg, base=base, dataset=dataset, multiscale=True).multiscale
    result = multiscale(build_denoiser(cfg, K, C, process), process, cfg)
    assert result["last"] == result["base"]
    single = multiscale(build_denoiser(cfg, K, C, process), process,
                        resolve("smoke", None, {"denoiser.residual": True, "eval.scales": [1.0], "eval.flip": False,
                                                "infer.steps": 2}))
    assert single["base"].mIoU != result["base"].mIoU  # the copies do change the base's scores
    plain = resolve("smoke", None, {"eval.scales": [0.75, 1.0], "infer.steps": 2})
    torch.manual_seed(1)
    other = multiscale(build_denoiser(plain, K, C, build_process(plain, K)), build_process(plain, K), plain)
    assert other["last"].mIoU != other["base"].mIoU  # a refiner that is not the base scores otherwise


def test_evaluation_runs_its_forward_passes_in_the_precision_it_is_given():
    """precision=bf16: the denoiser's convolutions produce bf16 activations (torch.autocast on the device),
    the scores are still computed; an unknown precision is a one-line error naming the choices."""
    from ddps.refiner.build import build_denoiser
    cfg = resolve("smoke", overrides={"diffusion.steps": 10, "infer.steps": 2})
    process = MaskDiffusion(K, 10)
    torch.manual_seed(0)
    net = build_denoiser(cfg, K, C, process)
    cache = FeatureCache(torch.randn(8, C, 4, 4).half(), torch.randn(8, K, 4, 4).half(),
                         torch.randint(0, K, (8, 16, 16), dtype=torch.uint8))
    seen = []
    hook = net.classifier.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    full = evaluate_refiner(net, process, cache, cfg, num_classes=K, ignore_index=255)
    half = evaluate_refiner(net, process, cache, cfg, num_classes=K, ignore_index=255, precision="bf16")
    hook.remove()
    assert set(seen[:2]) == {torch.float32} and set(seen[2:]) == {torch.bfloat16} and len(seen) == 4
    assert full.base == half.base  # the base's cached logits are scored as they are
    assert all(0 <= s.mIoU <= 100 for s in half.steps) and len(half.steps) == 2
    with pytest.raises(ConfigError, match=r"precision='fp8' is not a valid choice; choose from: bf16, fp16, fp32"):
        evaluate_refiner(net, process, cache, cfg, num_classes=K, ignore_index=255, precision="fp8")
