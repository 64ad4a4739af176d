"""Likelihoods of any ε-predictor: the probability-flow ODE (exact) and the DDPM variational bound.

Both work for a CDM and a DDM alike, so the CDM's one-pass likelihood (Theorem
3.2, `cdm_core.objective.log_likelihood`) can be set beside the two classic ones.

Probability-flow ODE (Song et al. 2021). The marginals x_τ = a(τ)·x_0 + s(τ)·ε
of the schedule's continuous extension (`Schedule.continuous`, τ ∈ [0, T+1] in
class units, C¹ in τ) are transported by

    dx/dτ = v(x, τ) = ȧ·x̂_0 + ṡ·ε̂,   x̂_0 = (x − s·ε̂)/a,   ε̂ = E[ε | x_τ = x],

and along a solution log p_0(x_0) = log p_τ1(x_τ1) + ∫_0^τ1 ∇·v dτ, with
∇·v = d·ȧ/a + (ṡ − ȧ·s/a)·∇·ε̂: the identity part of the Jacobian is exact, only
∇·ε̂ is estimated (exactly with d backward passes, or by Hutchinson's zᵀ(∂ε̂/∂x)z
with one Rademacher probe z fixed for the whole solve, as in FFJORD and score_sde).

The ends. At τ = 0 (s = 0) every schedule's extension has finite ȧ and ṡ, and
ε̂ = 0, so the drift is regular and the solve starts at the data itself, with no
ε-offset in time. At τ = T+1 (a = 0) x̂_0 is 0/0 and `uniform`'s ȧ is infinite
(a ~ √(T+1−τ)). So the solve runs in u ∈ [0, 1 − √δ] with τ = (T+1)·u·(2 − u),
dτ/du = 2(T+1)(1−u), in which every schedule's a and s are smooth at both ends
(`uniform`'s a = (1−u)·√(1+s)), and stops at τ_end = (T+1)(1 − δ), δ = `end_gap`
= 1e-12 by default. There a(τ_end) is 1.0e-12 (`ot`), 1.7e-11 (`linear`, T = 1000),
4e-15 (`cosine`) or 1.4e-6 (`uniform`), and the terminal density is
N(0, (a² + s²)·I), the marginal of zero-mean, unit-variance data: its error is
first order in a(τ_end), ≈ a·x·E[x_0]/s² nats, 1.5e-6 nats on the test mixture
with `uniform` and below 1e-10 on the others. The last step lands on u_end (it
must not pass it: beyond u = 1 the time change folds back), and steps also land
on `Schedule.continuous_breaks` (cosine's clipped end, where the curvature of
the extension changes abruptly within a few classes). Dividing by a near the
end costs precision only logarithmically (∫ |ȧ|/a dτ is the log of the a's
travelled): ~30 ε_mach relative.

torchdiffeq solves the ODE. It is chosen over scipy's `solve_ivp` because it
integrates the tensors where they are, GPU included: no evaluation copies the
state to the host and back (its step-size control reads one scalar per step).
The step size is shared by the batch and its error norm is the largest
per-sample RMS, so every sample meets `rtol`/`atol` (a batch-wide RMS would let a
hard sample hide among easy ones). NFE is the number of ε̂ evaluations, the same
for every sample of a batch.

ε̂ between classes. `eps_fn(x, t)` takes t as a float (B,) tensor in [0, T+1].
A CDM has logits only at the classes: `cdm_continuous_eps_fn` interpolates its
log-density linearly in τ between neighbouring classes (one forward pass gives
all T+2 logits, one input-gradient backward gives ε̂). A DDM's sinusoidal time
embedding takes the float τ itself up to T, and follows the CDM's rule between
T and T+1 (`ddm_continuous_eps_fn`).

Variational bound (`elbo_bits_per_dim`). The DDPM bound (Ho et al. 2020) over
the schedule's own classes for 8-bit data in [−1, 1]. The chain starts from
x_{T+1} ~ N(0, I), which is exactly q(x_{T+1} | x_0) (a = 0, s = 1), so the prior
term KL(q(x_{T+1}|x_0) ‖ N(0, I)) is 0; the step from T+1 to the top kept class
takes its place. The Gaussian reverse steps use the posterior mean with x̂_0 from
ε̂ and the posterior variance β̃ (Ho et al.'s fixed small variance); the last
step is the discretized Gaussian decoder, with the variance improved-diffusion
clips it to (the β̃ of the step above). With a fixed variance each step charges
½·ΔSNR·‖x_0 − x̂_0‖² at its noisier end, so the bound is loosest where SNR is
high and steps are coarse: respacing (`stride`) loosens it fast.

Its bits/dim are those of a discrete probability, −log2 P(x)/d, with no bin
offset, so they compare directly with the one-pass figure's
−log p(x)/(d ln 2) + log2(127.5) (`cdm_core.objective.bits_per_dim`): a density
times the (2/255)^d bin volume is the probability of the bin to first order,
and with uniform dequantization the one-pass figure is itself an upper bound of
the discrete NLL (Jensen), as the ELBO is.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch

from cdm_core.objective import LOG2_BIN_OFFSET, log_prior, nats_to_bits_per_dim
from cdm_core.samplers import EpsFn, Generators, randn_like
from cdm_core.schedules import Schedule

__all__ = [
    "Elbo",
    "cdm_continuous_eps_fn",
    "ddm_continuous_eps_fn",
    "discretized_gaussian_log_likelihood",
    "elbo_bits_per_dim",
    "link01_expected_nats",
    "log_snr_classes",
    "ode_log_likelihood",
    "one_pass_minus_elbo_bpd",
    "rademacher_like",
]

TRACES = ("exact", "hutchinson")
BIN_HALF_WIDTH = 1.0 / 255.0  # 8-bit data in [-1, 1]: 256 bins of width 2/255


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) values shaped (B, 1, …, 1) in like's dtype, to broadcast against it."""
    return values.to(like.dtype).reshape(-1, *([1] * (like.dim() - 1)))


def _on_device(schedule: Schedule) -> Callable[[torch.device], Schedule]:
    """The schedule in float64 on a given device, copied once per device (an ε̂ call must not copy it each time)."""
    copies: dict[torch.device, Schedule] = {}

    def at(device: torch.device) -> Schedule:
        if device not in copies:
            copies[device] = schedule.to(device=device, dtype=torch.float64)
        return copies[device]

    return at


def _batch_tau(t: torch.Tensor | float, x: torch.Tensor, T: int) -> torch.Tensor:
    return torch.as_tensor(t, dtype=torch.float64, device=x.device).expand(x.shape[0]).clamp(0, T + 1)


def cdm_continuous_eps_fn(model: Callable, schedule: Schedule, y: torch.Tensor | None = None) -> EpsFn:
    """ε̂ of a CDM at real τ: Theorem 3.1 on the log-density interpolated linearly between classes.

    For τ = k + w (k = ⌊τ⌋, w ∈ [0, 1); τ = T+1 is k = T, w = 1):

        log p_τ(x) ≈ (1−w)·(ℓ_k − ℓ_{T+1}) + w·(ℓ_{k+1} − ℓ_{T+1}) + log N(x; 0, I) + const,
        ε̂(x, τ) = −s(τ)·∇_x log p_τ = s(τ)·(∇_x[ℓ_{T+1} − (1−w)ℓ_k − w·ℓ_{k+1}] + x),

    which is Theorem 3.1 exactly at integer τ, and ε̂ = x at T+1. One forward pass
    (all T+2 logits) and one input-gradient backward per call. When x requires
    grad the result is differentiable in x (the ODE's divergence needs it).
    What it costs in accuracy is the interpolation's: with a mixture's exact
    logits at T = 1000 the ODE's log p is off by 2e-4 (`linear`), 4e-4 (`cosine`),
    1e-5 (`ot`) and 8e-3 (`uniform`, whose class T still has a = 0.045, far from
    the N(0, I) of T+1) relative; at T = 100, `cosine`'s 4e-4 grows to 3e-3.
    `model(x)` or, with labels, `model(x, y)` returns post-cumsum logits.
    """
    logits_fn = model if y is None else (lambda z: model(z, y))
    T, schedule_at = schedule.T, _on_device(schedule)

    def eps_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        tau = _batch_tau(t, x, T)
        k = tau.floor().long().clamp(max=T)
        s = schedule_at(x.device).continuous(tau)[1]
        create = x.requires_grad
        with torch.enable_grad():
            x_in = x if create else x.detach().requires_grad_(True)
            logits = logits_fn(x_in)
            w = (tau - k).to(logits.dtype)
            lower = logits.gather(1, k[:, None]).squeeze(1)
            upper = logits.gather(1, (k + 1)[:, None]).squeeze(1)
            ratio = logits[:, -1] - ((1 - w) * lower + w * upper)
            (grad,) = torch.autograd.grad(ratio.sum(), x_in, create_graph=create)
        return _per_sample(s, x) * (grad + x)

    return eps_fn


def ddm_continuous_eps_fn(model: Callable, schedule: Schedule, y: torch.Tensor | None = None) -> EpsFn:
    """ε̂ of a DDM `model(x, t[, y])` at real τ.

    The networks embed t as sinusoids of the float t (`cdm_core.networks.timestep_embedding`),
    so τ ∈ [0, T] goes in directly. They were trained on the classes 1..T only:
    between integers the embedding is smooth but untrained, and τ < 1 is a mild
    extrapolation (the drift weighs ε̂ by ṡ there, so an error stays bounded).
    Above T the model is not used: class T+1 is known exactly (ε̂ = x), and the
    drift weighs an error of ε̂ by s·ȧ/a ~ 1/(T+1−τ), so a model's residual error
    at T+1 would make the integral diverge logarithmically. There ε̂ follows the
    CDM's rule, the log-density linear between classes T and T+1 (w = τ − T):
    ε̂ = s(τ)·((1−w)·ε̂_T/s_T + w·x), with ε̂_T the model at T. One forward pass.
    """
    T, schedule_at = schedule.T, _on_device(schedule)
    s_T = float(schedule.s[T])

    def eps_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        tau = _batch_tau(t, x, T)
        t_in = tau.clamp(max=T)
        eps = model(x, t_in) if y is None else model(x, t_in, y)
        w = _per_sample((tau - T).clamp(min=0), x)
        s = _per_sample(schedule_at(x.device).continuous(tau)[1], x)
        blended = s * ((1 - w) * eps / s_T + w * x)
        return torch.where(_per_sample(tau, x) > T, blended, eps)

    return eps_fn


def rademacher_like(x: torch.Tensor, generator: Generators = None) -> torch.Tensor:
    """±1 with equal probability, shaped like x; a list of generators gives each sample its own stream."""
    if generator is None or isinstance(generator, torch.Generator):
        dev = generator.device if generator is not None else x.device
        bits = torch.randint(0, 2, x.shape, generator=generator, device=dev).to(x.device)
    else:
        if len(generator) != x.shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {x.shape[0]}")
        bits = torch.stack([torch.randint(0, 2, x.shape[1:], generator=g, device=g.device) for g in generator])
    return (2 * bits - 1).to(device=x.device, dtype=x.dtype)


def _divergence(eps: torch.Tensor, x: torch.Tensor, probe: torch.Tensor | None) -> torch.Tensor:
    """∇·ε̂ per sample: exact (one backward per dimension) or zᵀ(∂ε̂/∂x)z for the probe z."""
    if probe is not None:
        (g,) = torch.autograd.grad((eps * probe).sum(), x)
        return (g * probe).flatten(1).sum(1)
    flat = eps.flatten(1)
    div = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    for i in range(flat.shape[1]):
        (g,) = torch.autograd.grad(flat[:, i].sum(), x, retain_graph=i + 1 < flat.shape[1])
        div = div + g.flatten(1)[:, i]
    return div


@torch.no_grad()
def ode_log_likelihood(
    eps_fn: EpsFn,
    x: torch.Tensor,
    schedule: Schedule,
    *,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    trace: str = "exact",
    generator: Generators = None,
    method: str = "dopri5",
    end_gap: float = 1e-12,
) -> tuple[torch.Tensor, int]:
    """log p_0(x) in nats per sample under the probability-flow ODE of `eps_fn`, and the NFE per sample.

    `eps_fn(x, t)` must be differentiable in x (the divergence differentiates it)
    and takes t as a float (B,) tensor of classes in [0, T+1] (`cdm_continuous_eps_fn`,
    `ddm_continuous_eps_fn`, or an exact one). `trace`: "exact" (d backward passes
    per evaluation: small d) or "hutchinson" (one backward, one Rademacher probe
    per sample for the whole solve, drawn from `generator`: a generator, or one
    per sample for per-sample seeds). `method` is any adaptive torchdiffeq solver;
    `end_gap` the δ of τ_end = (T+1)(1 − δ) (module docstring). The NFE (an int,
    shared by the batch) counts `eps_fn` calls; an exact trace adds d backward
    passes to each, a Hutchinson trace one.
    """
    # Deferred: torchdiffeq imports scipy, ~1 s that every training and batch worker would pay without an ODE.
    from torchdiffeq import odeint  # noqa: PLC0415

    if trace not in TRACES:
        raise ValueError(f"unknown trace {trace!r}; choose one of {', '.join(TRACES)}")
    if not 0 < end_gap < 1:
        raise ValueError(f"end_gap must be in (0, 1), got {end_gap}")
    schedule = schedule.to(device=x.device, dtype=torch.float64)
    T, B, shape = schedule.T, x.shape[0], x.shape
    dims = x[0].numel()
    probe = rademacher_like(x, generator) if trace == "hutchinson" else None
    nfe = 0

    def velocity(u: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        nonlocal nfe
        u = u.to(torch.float64)
        tau = (T + 1) * u * (2 - u)
        dtau_du = 2 * (T + 1) * (1 - u)
        a, s = schedule.continuous(tau)
        a_dot, s_dot = schedule.continuous_derivatives(tau)
        with torch.enable_grad():
            x_u = state[:, :dims].reshape(shape).detach().requires_grad_(True)
            eps = eps_fn(x_u, tau.expand(B)).to(x_u.dtype)
            nfe += 1
            div_eps = _divergence(eps, x_u, probe)
        x_u, eps = x_u.detach(), eps.detach()
        x0_hat = (x_u - s * eps) / a
        v = a_dot * x0_hat + s_dot * eps
        div = dims * a_dot / a + (s_dot - a_dot * s / a) * div_eps.detach()
        return dtau_du * torch.cat([v.flatten(1), div[:, None]], dim=1)

    def per_sample_norm(err: torch.Tensor) -> torch.Tensor:
        return err.reshape(B, -1).pow(2).mean(1).sqrt().max()

    state = torch.cat([x.flatten(1), torch.zeros(B, 1, dtype=x.dtype, device=x.device)], dim=1)
    u_end = 1.0 - math.sqrt(end_gap)
    # Steps land on the schedule's breaks and on u_end (rather than passing it: past u = 1 the time change folds back).
    breaks = [1 - math.sqrt(1 - k / (T + 1)) for k in schedule.continuous_breaks()]
    options = {"norm": per_sample_norm, "step_t": torch.tensor([*breaks, u_end], dtype=torch.float64)}
    u = torch.tensor([0.0, u_end], dtype=torch.float64, device=x.device)
    end = odeint(velocity, state, u, rtol=rtol, atol=atol, method=method, options=options)[-1]
    a_end, s_end = schedule.continuous(torch.tensor((T + 1) * (1 - end_gap), dtype=torch.float64))
    var_end = float(a_end**2 + s_end**2)
    x_end, integral = end[:, :dims].to(torch.float64), end[:, dims].to(torch.float64)
    log_terminal = -0.5 * (x_end.pow(2).sum(1) / var_end + dims * math.log(2 * math.pi * var_end))
    return log_terminal + integral, nfe


def _log_normal_interval(lower: torch.Tensor, upper: torch.Tensor) -> torch.Tensor:
    """log(Φ(upper) − Φ(lower)) for lower < upper (±inf allowed), stable in both tails."""
    flip = lower > 0  # work in the left tail, where log Φ keeps its precision
    lower, upper = torch.where(flip, -upper, lower), torch.where(flip, -lower, upper)
    log_up, log_low = torch.special.log_ndtr(upper), torch.special.log_ndtr(lower)
    return log_up + torch.log(-torch.expm1(log_low - log_up))


def discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """log P(bin of x) under N(mean, exp(log_scale)²), elementwise, for 8-bit data in [−1, 1].

    improved-diffusion's `discretized_gaussian_log_likelihood`: the bin is
    x ± 1/255, the edge bins reach to ±∞. Computed without its 1e-12 floors,
    with log Φ in both tails, so it is exact in float64.
    """
    inv_scale = torch.exp(-log_scale)
    centered = x - mean
    upper = torch.where(x > 1 - 1e-3, torch.full_like(x, math.inf), (centered + BIN_HALF_WIDTH) * inv_scale)
    lower = torch.where(x < -1 + 1e-3, torch.full_like(x, -math.inf), (centered - BIN_HALF_WIDTH) * inv_scale)
    return _log_normal_interval(lower, upper)


class Elbo(NamedTuple):
    """The variational bound per sample and its parts, with the NFE per sample.

    bpd, nats: (B,) the bound in bits per dimension and in nats. nfe: ε̂ calls per
    sample, one per kept noisy class. classes: the chain 0, c_1, …, c_K, T+1.
    terms: (B, K+1) nats, summing to `nats`: column 0 the decoder −log p(x_0 | x_{c_1}),
    column i (1 ≤ i < K) the KL of the step c_{i+1} → c_i, column K the step T+1 → c_K.
    """

    bpd: torch.Tensor
    nfe: int
    nats: torch.Tensor
    terms: torch.Tensor
    classes: tuple[int, ...]


def _check_8bit(x: torch.Tensor) -> None:
    levels = (x.detach().to(torch.float64) + 1) * 127.5
    if not bool(
        ((levels - levels.round()).abs() <= 1e-3).all() and (levels >= -1e-3).all() and (levels <= 255 + 1e-3).all()
    ):
        raise ValueError(
            "the ELBO's discretized decoder needs 8-bit data mapped to [-1, 1]: values k/127.5 − 1, k = 0..255"
        )


@torch.no_grad()
def elbo_bits_per_dim(
    eps_fn: EpsFn,
    x: torch.Tensor,
    schedule: Schedule,
    *,
    stride: int = 1,
    classes: tuple[int, ...] | list[int] | None = None,
    generator: Generators = None,
    clip_x0: float | None = None,
) -> Elbo:
    """The DDPM variational bound (Ho et al. 2020) in bits/dim for 8-bit data x in [−1, 1], per sample.

    The chain keeps the noisy classes c = 1, 1+stride, 1+2·stride, … ≤ T (every
    class for stride 1; improved-diffusion's respacing keeps its first step too),
    between class 0 (the data) and T+1 (N(0, I), so the prior term is 0), or the
    given `classes` (increasing, in 1..T; e.g. `log_snr_classes`) instead. Each
    kept class c costs one `eps_fn` call at x_c ~ q(x_c | x_0) (fresh noise from
    `generator`, or one generator per sample), whose x̂_0 = (x_c − s_c·ε̂)/a_c
    (clipped to ±clip_x0 if set) gives the reverse step's mean. Between kept
    classes c > c' with the marginals' a, s, both Gaussians share the posterior
    variance β̃ = (s_c² − (a_c/a_c')²·s_c'²)·s_c'²/s_c², so the KL is the mean term,
    ½·(SNR_c' − SNR_c)·‖x_0 − x̂_0‖² (SNR = a²/s²; Kingma et al. 2021). The top step
    from T+1 has no call: x_{T+1} carries nothing of x_0, x̂_0 := 0, and its KL is
    ½·SNR_{c_K}·‖x_0‖², DDPM's prior term in all but name. The decoder from c_1 is
    a discretized Gaussian at x̂_0 with the β̃ of the step from the next kept
    class (improved-diffusion's clipped variance). `eps_fn(x, t)` takes integer
    classes t (a (B,) int64 tensor), as the samplers' do.
    """
    if not isinstance(stride, int) or stride < 1:
        raise ValueError(f"stride must be a positive integer, got {stride!r}")
    _check_8bit(x)
    host = schedule.to(device="cpu", dtype=torch.float64)
    T, dims = host.T, x[0].numel()
    a, s = host.a.tolist(), host.s.tolist()
    if classes is None:
        kept = list(range(1, T + 1, stride))
    else:
        kept = [int(c) for c in classes]
        if stride != 1:
            raise ValueError("give the ELBO a stride or its classes, not both")
        if not kept or kept[0] < 1 or kept[-1] > T or any(b <= c for c, b in zip(kept, kept[1:])):
            raise ValueError(f"classes must be increasing and within 1..{T}, got {kept[:5]}…")
    chain = [0, *kept, T + 1]
    x0 = x.to(torch.float64)
    terms = []
    for i, c in enumerate(kept):
        x_c = a[c] * x + s[c] * randn_like(x, generator)
        eps = eps_fn(x_c, torch.full((x.shape[0],), c, dtype=torch.long, device=x.device)).to(torch.float64)
        x0_hat = (x_c.to(torch.float64) - s[c] * eps) / a[c]
        if clip_x0 is not None:
            x0_hat = x0_hat.clamp(-clip_x0, clip_x0)
        if i == 0:
            above = chain[2]
            var = (s[above] ** 2 - (a[above] / a[c]) ** 2 * s[c] ** 2) * s[c] ** 2 / s[above] ** 2
            log_p = discretized_gaussian_log_likelihood(x0, x0_hat, torch.full_like(x0, 0.5 * math.log(var)))
            terms.append(-log_p.flatten(1).sum(1))
        else:
            below = kept[i - 1]
            terms.append(_gaussian_step_kl(x0, x0_hat, a[below] ** 2 / s[below] ** 2 - a[c] ** 2 / s[c] ** 2))
    top = kept[-1]
    terms.append(_gaussian_step_kl(x0, torch.zeros_like(x0), a[top] ** 2 / s[top] ** 2))
    terms_t = torch.stack(terms, dim=1)
    nats = terms_t.sum(1)
    return Elbo(nats_to_bits_per_dim(-nats, dims, offset=0.0), len(kept), nats, terms_t, tuple(chain))


def _gaussian_step_kl(x0: torch.Tensor, x0_hat: torch.Tensor, snr_gain: float) -> torch.Tensor:
    """KL of two Gaussian reverse steps that share their variance: ½·(SNR_c' − SNR_c)·‖x_0 − x̂_0‖² per sample."""
    return 0.5 * snr_gain * (x0 - x0_hat).flatten(1).pow(2).sum(1)


def log_snr_classes(schedule: Schedule, count: int) -> tuple[int, ...]:
    """Up to `count` classes of 1..T evenly spaced in log-SNR (1 and T always in): a cheap ELBO chain.

    An even stride spends its steps where SNR is low and the bound's steps cost little, and leaves the
    high-SNR end coarse, where each step charges ½·ΔSNR·‖x_0 − x̂_0‖². Each target log-SNR takes the
    nearest class; where classes are sparser than the targets (the ends) fewer than `count` remain.
    """
    if not isinstance(count, int) or count < 1:
        raise ValueError(f"count must be a positive integer, got {count!r}")
    T = schedule.T
    if count >= T:
        return tuple(range(1, T + 1))
    log_snr = schedule.to(device="cpu", dtype=torch.float64).log_snr()[1 : T + 1]  # decreasing in t
    targets = torch.linspace(float(log_snr[0]), float(log_snr[-1]), count, dtype=torch.float64)
    nearest = (log_snr[None, :] - targets[:, None]).abs().argmin(1) + 1
    return tuple(sorted(set(nearest.tolist())))


def link01_expected_nats(schedule: Schedule, dims: int, prior: torch.Tensor | None = None) -> float:
    """d·ln(√(2π)·s₁/Δ) + log π(0) − log π(1), Δ = 2/255: the scale of ℓ₀ − ℓ₁ on 8-bit data.

    The ℓ₀ − ℓ₁ at which Theorem 3.2 gives bin probability ÷ bin volume at an isolated grid point: there
    class 1's density is the bin's probability over (√(2π)·s₁)^d and class 0's should be it over Δ^d.
    A scale to set the measured mean beside, not a prediction (neighbouring levels overlap, a₁ < 1).
    """
    s1 = float(schedule.s[1])
    log_pi = log_prior(prior, schedule.num_classes)
    return dims * math.log(math.sqrt(2 * math.pi) * s1 / (2 * BIN_HALF_WIDTH)) + float(log_pi[0] - log_pi[1])


def one_pass_minus_elbo_bpd(one_pass_bpd, elbo_bpd, offset: float = LOG2_BIN_OFFSET):
    """One-pass minus ELBO bits/dim on one footing: the one-pass figure (bin offset `offset`) moved to the
    standard convention, where a density's bits/dim compare with the ELBO's discrete ones. Above 0 the
    one-pass figure contradicts a bound of the same model. Works on floats, arrays and tensors alike."""
    return one_pass_bpd - offset + LOG2_BIN_OFFSET - elbo_bpd
