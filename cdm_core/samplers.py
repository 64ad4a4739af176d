"""Samplers: stateless functions of an ε-predictor, shared by CDM and DDM.

`eps_fn(x, t)` returns ε̂ for a batch x at integer classes t (a (B,) tensor).
For a CDM it is `cdm_eps_fn(model, schedule)` (a forward and a backward pass
per call); for the DDM baseline `ddm_eps_fn(model)` (one forward pass).

Every sampler walks a decreasing grid of classes T = t_0 > t_1 > … > t_S = 0
(`timestep_grid`), uses one ε̂ evaluation per step (S in all) and returns the
final x̂_0. They start at class T, not T+1: at T+1 the signal scale is exactly
0, so x̂_0 is undefined there. The start noise comes from `initial_noise`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from cdm_core.objective import denoise
from cdm_core.schedules import Schedule

EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Generators = torch.Generator | Sequence[torch.Generator] | None


def cdm_eps_fn(model: Callable, schedule: Schedule, y: torch.Tensor | None = None) -> EpsFn:
    """ε-predictor of a CDM classifier through Theorem 3.1 (forward + input-gradient backward)."""

    def eps_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        logits_fn = model if y is None else (lambda z: model(z, y))
        return denoise(logits_fn, x, t, schedule).detach()

    return eps_fn


def ddm_eps_fn(model: Callable, y: torch.Tensor | None = None) -> EpsFn:
    """ε-predictor of a DDM denoiser `model(x, t, y)`."""

    @torch.no_grad()
    def eps_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return model(x, t) if y is None else model(x, t, y)

    return eps_fn


def classifier_free_guidance(eps_cond: EpsFn, eps_uncond: EpsFn, scale: float) -> EpsFn:
    """ε = (1+w)·ε_cond − w·ε_uncond; w = 0 is the plain conditional model."""
    if scale == 0:
        return eps_cond

    def eps_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return (1 + scale) * eps_cond(x, t) - scale * eps_uncond(x, t)

    return eps_fn


def timestep_grid(T: int, steps: int) -> list[int]:
    """`steps` evenly spaced classes from T down to 1, then 0: steps+1 grid points, `steps` ε̂ calls."""
    if not 1 <= steps <= T:
        raise ValueError(f"steps must be between 1 and T={T}, got {steps}")
    grid = torch.linspace(T, 1, steps, dtype=torch.float64).round().long().tolist()
    return grid + [0]


def randn_like(x: torch.Tensor, generator: Generators) -> torch.Tensor:
    """Standard normal noise shaped like x; a list of generators gives each sample its own stream,
    so a sample's noise depends only on its own seed, not on batch composition."""
    if generator is None or isinstance(generator, torch.Generator):
        dev = generator.device if generator is not None else x.device
        return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=dev).to(x.device)
    if len(generator) != x.shape[0]:
        raise ValueError(f"got {len(generator)} generators for a batch of {x.shape[0]}")
    return torch.stack(
        [torch.randn(x.shape[1:], generator=g, dtype=x.dtype, device=g.device).to(x.device) for g in generator]
    )


def initial_noise(
    shape: Sequence[int], schedule: Schedule, generator: Generators = None, device=None, dtype=torch.float32
) -> torch.Tensor:
    """Start point at class T: N(0, (a_T² + s_T²)·I), i.e. x_T for data of unit variance per dimension."""
    host = _on_host(schedule)
    scale = float((host.a[-2] ** 2 + host.s[-2] ** 2).sqrt())
    return scale * randn_like(torch.empty(shape, device=device, dtype=dtype), generator)


def _on_host(schedule: Schedule) -> Schedule:
    """The schedule's numbers on the CPU: a sampler reads a_t and s_t as Python floats every step, and
    reading them from a GPU tensor would wait for the GPU each time (the values are the same)."""
    return schedule.to(device="cpu")


def _coefs(schedule: Schedule, t: int) -> tuple[float, float]:
    return float(schedule.a[t]), float(schedule.s[t])


def _predict_x0(x, eps, a, s, clip_x0):
    x0 = (x - s * eps) / a
    return x0.clamp(-clip_x0, clip_x0) if clip_x0 is not None else x0


def _batch_t(t: int, x: torch.Tensor) -> torch.Tensor:
    return torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)


def ddpm_sample(
    eps_fn: EpsFn,
    x: torch.Tensor,
    schedule: Schedule,
    steps: int,
    *,
    generator: Generators = None,
    clip_x0: float | None = None,
) -> torch.Tensor:
    """Ancestral sampling with the posterior variance (Ho et al. 2020), on any (a, s) path and any grid.

    Between classes t > t' the forward process is x_t | x_t' ~ N(a_{t|t'} x_t', σ²_{t|t'} I) with
    a_{t|t'} = a_t/a_t' and σ²_{t|t'} = s_t² − a_{t|t'}² s_t'²; the step samples q(x_t' | x_t, x̂_0).
    """
    grid = timestep_grid(schedule.T, steps)
    schedule = _on_host(schedule)  # eps_fn holds its own copy on the model's device
    for t, t_next in zip(grid[:-1], grid[1:]):
        a_t, s_t = _coefs(schedule, t)
        a_n, s_n = _coefs(schedule, t_next)
        x0 = _predict_x0(x, eps_fn(x, _batch_t(t, x)), a_t, s_t, clip_x0)
        a_ratio = a_t / a_n
        var_step = s_t**2 - a_ratio**2 * s_n**2
        mean = (a_ratio * s_n**2 / s_t**2) * x + (a_n * var_step / s_t**2) * x0
        var = var_step * s_n**2 / s_t**2
        x = mean + var**0.5 * randn_like(x, generator) if t_next > 0 else mean
    return x


def ddim_sample(
    eps_fn: EpsFn,
    x: torch.Tensor,
    schedule: Schedule,
    steps: int,
    *,
    clip_x0: float | None = None,
    generator: Generators = None,
) -> torch.Tensor:
    """Deterministic DDIM (η = 0): x_t' = a_t' x̂_0 + s_t' ε̂."""
    grid = timestep_grid(schedule.T, steps)
    schedule = _on_host(schedule)  # eps_fn holds its own copy on the model's device
    for t, t_next in zip(grid[:-1], grid[1:]):
        a_t, s_t = _coefs(schedule, t)
        a_n, s_n = _coefs(schedule, t_next)
        eps = eps_fn(x, _batch_t(t, x))
        x0 = _predict_x0(x, eps, a_t, s_t, clip_x0)
        if clip_x0 is not None:
            eps = (x - a_t * x0) / s_t
        x = a_n * x0 + s_n * eps
    return x


def dpm2_sample(
    eps_fn: EpsFn,
    x: torch.Tensor,
    schedule: Schedule,
    steps: int,
    *,
    clip_x0: float | None = None,
    generator: Generators = None,
) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022): second-order multistep in λ = log(a/s), data prediction.

    One ε̂ per step; the first step is first order (no history yet) and the
    last step, to λ = +∞ at t = 0, returns x̂_0.
    """
    grid = timestep_grid(schedule.T, steps)
    schedule = _on_host(schedule)  # eps_fn holds its own copy on the model's device
    lam = lambda t: float(torch.log(schedule.a[t] / schedule.s[t]))  # noqa: E731
    x0_prev, h_prev = None, None
    for t, t_next in zip(grid[:-1], grid[1:]):
        a_t, s_t = _coefs(schedule, t)
        a_n, s_n = _coefs(schedule, t_next)
        x0 = _predict_x0(x, eps_fn(x, _batch_t(t, x)), a_t, s_t, clip_x0)
        if t_next == 0:
            return x0
        h = lam(t_next) - lam(t)
        if x0_prev is None or t_next == grid[-2]:
            d = x0
        else:
            r = h_prev / h
            d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * x0_prev
        x = (s_n / s_t) * x - a_n * math.expm1(-h) * d
        x0_prev, h_prev = x0, h
    return x


def euler_sample(
    eps_fn: EpsFn,
    x: torch.Tensor,
    schedule: Schedule,
    steps: int,
    *,
    clip_x0: float | None = None,
    generator: Generators = None,
) -> torch.Tensor:
    """Euler on the probability-flow ODE dx/dτ = ȧ(τ)·x̂_0 + ṡ(τ)·ε̂, with τ the class index.

    ȧ and ṡ are central differences of the schedule arrays. On the `ot` path a
    and s are linear in τ, so this is the flow-matching Euler sampler (and
    coincides with DDIM); on VP paths it is a genuinely different, first-order
    integrator of the same ODE.
    """
    grid = timestep_grid(schedule.T, steps)
    schedule = _on_host(schedule)  # eps_fn holds its own copy on the model's device
    a_dot = torch.gradient(schedule.a.to(torch.float64))[0]
    s_dot = torch.gradient(schedule.s.to(torch.float64))[0]
    for t, t_next in zip(grid[:-1], grid[1:]):
        a_t, s_t = _coefs(schedule, t)
        eps = eps_fn(x, _batch_t(t, x))
        x0 = _predict_x0(x, eps, a_t, s_t, clip_x0)
        if t_next == 0:
            return x0
        velocity = float(a_dot[t]) * x0 + float(s_dot[t]) * eps
        x = x + (t_next - t) * velocity
    return x


SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {
    "ddpm": ddpm_sample,
    "ddim": ddim_sample,
    "dpm2": dpm2_sample,
    "euler": euler_sample,
}


def sample(name: str, eps_fn: EpsFn, x: torch.Tensor, schedule: Schedule, steps: int, **kwargs) -> torch.Tensor:
    """Run the sampler called `name` (ddpm, ddim, dpm2, euler) from start noise x."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    return SAMPLERS[name](eps_fn, x, schedule, steps, **kwargs)
