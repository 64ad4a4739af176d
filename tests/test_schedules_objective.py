"""Exactness of the CDM formulas against a Gaussian mixture's closed forms (float64)."""

import math

import pytest
import torch

from cdm_core.mixture import GaussianMixture, toy_mixture
from cdm_core.objective import (
    LOG2_BIN_OFFSET,
    bits_per_dim,
    cdm_loss,
    denoise,
    log_likelihood,
    log_prior,
    nats_to_bits_per_dim,
    noise_data,
    sample_timesteps,
)
from cdm_core.schedules import SCHEDULE_NAMES, get_schedule

T = 1000


def non_uniform_prior(num_classes: int) -> torch.Tensor:
    """A prior that favours middle noise levels, with unequal (positive) mass at the two endpoints."""
    t = torch.arange(num_classes, dtype=torch.float64)
    weights = 1.0 + t / (num_classes - 1) + 3.0 * torch.exp(-(((t - num_classes / 3) / (num_classes / 8)) ** 2))
    return weights / weights.sum()


@pytest.fixture(scope="module")
def mixture3d() -> GaussianMixture:
    # 3 components, d = 3, full non-isotropic covariances.
    return toy_mixture(dim=3)


@pytest.mark.parametrize("name", SCHEDULE_NAMES)
def test_schedule_endpoints_exact_and_monotone(name):
    for dtype in (torch.float32, torch.float64):
        sched = get_schedule(name, T).to(dtype=dtype)
        assert sched.a.shape == sched.s.shape == (T + 2,)
        assert sched.a.dtype == dtype
        assert (sched.a[0], sched.s[0], sched.a[-1], sched.s[-1]) == (1, 0, 0, 1)
        snr = sched.a**2 / sched.s**2
        assert torch.all(snr[1:] <= snr[:-1])


def test_schedule_values_match_their_definitions():
    lin = get_schedule("linear", T)
    alpha_bar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, T, dtype=torch.float64), 0)
    torch.testing.assert_close(lin.a[1:-1] ** 2, alpha_bar)
    torch.testing.assert_close(lin.a**2 + lin.s**2, torch.ones(T + 2, dtype=torch.float64))
    uni = get_schedule("uniform", T)
    torch.testing.assert_close(uni.s, torch.arange(T + 2, dtype=torch.float64) / (T + 1))
    torch.testing.assert_close(uni.a**2 + uni.s**2, torch.ones(T + 2, dtype=torch.float64))
    ot = get_schedule("ot", T)
    torch.testing.assert_close(ot.a + ot.s, torch.ones(T + 2, dtype=torch.float64))
    cos = get_schedule("cosine", T)
    assert 0.49 < float(cos.a[T // 2 + 1] ** 2) < 0.51  # ᾱ(T/2) ≈ 1/2 for the cosine schedule


def test_schedule_rejects_bad_input():
    with pytest.raises(ValueError, match="unknown schedule 'quadratic'"):
        get_schedule("quadratic", T)
    with pytest.raises(ValueError, match="positive integer"):
        get_schedule("linear", 0)
    with pytest.raises(ValueError, match="bad parameters"):
        get_schedule("ot", T, beta_start=0.1)


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("name", SCHEDULE_NAMES)
@pytest.mark.parametrize("prior_kind", ["uniform", "non-uniform"])
def test_denoiser_is_exact_posterior_mean(mixture3d, name, prior_kind):
    sched = get_schedule(name, T)
    prior = None if prior_kind == "uniform" else non_uniform_prior(T + 2)
    gen = torch.Generator().manual_seed(1)
    x0, _ = mixture3d.sample(256, gen)
    # Every class, including both endpoints, in one batch with per-sample t.
    t = torch.cat([torch.tensor([0, 1, T, T + 1]), torch.randint(0, T + 2, (252,), generator=gen)])
    x_t = noise_data(x0, t, sched, torch.randn(x0.shape, generator=gen, dtype=torch.float64))

    eps_hat = denoise(lambda x: mixture3d.optimal_logits(x, sched, prior), x_t, t, sched)
    eps_true = mixture3d.posterior_mean_noise(x_t, t, sched)

    assert eps_hat.dtype == torch.float64
    assert _rel_err(eps_hat, eps_true) <= 1e-6
    per_sample = (eps_hat - eps_true).norm(dim=1) / eps_true.norm(dim=1).clamp(min=1e-12)
    assert float(per_sample[1:].max()) <= 1e-6  # t=0 has ε̂ = 0 exactly
    assert torch.equal(eps_hat[0], torch.zeros(3, dtype=torch.float64))
    torch.testing.assert_close(eps_hat[3], x_t[3], rtol=1e-12, atol=1e-12)  # t=T+1: ε̂ = x


@pytest.mark.parametrize("name", SCHEDULE_NAMES)
@pytest.mark.parametrize("prior_kind", ["uniform", "non-uniform"])
def test_log_likelihood_is_exact(mixture3d, name, prior_kind):
    sched = get_schedule(name, T)
    prior = None if prior_kind == "uniform" else non_uniform_prior(T + 2)
    x, _ = mixture3d.sample(512, torch.Generator().manual_seed(2))
    calls = []

    def logits_fn(z):
        calls.append(z.shape[0])
        return mixture3d.optimal_logits(z, sched, prior)

    log_px = log_likelihood(logits_fn, x, sched, prior)
    truth = mixture3d.log_prob(x)
    assert calls == [512]  # one forward pass for the whole batch
    assert float(((log_px - truth).abs() / truth.abs()).max()) <= 1e-6


def test_likelihood_needs_the_matching_prior(mixture3d):
    """Logits trained under a non-uniform prior, read with a uniform one, are wrong: the prior matters."""
    sched = get_schedule("linear", T)
    prior = non_uniform_prior(T + 2)
    x, _ = mixture3d.sample(64, torch.Generator().manual_seed(3))
    logits_fn = lambda z: mixture3d.optimal_logits(z, sched, prior)  # noqa: E731
    right = log_likelihood(logits_fn, x, sched, prior)
    wrong = log_likelihood(logits_fn, x, sched, None)
    shift = math.log(prior[-1] / prior[0])  # log π(T+1) − log π(0); zero for the uniform prior
    assert abs(shift) > 0.1
    torch.testing.assert_close(right - wrong, torch.full_like(wrong, shift))


def test_bits_per_dim_convention():
    d = 784
    log_px = torch.tensor([-1000.0], dtype=torch.float64)
    expected = 1000.0 / (d * math.log(2)) + math.log2(127.5)
    torch.testing.assert_close(nats_to_bits_per_dim(log_px, d), torch.tensor([expected], dtype=torch.float64))
    assert LOG2_BIN_OFFSET == math.log2(127.5)


def test_bits_per_dim_of_standard_normal_logits():
    """For data from N(0, I) the optimal logits are constant in t, so log p = log N(x; 0, I)."""
    x = torch.randn(16, 1, 4, 4, dtype=torch.float64)
    logits_fn = lambda z: torch.zeros(z.shape[0], 12, dtype=z.dtype)  # noqa: E731
    bpd = bits_per_dim(logits_fn, x)
    log_normal = -0.5 * x.flatten(1).pow(2).sum(1) - 8 * math.log(2 * math.pi)
    torch.testing.assert_close(bpd, -log_normal / (16 * math.log(2)) + math.log2(127.5))
    gen = torch.Generator().manual_seed(0)
    deq = bits_per_dim(logits_fn, x, dequantize_data=True, generator=gen)
    assert not torch.equal(deq, bpd)
    gen = torch.Generator().manual_seed(0)
    u = torch.rand(x.shape, generator=gen, dtype=x.dtype)
    assert 0 <= float((u * 2 / 255).max()) < 2 / 255


def test_timesteps_follow_the_prior():
    prior = torch.zeros(12, dtype=torch.float64)
    prior[[0, 3, 11]] = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    t = sample_timesteps(20000, 12, prior, generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(t, minlength=12).double() / t.numel()
    torch.testing.assert_close(freq, prior, atol=0.015, rtol=0)
    t_uniform = sample_timesteps(1000, 12)
    assert int(t_uniform.min()) >= 0 and int(t_uniform.max()) <= 11


def test_prior_validation():
    with pytest.raises(ValueError, match="12 entries"):
        log_prior(torch.ones(5) / 5, 12)
    with pytest.raises(ValueError, match="sum to 1"):
        log_prior(torch.ones(12), 12)
    bad = torch.ones(12, dtype=torch.float64)
    bad[0] = 0
    with pytest.raises(ValueError, match="t=0 and t=T\\+1"):
        log_prior(bad / bad.sum(), 12)


def test_loss_at_optimum_matches_closed_forms(mixture3d):
    """With the optimal logits the MSE term is the Bayes error and CE the Bayes risk; both finite and
    consistent with the parts returned."""
    sched = get_schedule("ot", 50)
    x0, _ = mixture3d.sample(128, torch.Generator().manual_seed(4))
    logits_fn = lambda z: mixture3d.optimal_logits(z, sched)  # noqa: E731
    with torch.no_grad():
        parts = cdm_loss(logits_fn, x0, sched, w_ce=0.5, w_mse=2.0, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(parts.total, 0.5 * parts.ce + 2.0 * parts.mse)
    assert 0 < float(parts.mse) < 1 and 0 < float(parts.ce) < math.log(52)
    ce_only = cdm_loss(logits_fn, x0, sched, w_ce=1.0, w_mse=0.0)
    assert float(ce_only.mse) == 0.0
    with pytest.raises(ValueError, match="not both zero"):
        cdm_loss(logits_fn, x0, sched, w_ce=0.0, w_mse=0.0)


def test_loss_backpropagates_through_the_input_gradient():
    """The MSE term reaches the parameters only through ∇_x ℓ: a double backward."""
    sched = get_schedule("linear", 20)
    net = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.SiLU(), torch.nn.Linear(16, 22))
    x0 = torch.randn(32, 2)
    parts = cdm_loss(lambda z: net(z).cumsum(-1), x0, sched, w_ce=0.0, w_mse=1.0)
    parts.total.backward()
    grads = [p.grad for p in net.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert float(grads[0].abs().sum()) > 0
    with torch.no_grad():  # validation: no graph, still a real denoiser evaluation
        val = cdm_loss(lambda z: net(z).cumsum(-1), x0, sched)
    assert not val.total.requires_grad and float(val.mse) > 0
