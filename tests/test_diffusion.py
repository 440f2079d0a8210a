"""The noise processes pin their mathematics: stochastic matrices, closed forms, Bayes' rule by brute force,
empirical sampling frequencies, the VLB term, analog bits and DDIM. t = 0 is clean, t = T pure noise."""
import math

import numpy as np
import pytest
import torch

from ddps.diffusion import SCHEDULES, TRANSITIONS, BitDiffusion, MaskDiffusion, alpha_bar
from ddps.errors import ConfigError

ALL = [(tr, sc) for tr in TRANSITIONS for sc in SCHEDULES]


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def product(mats, s, t):
    """Q_{s+1} ... Q_t by explicit multiplication (float64)."""
    out = torch.eye(mats.shape[-1], dtype=torch.float64)
    for u in range(s + 1, t + 1):
        out = out @ mats[u]
    return out


def assert_frequencies(samples, probs, sigmas=4.5):
    """Empirical state frequencies of `samples` (N,) match `probs` (S,) within a few standard errors."""
    n, s = samples.numel(), probs.numel()
    freq = torch.bincount(samples.flatten(), minlength=s).double() / n
    p = probs.double()
    tol = sigmas * torch.sqrt(p * (1 - p) / n) + 1e-9
    assert torch.all((freq - p).abs() <= tol), (freq, p)


# ----------------------------------------------------------------------------------- schedules

@pytest.mark.parametrize("name", sorted(SCHEDULES))
@pytest.mark.parametrize("steps", [1, 2, 20, 100])
def test_schedule_starts_clean_decreases_and_ends_near_zero(name, steps):
    ab = alpha_bar(name, steps)
    assert ab.dtype == np.float64 and ab.shape == (steps + 1,)
    assert ab[0] == 1.0 and np.all(np.diff(ab) < 0)
    assert ab[-1] == pytest.approx(0.000009, rel=1e-9)


def test_linear_schedule_is_the_official_linspace():
    ab = alpha_bar("linear", 100)
    np.testing.assert_allclose(ab[1:], np.linspace(0.99999, 0.000009, 100), rtol=0, atol=1e-15)


def test_cosine_schedule_is_nichol_dhariwal_squeezed_into_the_floor():
    T, s = 50, 0.008
    ab = alpha_bar("cosine", T)
    f = np.cos((np.arange(T + 1) / T + s) / (1 + s) * math.pi / 2) ** 2
    expected = 0.000009 + (1 - 0.000009) * f / f[0]
    np.testing.assert_allclose(ab[:-1], expected[:-1], rtol=1e-12)


def test_bad_names_raise_config_error_with_the_choices():
    with pytest.raises(ConfigError, match="cosine, linear"):
        alpha_bar("quadratic", 10)
    with pytest.raises(ConfigError, match="mask, uniform, uniform\\+mask"):
        MaskDiffusion(3, 10, transition="absorbing")
    with pytest.raises(ConfigError, match="cosine, linear"):
        MaskDiffusion(3, 10, schedule="sqrt")
    with pytest.raises(ConfigError, match="cosine, linear"):
        BitDiffusion(3, 10, schedule="sqrt")
    with pytest.raises(ConfigError, match="mask_max"):
        MaskDiffusion(3, 10, transition="uniform+mask", mask_max=1.0)
    with pytest.raises(ConfigError, match="steps"):
        MaskDiffusion(3, 0)


# ----------------------------------------------------------------------------------- matrices

@pytest.mark.parametrize("transition,schedule", ALL)
def test_matrices_are_stochastic_and_cumulative_is_the_product(transition, schedule):
    d = MaskDiffusion(4, 12, transition, schedule)
    q, q_bar = d.one_step_matrices, d.cumulative_matrices
    S = d.num_states
    assert q.shape == q_bar.shape == (13, S, S) and q.dtype == torch.float64
    eye = torch.eye(S, dtype=torch.float64)
    assert torch.equal(q[0], eye) and torch.equal(q_bar[0], eye)
    for mats in (q, q_bar):
        assert torch.all(mats >= 0)
        torch.testing.assert_close(mats.sum(-1), torch.ones(13, S, dtype=torch.float64), rtol=0, atol=1e-12)
    for t in range(13):
        torch.testing.assert_close(q_bar[t], product(q, 0, t), rtol=0, atol=1e-12)
    for s, t in [(0, 0), (3, 3), (2, 7), (5, 12), (11, 12)]:
        torch.testing.assert_close(d.transition_between(s, t), product(q, s, t), rtol=0, atol=1e-12)
    if d.mask_index is not None:  # [MASK] is absorbing
        assert torch.equal(q[1:, d.mask_index], eye[d.mask_index].expand(12, S))


@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
def test_uniform_cumulative_matches_the_closed_form(schedule):
    K, T = 5, 20
    d = MaskDiffusion(K, T, "uniform", schedule)
    ab = torch.from_numpy(alpha_bar(schedule, T))
    closed = ab[:, None, None] * torch.eye(K, dtype=torch.float64) + ((1 - ab) / K)[:, None, None]
    torch.testing.assert_close(d.cumulative_matrices, closed, rtol=0, atol=1e-13)


@pytest.mark.parametrize("transition,schedule", ALL)
def test_marginal_at_T_is_the_stationary_distribution(transition, schedule):
    d = MaskDiffusion(6, 20, transition, schedule, mask_max=0.9)
    last = d.cumulative_matrices[-1]                                     # (S, S)
    stationary = d.stationary()
    torch.testing.assert_close(last[:6], stationary.expand(6, -1), rtol=0, atol=2e-5)
    expected_mask = {"uniform": 0.0, "mask": 1.0, "uniform+mask": 0.9}[transition]
    if d.mask_index is None:
        torch.testing.assert_close(stationary, torch.full((6,), 1 / 6, dtype=torch.float64))
    else:
        assert float(stationary[d.mask_index]) == pytest.approx(expected_mask, abs=1e-5)


def test_uniform_plus_mask_is_vq_diffusion_linear_masking_with_nonnegative_replace():
    K, T = 5, 50
    d = MaskDiffusion(K, T, "uniform+mask", "linear", mask_max=0.9)
    gb = d.gamma_bar.numpy()
    assert gb[0] == 0 and gb[-1] == pytest.approx(0.9)
    np.testing.assert_allclose(np.diff(gb[1:]), np.full(T - 1, np.diff(gb[1:])[0]), rtol=1e-9)  # linear in t
    q = d.one_step_matrices[1:]
    beta = q[:, 0, 1]                                                     # off-diagonal real entries
    assert torch.all(beta >= 0) and torch.all(q[:, :K, d.mask_index] > 0)
    cosine = MaskDiffusion(K, T, "uniform+mask", "cosine").one_step_matrices   # beta_t >= 0 for any schedule
    assert torch.all(cosine >= 0)


# ----------------------------------------------------------------------------------- forward process

@pytest.mark.parametrize("transition", TRANSITIONS)
def test_q_probs_is_the_row_of_q_bar_and_x0_times_q_bar(transition):
    d = MaskDiffusion(4, 10, transition)
    S = d.num_states
    x0 = torch.randint(0, S, (3, 5, 6), generator=gen(1))
    t = torch.tensor([0, 4, 10])
    probs = d.q_probs(x0, t)
    assert probs.shape == (3, S, 5, 6) and probs.dtype == torch.float32
    expected = d.cumulative_matrices[t][torch.arange(3)[:, None, None], x0].permute(0, 3, 1, 2)
    torch.testing.assert_close(probs, expected.float(), rtol=0, atol=1e-6)
    p = torch.distributions.Dirichlet(torch.ones(S, dtype=torch.float64)).sample((3, 5, 6)).permute(0, 3, 1, 2)
    expected = torch.einsum("bihw,bij->bjhw", p, d.cumulative_matrices[t])
    torch.testing.assert_close(d.q_probs(p, t), expected, rtol=0, atol=1e-12)
    onehot = torch.nn.functional.one_hot(x0, S).permute(0, 3, 1, 2).double()
    torch.testing.assert_close(d.q_probs(onehot, t), d.q_probs(x0, t).double(), rtol=0, atol=1e-6)


def test_q_probs_pads_class_probabilities_with_an_empty_mask_state():
    d = MaskDiffusion(3, 10, "uniform+mask")
    p = torch.softmax(torch.randn(2, 3, 4, 4, generator=gen(2), dtype=torch.float64), dim=1)
    padded = torch.cat([p, torch.zeros(2, 1, 4, 4, dtype=torch.float64)], dim=1)
    torch.testing.assert_close(d.q_probs(p, 5), d.q_probs(padded, 5))


@pytest.mark.parametrize("transition", TRANSITIONS)
def test_q_sample_frequencies_match_q_probs(transition):
    d = MaskDiffusion(3, 10, transition)
    x0 = torch.full((3, 100, 200), 1)                                    # 20k pixels per sample
    t = torch.tensor([1, 5, 10])
    xt = d.q_sample(x0, t, generator=gen(3))
    assert xt.shape == x0.shape and xt.dtype == torch.long
    probs = d.q_probs(x0[:, :1, :1], t)[:, :, 0, 0]                      # (3, S)
    for b in range(3):
        assert_frequencies(xt[b], probs[b])


def test_sampling_is_deterministic_under_a_generator():
    d = MaskDiffusion(5, 10, "uniform+mask")
    x0 = torch.randint(0, 5, (2, 16, 16), generator=gen(0))
    assert torch.equal(d.q_sample(x0, 7, gen(4)), d.q_sample(x0, 7, gen(4)))
    assert not torch.equal(d.q_sample(x0, 7, gen(4)), d.q_sample(x0, 7, gen(5)))
    assert torch.equal(d.prior((2, 16, 16), gen(4)), d.prior((2, 16, 16), gen(4)))
    assert torch.equal(d.renoise(x0, 2, 9, gen(6)), d.renoise(x0, 2, 9, gen(6)))


@pytest.mark.parametrize("transition", TRANSITIONS)
def test_prior_samples_the_stationary_distribution(transition):
    d = MaskDiffusion(4, 10, transition)
    x = d.prior((2, 100, 100), generator=gen(7))
    assert x.shape == (2, 100, 100) and x.dtype == torch.long
    assert_frequencies(x, d.stationary())
    if transition == "mask":
        assert torch.all(x == d.mask_index)


@pytest.mark.parametrize("transition", TRANSITIONS)
def test_renoise_composes_with_the_forward_process(transition):
    d = MaskDiffusion(3, 10, transition)
    q_bar = d.cumulative_matrices
    for s, t in [(0, 4), (2, 7), (3, 10)]:  # Q_bar_s Q_{s->t} = Q_bar_t
        torch.testing.assert_close(q_bar[s] @ d.transition_between(s, t), q_bar[t], rtol=0, atol=1e-12)
    x0 = torch.full((2, 100, 100), 2)
    x4 = d.renoise(x0, 0, torch.tensor([4, 4]), generator=gen(8))        # renoise from clean = q_sample
    assert_frequencies(x4, d.q_probs(x0[:1, :1, :1], 4)[0, :, 0, 0])
    x2 = d.q_sample(x0, 2, generator=gen(9))
    x7 = d.renoise(x2, 2, 7, generator=gen(10))                          # two stages: q(x_7 | x_0)
    assert_frequencies(x7, d.q_probs(x0[:1, :1, :1], 7)[0, :, 0, 0])
    assert torch.equal(d.renoise(x2, 5, 5), x2)


# ----------------------------------------------------------------------------------- posterior

def all_pairs(S):
    """x0 and x_t maps (1, S, S) that hold every pair (x0 = row, x_t = column)."""
    grid = torch.arange(S)
    return grid[:, None].expand(S, S)[None], grid[None, :].expand(S, S)[None]


@pytest.mark.parametrize("transition,schedule", ALL)
@pytest.mark.parametrize("s,t", [(4, 5), (0, 1), (2, 3), (1, 5), (0, 3)])
def test_posterior_is_bayes_rule_by_brute_force(transition, schedule, s, t):
    K, T = 3, 5
    d = MaskDiffusion(K, T, transition, schedule, mask_max=0.7)
    S, q = d.num_states, d.one_step_matrices
    x0, xt = all_pairs(S)
    got = d.posterior(xt, x0, t, s=None if s == t - 1 else s)            # (1, S, S, S): state i at (x0, x_t)
    torch.testing.assert_close(got.sum(1), torch.ones(1, S, S), rtol=0, atol=1e-5)
    forward, q_bar_s, q_bar_t = product(q, s, t), product(q, 0, s), product(q, 0, t)
    for a in range(S):
        for j in range(S):
            if q_bar_t[a, j] == 0:  # x_t impossible from x0: Bayes' rule undefined
                continue
            bayes = forward[:, j] * q_bar_s[a] / q_bar_t[a, j]              # (S,) over x_s
            torch.testing.assert_close(got[0, :, a, j].double(), bayes, rtol=0, atol=1e-5)
    onehot = torch.nn.functional.one_hot(x0, S).permute(0, 3, 1, 2).double()
    torch.testing.assert_close(d.posterior(xt, onehot, t, s).float(), d.posterior(xt, x0, t, s), rtol=0, atol=1e-6)


@pytest.mark.parametrize("transition", TRANSITIONS)
def test_posterior_with_probabilities_is_the_d3pm_x0_parameterisation(transition):
    K, T, s, t = 3, 5, 1, 4
    d = MaskDiffusion(K, T, transition, mask_max=0.7)
    S = d.num_states
    p = torch.distributions.Dirichlet(torch.ones(K, dtype=torch.float64)).sample((1, 1, S))  # (1, 1, S, K)
    p = p.permute(0, 3, 1, 2)                                             # (1, K, 1, S): one p per x_t
    xt = torch.arange(S)[None, None]                                      # (1, 1, S)
    got = d.posterior(xt, p, t, s)                                        # (1, S, 1, S)
    forward, q_bar_s = d.transition_between(s, t), d.cumulative_matrices[s]
    for j in range(S):
        prior = torch.cat([p[0, :, 0, j], torch.zeros(S - K, dtype=torch.float64)]) @ q_bar_s
        unnorm = forward[:, j] * prior
        torch.testing.assert_close(got[0, :, 0, j], unnorm / unnorm.sum(), rtol=0, atol=1e-10)


def test_posterior_is_finite_for_extreme_and_impossible_inputs():
    d = MaskDiffusion(4, 10, "mask")
    logits = torch.full((2, 4, 3, 3), -200.0)
    logits[:, 0] = 200.0                                                  # softmax underflows to exact zeros
    p = torch.softmax(logits, dim=1)
    xt = torch.full((2, 3, 3), 2)                                         # a real class the prediction rules out
    out = d.posterior(xt, p, torch.tensor([3, 10]))
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.sum(1), torch.ones(2, 3, 3))
    out = d.posterior(xt, torch.zeros(2, 3, 3, dtype=torch.long), 5)     # x_t = 2 impossible from x0 = 0
    assert torch.isfinite(out).all()


def test_posterior_refuses_t_zero():
    d = MaskDiffusion(3, 5)
    x = torch.zeros(1, 2, 2, dtype=torch.long)
    with pytest.raises(AssertionError):
        d.posterior(x, x, 0)
    with pytest.raises(AssertionError):
        d.posterior(x, x, 2, s=2)


# ----------------------------------------------------------------------------------- VLB

@pytest.mark.parametrize("transition", TRANSITIONS)
def test_vlb_term_is_nonnegative_zero_at_the_truth_and_differentiable(transition):
    K, T = 4, 10
    d = MaskDiffusion(K, T, transition)
    x0 = torch.randint(0, K, (3, 8, 8), generator=gen(11))
    t = torch.tensor([2, 6, 10])
    xt = d.q_sample(x0, t, generator=gen(12))
    logits = torch.randn(3, K, 8, 8, generator=gen(13), requires_grad=True)
    loss = d.vlb_term(x0, xt, t, logits)
    assert loss.shape == (3,) and torch.all(loss >= -1e-6) and torch.all(loss > 1e-4)
    loss.sum().backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
    perfect = 30.0 * torch.nn.functional.one_hot(x0, K).permute(0, 3, 1, 2).float()
    assert torch.all(d.vlb_term(x0, xt, t, perfect).abs() < 1e-4)


def test_vlb_term_at_t1_is_the_cross_entropy_and_valid_pixels_are_averaged():
    K = 5
    d = MaskDiffusion(K, 10, "uniform+mask")
    x0 = torch.randint(0, K, (2, 6, 6), generator=gen(14))
    logits = torch.randn(2, K, 6, 6, generator=gen(15))
    xt = d.q_sample(x0, 1, generator=gen(16))
    ce = torch.nn.functional.cross_entropy(logits, x0, reduction="none").mean(dim=(1, 2))
    torch.testing.assert_close(d.vlb_term(x0, xt, torch.tensor([1, 1]), logits), ce)
    valid = torch.rand(2, 6, 6, generator=gen(17)) > 0.4
    x0_ignored = torch.where(valid, x0, torch.full_like(x0, 255))          # ignored pixels may hold anything
    t = torch.tensor([1, 7])
    got = d.vlb_term(x0_ignored, xt, t, logits, valid=valid)
    per_pixel_ce = torch.nn.functional.cross_entropy(logits, x0, reduction="none")
    torch.testing.assert_close(got[0], per_pixel_ce[0][valid[0]].mean())
    garbage = torch.where(valid[:, None], logits, torch.randn(logits.shape, generator=gen(18)))
    torch.testing.assert_close(d.vlb_term(x0_ignored, xt, t, garbage, valid=valid), got)  # invalid pixels ignored
    everywhere = torch.ones_like(valid)
    torch.testing.assert_close(d.vlb_term(x0, xt, t, logits, valid=everywhere), d.vlb_term(x0, xt, t, logits))


# ----------------------------------------------------------------------------------- analog bits

@pytest.mark.parametrize("K,bits", [(1, 1), (2, 1), (3, 2), (19, 5), (150, 8), (256, 8), (257, 9)])
def test_bit_width(K, bits):
    assert BitDiffusion(K, 10).bits == bits


def test_bits_round_trip_and_expected_bits():
    d = BitDiffusion(150, 10, scale=0.1)
    labels = torch.randint(0, 150, (2, 7, 9), generator=gen(18))
    x = d.encode(labels)
    assert x.shape == (2, 8, 7, 9) and x.unique().tolist() == pytest.approx([-0.1, 0.1])
    assert torch.equal(d.decode(x), labels)
    jitter = 0.09 * (2 * torch.rand(x.shape, generator=gen(19)) - 1)        # keeps every sign
    assert torch.equal(d.decode(x + jitter), labels)
    onehot = torch.nn.functional.one_hot(labels, 150).permute(0, 3, 1, 2).float()
    torch.testing.assert_close(d.encode_probs(onehot), x)
    half = 0.5 * onehot + 0.5 * torch.nn.functional.one_hot(torch.zeros_like(labels), 150).permute(0, 3, 1, 2)
    torch.testing.assert_close(d.encode_probs(half), 0.5 * x + 0.5 * d.encode(torch.zeros_like(labels)))


@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
def test_ddim_step_with_the_true_x0_stays_on_the_same_trajectory(schedule):
    T = 20
    d = BitDiffusion(19, T, schedule=schedule)
    ab = torch.from_numpy(alpha_bar(schedule, T))
    x0 = d.encode(torch.randint(0, 19, (3, 4, 4), generator=gen(20))).double()
    eps = torch.randn(x0.shape, generator=gen(21), dtype=torch.float64)
    t, s = torch.tensor([20, 9, 3]), torch.tensor([15, 0, 2])
    xt = ab[t].sqrt().view(-1, 1, 1, 1) * x0 + (1 - ab[t]).sqrt().view(-1, 1, 1, 1) * eps
    xs = d.ddim_step(xt, x0, t, s)
    expected = ab[s].sqrt().view(-1, 1, 1, 1) * x0 + (1 - ab[s]).sqrt().view(-1, 1, 1, 1) * eps
    torch.testing.assert_close(xs, expected, rtol=0, atol=1e-9)
    assert torch.equal(xs[1], x0[1])                                       # s = 0 returns x0_hat exactly
    assert torch.equal(d.ddim_step(xt.float(), x0.float(), 7, 0), x0.float())


def test_bit_q_sample_moments_and_prior():
    d = BitDiffusion(4, 10, schedule="cosine", scale=0.1)
    t = 5
    ab = float(d.alpha_bar[t])
    x0 = d.encode(torch.randint(0, 4, (4, 100, 100), generator=gen(22)))  # 80k values
    xt = d.q_sample(x0, t, generator=gen(23))
    noise = xt - math.sqrt(ab) * x0
    assert abs(float(noise.mean())) < 4 * math.sqrt((1 - ab) / noise.numel())
    assert float(noise.var()) == pytest.approx(1 - ab, rel=0.03)
    assert torch.equal(d.q_sample(x0, t, gen(23)), xt)
    assert torch.equal(d.q_sample(x0, 0, gen(23)), x0)
    z = d.prior((2, 50, 60), generator=gen(24))
    assert z.shape == (2, 2, 50, 60)
    assert abs(float(z.mean())) < 0.03 and float(z.var()) == pytest.approx(1.0, rel=0.05)
