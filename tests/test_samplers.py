"""Samplers driven by the exact mixture denoiser reproduce the mixture; the official code's grids and steps."""

import math

import pytest
import torch

from cdm_core.mixture import toy_mixture
from cdm_core.samplers import (
    RETIRED_SAMPLERS,
    SAMPLERS,
    TIME_GRIDS,
    cdm_eps_fn,
    classifier_free_guidance,
    initial_noise,
    randn_like,
    sample,
    schedule_derivatives,
    timestep_grid,
)
from cdm_core.schedules import SCHEDULE_NAMES, get_schedule

N = 3000
# Tolerances, stated: component weights within 0.03 (≈5 standard errors at N=3000) and component
# means within 0.12 of the same statistics computed on true samples with the same assignment rule.
WEIGHT_TOL = 0.03
MEAN_TOL = 0.12

# Steps for the full matrix: the paper's counts where it has one (DDIM-50, DPMS-25), 100 for DDPM
# (ancestral, noisier per step) and Euler. Euler is first order in the class index and the uniform
# path bends sharply near T (a ≈ √(2(T+1−τ)/(T+1))): 100 Euler steps miss its weights by 0.033, so
# there it takes every class.
STEPS = {"ddpm": 100, "ddim": 50, "dpmsolver2m": 25, "dpmsolver++2m": 25, "euler": 100}
EULER_UNIFORM_STEPS = 1000


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def mixture():
    return toy_mixture()


def component_stats(mixture, x):
    comp = mixture._component_log_probs(x, mixture.means, mixture.covs).argmax(-1)
    weights = torch.bincount(comp, minlength=3).double() / len(comp)
    means = torch.stack([x[comp == k].mean(0) for k in range(3)])
    return weights, means


@pytest.fixture(scope="module")
def reference_stats(mixture):
    x, _ = mixture.sample(20000, torch.Generator().manual_seed(123))
    return component_stats(mixture, x)


def run_and_check(mixture, reference_stats, sched, sampler, steps, time_grid, x, gen):
    grid = timestep_grid(sched.T, steps, time_grid)
    calls = []

    def eps_fn(x, t):
        calls.append(int(t[0]))
        return mixture.posterior_mean_noise(x, t, sched)

    out = sample(sampler, eps_fn, x, sched, steps, generator=gen, time_grid=time_grid)
    assert calls == grid[:-1]
    weights, means = component_stats(mixture, out)
    ref_weights, ref_means = reference_stats
    assert float((weights - ref_weights).abs().max()) <= WEIGHT_TOL, (weights, ref_weights)
    assert float((means - ref_means).abs().max()) <= MEAN_TOL, (means, ref_means)


@pytest.mark.parametrize("time_grid", TIME_GRIDS)
@pytest.mark.parametrize("schedule_name", SCHEDULE_NAMES)
@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_every_sampler_reproduces_the_mixture(mixture, reference_stats, sampler, schedule_name, time_grid):
    """Every sampler, schedule and grid, started from the exact x_t at the grid's first class: only the
    sampler's integration stands between it and the mixture."""
    sched = get_schedule(schedule_name, 1000)
    steps = EULER_UNIFORM_STEPS if (sampler, schedule_name) == ("euler", "uniform") else STEPS[sampler]
    t0 = timestep_grid(1000, steps, time_grid)[0]
    gen = torch.Generator().manual_seed(0)
    x0, _ = mixture.sample(N, gen)
    x = sched.a[t0] * x0 + sched.s[t0] * torch.randn(N, 2, generator=gen, dtype=torch.float64)
    run_and_check(mixture, reference_stats, sched, sampler, steps, time_grid, x, gen)


@pytest.mark.parametrize(
    "schedule_name,sampler,steps,time_grid",
    [
        ("linear", "ddim", 50, "official"),  # the paper's Table 1 / 2 protocols, as the official code runs them
        ("linear", "dpmsolver2m", 25, "official"),
        ("linear", "ddim", 50, "even"),
        ("linear", "dpmsolver++2m", 25, "even"),
        ("cosine", "ddim", 50, "official"),
        ("cosine", "dpmsolver2m", 25, "even"),
        ("ot", "euler", 100, "even"),
        ("ot", "euler", 100, "official"),
        ("uniform", "ddim", 50, "even"),
        ("uniform", "dpmsolver2m", 25, "even"),
    ],
)
def test_sampler_from_initial_noise_reproduces_mixture(
    mixture, reference_stats, schedule_name, sampler, steps, time_grid
):
    """From the start noise `cdm sample` uses (N(0, (a²+s²)·I) at the grid's first class)."""
    sched = get_schedule(schedule_name, 1000)
    gen = torch.Generator().manual_seed(0)
    x = initial_noise((N, 2), sched, gen, dtype=torch.float64, t=timestep_grid(1000, steps, time_grid)[0])
    run_and_check(mixture, reference_stats, sched, sampler, steps, time_grid, x, gen)


# --------------------------------------------------------------------------- the official code (shaharYadin/CDM)


def official_seq(T, num_sampling_steps):
    """cdm.py, CDM.__init__: the official grid and its neighbours, transcribed."""
    skip = T // num_sampling_steps
    seq = range(1, T + 1, skip)
    seq_prev = [-1] + list(seq[:-1])
    seq_next = list(seq[1:]) + [T + 1]
    return seq, seq_prev, seq_next


@pytest.mark.parametrize("steps", [50, 25])
def test_official_grid_is_the_official_codes(steps):
    seq, seq_prev, _ = official_seq(1000, steps)
    grid = timestep_grid(1000, steps, "official")
    # CDM.sample walks zip(reversed(seq), reversed(seq_prev)); s == -1 returns x̂_0, our step to class 0.
    assert list(zip(grid[:-1], grid[1:])) == [(t, max(s, 0)) for t, s in zip(reversed(seq), reversed(seq_prev))]
    assert len(grid) - 1 == steps and grid[-2:] == [1, 0]
    assert grid[:2] == ([981, 961] if steps == 50 else [961, 921])


def test_grids_agree_on_every_class_and_official_counts_as_the_official_code():
    assert timestep_grid(100, 100, "official") == timestep_grid(100, 100, "even") == list(range(100, -1, -1))
    assert len(timestep_grid(1000, 30, "official")) - 1 == len(range(1, 1001, 33)) == 31  # 30 ∤ 1000
    with pytest.raises(ValueError, match="unknown time grid 'uneven'; choose one of even, official"):
        timestep_grid(1000, 50, "uneven")


def official_loop(eps_fn, x, alpha_hat, T, steps, sampler, gen=None):
    """CDM.sample of the official code (cdm.py), transcribed for float64 and any ε-predictor."""
    alpha = torch.cat([torch.ones(1, dtype=torch.float64), alpha_hat[1 : T + 1] / alpha_hat[:T]])
    beta = 1 - alpha
    alpha_solver, sigma_solver = alpha_hat.sqrt(), (1 - alpha_hat).sqrt()
    lambda_solver = torch.log(alpha_solver / sigma_solver)
    seq, seq_prev, seq_next = official_seq(T, steps)
    eps_p1 = None
    for idx, (t, s, t_next) in enumerate(zip(reversed(seq), reversed(seq_prev), reversed(seq_next))):
        eps = eps_fn(x, torch.full((x.shape[0],), t))
        alpha_hat_t, alpha_hat_prev = alpha_hat[t], alpha_hat[s]
        beta_tilde = ((1 - alpha_hat_prev) / (1 - alpha_hat_t)) * beta[t]
        img_pred = (x - torch.sqrt(1 - alpha_hat_t) * eps) / torch.sqrt(alpha_hat_t)
        if s == -1:
            return img_pred
        if sampler == "ddpm":
            noise = torch.randn(x.shape, generator=gen, dtype=x.dtype)
            x = (
                ((torch.sqrt(alpha_hat_prev) * beta[t]) / (1 - alpha_hat_t)) * img_pred
                + ((torch.sqrt(alpha[t]) * (1 - alpha_hat_prev)) / (1 - alpha_hat_t)) * x
                + torch.sqrt(beta_tilde) * noise
            )
        elif sampler == "ddim" or idx == 0:
            x = torch.sqrt(alpha_hat_prev) * img_pred + torch.sqrt(1 - alpha_hat_prev) * eps
        else:  # second_order_dpm_solver
            tm1, tp1 = s, t_next
            m0, m1 = eps, eps_p1
            lambda_tm1, lambda_t, lambda_tp1 = lambda_solver[tm1], lambda_solver[t], lambda_solver[tp1]
            alpha_tm1, alpha_t = alpha_solver[tm1], alpha_solver[t]
            sigma_tm1 = sigma_solver[tm1]
            h, h_0 = lambda_tm1 - lambda_t, lambda_t - lambda_tp1
            D0, D1 = m0, (1.0 / h_0) * (m0 - m1)
            x = (
                (alpha_tm1 / alpha_t) * x
                - (sigma_tm1 * (torch.exp(h) - 1.0)) * D0
                - (sigma_tm1 * (torch.exp(h) - h - 1.0)) * D1
            )
        eps_p1 = eps
    return x


@pytest.mark.parametrize(
    "sampler,T,steps", [("dpmsolver2m", 1000, 25), ("dpmsolver2m", 1000, 50), ("ddim", 1000, 50), ("ddpm", 100, 100)]
)
def test_samplers_are_the_official_codes_step_for_step(mixture, sampler, T, steps):
    """On the official grid with no clipping, our sampler and the official loop give the same samples
    (DDPM with every class: on a coarser grid the official step keeps the one-class β_t)."""
    sched = get_schedule("linear", T)
    # cdm.py, CDM.__init__: alpha_hat = [1, cumprod(1 − linspace(1e-4, 0.02, T)), 0] over indices 0..T+1
    betas = torch.linspace(1e-4, 0.02, T, dtype=torch.float64)
    alpha_hat = torch.cat([torch.ones(1), torch.cumprod(1 - betas, 0), torch.zeros(1)]).double()
    torch.testing.assert_close(sched.a**2, alpha_hat, rtol=0, atol=1e-15)  # official index t = our class t
    eps_fn = lambda z, t: mixture.posterior_mean_noise(z, t, sched)  # noqa: E731
    x = torch.randn(200, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    ours = sample(sampler, eps_fn, x, sched, steps, time_grid="official", generator=torch.Generator().manual_seed(6))
    theirs = official_loop(eps_fn, x, alpha_hat, T, steps, sampler, torch.Generator().manual_seed(6))
    torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-9)


def test_dpm2_is_refused_naming_both_solvers():
    sched = get_schedule("linear", 10)
    with pytest.raises(ValueError) as err:
        sample("dpm2", None, torch.zeros(1, 2), sched, 5)
    message = str(err.value)
    assert "\n" not in message
    assert "dpmsolver2m for DPM-Solver-2 multistep on the noise prediction" in message
    assert "dpmsolver++2m for DPM-Solver++(2M) on the data prediction" in message
    assert "dpm2" not in SAMPLERS


def test_the_sample_configs_names_and_message_are_the_samplers():
    """pipelines.evaluate.config stays free of torch, so it repeats the names and the message: keep them equal."""
    from pipelines.common.config import ConfigError, apply_overrides
    from pipelines.evaluate.config import SAMPLERS as CONFIG_SAMPLERS
    from pipelines.evaluate.config import TIME_GRIDS as CONFIG_TIME_GRIDS
    from pipelines.evaluate.config import SampleConfig, sampler_problem

    assert CONFIG_SAMPLERS == tuple(SAMPLERS) and CONFIG_TIME_GRIDS == TIME_GRIDS
    assert sampler_problem("dpm2") == RETIRED_SAMPLERS["dpm2"]
    assert sampler_problem("ddim") is None
    base = {"checkpoint": "c", "out": "o"}
    with pytest.raises(ConfigError) as err:
        apply_overrides(SampleConfig, ["sampler=dpm2"], base=base)
    assert str(err.value) == f"sampler: {RETIRED_SAMPLERS['dpm2']}"
    with pytest.raises(ConfigError, match="time_grid: 'uneven' is not one of even, official"):
        apply_overrides(SampleConfig, ["time_grid=uneven"], base=base)
    with pytest.raises(ConfigError, match="clip_x0: -1.0 must be >= 0"):
        apply_overrides(SampleConfig, ["clip_x0=-1"], base=base)
    ok = apply_overrides(SampleConfig, ["sampler=dpmsolver2m", "time_grid=official", "clip_x0=0"], base=base)
    assert (ok.sampler, ok.time_grid, ok.clip_x0) == ("dpmsolver2m", "official", 0.0)


# --------------------------------------------------------------------------- Euler's derivatives


def reference_derivative_at_T(name, T):
    """dȧ/dτ and ṡ at class T from the schedule's formula (not from its arrays)."""
    if name == "ot":
        return -1 / (T + 1), 1 / (T + 1)
    if name == "uniform":
        s = T / (T + 1)
        return -s / math.sqrt(1 - s**2) / (T + 1), 1 / (T + 1)
    sched = get_schedule(name, T)
    a_T, s_T = float(sched.a[T]), float(sched.s[T])
    if name == "linear":  # d log a/dτ = ½ d log ᾱ/dτ = ½ log(1 − β_T) between the last two classes
        a_dot = a_T * 0.5 * math.log(1 - 0.02)
    else:  # cosine: a = cos θ(τ)/cos θ(0), θ = (τ/T + o)/(1 + o)·π/2, the curve before β is clipped at 0.999
        o = 0.008
        a_dot = -math.sin(math.pi / 2) * (math.pi / 2) / (T * (1 + o)) / math.cos(o / (1 + o) * math.pi / 2)
    return a_dot, -a_T * a_dot / s_T  # VP: a² + s² = 1


# Relative tolerance at T. cosine's arrays kink at T (its last β is clipped to 0.999, so a_T ≠ 0 where the
# formula's a is 0): the arrays' slope there differs from the formula's by 5%.
DERIVATIVE_RTOL = {"ot": 1e-9, "uniform": 1e-9, "linear": 0.01, "cosine": 0.1}


@pytest.mark.parametrize("T", [1000, 100])
@pytest.mark.parametrize("name", SCHEDULE_NAMES)
def test_euler_derivatives_at_T_match_the_schedules_formula(name, T):
    sched = get_schedule(name, T)
    a_dot, s_dot = schedule_derivatives(sched)
    assert a_dot.shape == s_dot.shape == (T + 1,)
    ref_a, ref_s = reference_derivative_at_T(name, T)
    rtol = DERIVATIVE_RTOL[name]
    assert abs(float(a_dot[T]) - ref_a) <= rtol * abs(ref_a), (float(a_dot[T]), ref_a)
    if name != "cosine":  # cosine's ṡ_T ∝ a_T, which its formula puts at 0
        assert abs(float(s_dot[T]) - ref_s) <= rtol * abs(ref_s), (float(s_dot[T]), ref_s)
    assert float(s_dot[T]) > 0  # noise grows with τ
    # The central difference through the pinned a[T+1] = 0 is what this test is for.
    old = float(torch.gradient(sched.a)[0][T])
    if name != "ot":  # on the straight path the pinned 0 is on the line, so the old difference was exact
        assert abs(old - ref_a) > 3 * rtol * abs(ref_a)
    # float32 arrays (what `cdm sample` passes) give the same derivatives.
    a32, s32 = schedule_derivatives(sched.to(dtype=torch.float32))
    torch.testing.assert_close(a32, a_dot, rtol=1e-3, atol=1e-7)


def test_euler_derivatives_inside_match_the_formulas():
    T = 1000
    tau = torch.arange(1, T, dtype=torch.float64)
    a_dot, _ = schedule_derivatives(get_schedule("cosine", T))
    o = 0.008
    theta = (tau / T + o) / (1 + o) * math.pi / 2
    formula = -torch.sin(theta) * (math.pi / 2) / (T * (1 + o)) / math.cos(o / (1 + o) * math.pi / 2)
    torch.testing.assert_close(a_dot[1 : T - 1], formula[:-1], rtol=1e-4, atol=0)  # all but T−1, next to the kink
    a_dot, s_dot = schedule_derivatives(get_schedule("ot", T))
    assert bool((a_dot == -1 / (T + 1)).all() and (s_dot == 1 / (T + 1)).all())


def test_cdm_eps_fn_drives_samplers_through_autograd(mixture):
    """The CDM route (logits → autograd ε̂) and the closed-form ε̂ give the same DDIM trajectory."""
    sched = get_schedule("linear", 200)
    x = initial_noise((64, 2), sched, torch.Generator().manual_seed(1), dtype=torch.float64)
    via_logits = sample("ddim", cdm_eps_fn(lambda z: mixture.optimal_logits(z, sched), sched), x, sched, 20)
    closed_form = sample("ddim", lambda z, t: mixture.posterior_mean_noise(z, t, sched), x, sched, 20)
    torch.testing.assert_close(via_logits, closed_form, rtol=1e-9, atol=1e-9)


def test_grid_and_validation():
    assert timestep_grid(1000, 1) == [1000, 0]
    grid = timestep_grid(1000, 50)
    assert len(grid) == 51 and grid[0] == 1000 and grid[-2] == 1 and grid[-1] == 0
    assert all(a > b for a, b in zip(grid, grid[1:]))
    with pytest.raises(ValueError, match="between 1 and T"):
        timestep_grid(10, 11)
    with pytest.raises(ValueError, match="unknown sampler 'heun'; choose one of ddpm, ddim, dpmsolver2m"):
        sample("heun", None, torch.zeros(1, 2), get_schedule("ot", 10), 5)


def test_per_sample_generators_make_noise_independent_of_batching():
    gens = [torch.Generator().manual_seed(s) for s in (7, 8, 9)]
    batch = randn_like(torch.empty(3, 4), gens)
    alone = randn_like(torch.empty(1, 4), [torch.Generator().manual_seed(8)])
    torch.testing.assert_close(batch[1:2], alone)


def test_ddpm_is_reproducible_per_seed_and_batch_split(mixture):
    sched = get_schedule("linear", 100)
    eps_fn = lambda z, t: mixture.posterior_mean_noise(z, t, sched)  # noqa: E731

    def run(seeds):
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        x = initial_noise((len(seeds), 2), sched, gens, dtype=torch.float64)
        return sample("ddpm", eps_fn, x, sched, 100, generator=gens)

    together = run([0, 1, 2, 3])
    split = torch.cat([run([0, 1]), run([2, 3])])
    torch.testing.assert_close(together, split)


def test_classifier_free_guidance_combination():
    cond = lambda x, t: torch.ones_like(x)  # noqa: E731
    uncond = lambda x, t: torch.zeros_like(x)  # noqa: E731
    x, t = torch.zeros(2, 3), torch.zeros(2, dtype=torch.long)
    torch.testing.assert_close(classifier_free_guidance(cond, uncond, 2.0)(x, t), torch.full((2, 3), 3.0))
    assert classifier_free_guidance(cond, uncond, 0.0) is cond


def test_ddm_loss_trains_a_denoiser_on_the_same_schedule():
    from cdm_core.ddm import ddm_loss
    from cdm_core.networks import MLPDenoiser

    mixture = toy_mixture()
    sched = get_schedule("linear", 100)
    model = MLPDenoiser(2, 100, hidden=64, depth=2)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(300):
        x0 = mixture.sample(256, gen)[0].float()
        loss = ddm_loss(model, x0, sched.to(dtype=torch.float32), generator=gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    # Unit-variance noise: predicting 0 scores 1; a trained denoiser does clearly better.
    assert sum(losses[:10]) / 10 > 0.8 and sum(losses[-50:]) / 50 < 0.75
