"""Samplers: stateless functions of an ε-predictor, shared by CDM and DDM.

`eps_fn(x, t)` returns ε̂ for a batch x at integer classes t (a (B,) tensor).
For a CDM it is `cdm_eps_fn(model, schedule)` (a forward and a backward pass
per call); for the DDM baseline `ddm_eps_fn(model)` (one forward pass).

Every sampler walks a decreasing grid of classes t_0 > t_1 > … > t_S = 0
(`timestep_grid`: `time_grid="even"` starts at T, `"official"` is the official
CDM code's grid), uses one ε̂ evaluation per step (S in all) and returns the
final x̂_0. x is the start noise at class t_0 (`initial_noise`). No grid starts
at T+1: there the signal scale is exactly 0, so x̂_0 is undefined. `clip_x0`
clips x̂_0 to ±clip_x0 at every step; None (the default, and what the official
code does) does not clip.

    ddpm            ancestral sampling with the posterior variance
    ddim            DDIM, η = 0
    dpmsolver2m     DPM-Solver-2 multistep on the noise prediction: the official code's "2nd order DPMS"
    dpmsolver++2m   DPM-Solver++(2M) on the data prediction
    euler           Euler on the probability-flow ODE in the class index
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


TIME_GRIDS = ("even", "official")


def timestep_grid(T: int, steps: int, time_grid: str = "even") -> list[int]:
    """The decreasing classes a sampler visits, ending with 0; one ε̂ call per class before the 0.

    even: `steps` evenly spaced classes from T down to 1 (rounded), then 0: `steps` ε̂ calls.
    official: the grid of the official CDM code (github shaharYadin/CDM, cdm.py, `CDM.__init__` and
      `CDM.sample`): skip = T // steps, seq = range(1, T+1, skip), walked from its largest class down
      to 1, whose step returns x̂_0 (the `s == -1` branch): in our terms a last step to class 0. Its
      classes are ours unchanged: its alpha_hat is [1, ᾱ_1, …, ᾱ_T, 0] over indices 0..T+1, so its
      index t is our class t (a_t = √alpha_hat[t], s_t = √(1 − alpha_hat[t])). T=1000, 50 steps:
      981, 961, …, 21, 1, 0 (it never visits T); 25 steps: 961, 921, …, 41, 1, 0. ε̂ calls:
      ⌈T / skip⌉, which is `steps` when steps divides T and more otherwise, as in the official code
      (T=1000, 30 steps: skip 33, 31 calls; 600 steps: skip 1, 1000 calls).
    """
    if not 1 <= steps <= T:
        raise ValueError(f"steps must be between 1 and T={T}, got {steps}")
    if time_grid == "even":
        grid = torch.linspace(T, 1, steps, dtype=torch.float64).round().long().tolist()
    elif time_grid == "official":
        grid = list(reversed(range(1, T + 1, T // steps)))
    else:
        raise ValueError(f"unknown time grid {time_grid!r}; choose one of {', '.join(TIME_GRIDS)}")
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
    shape: Sequence[int],
    schedule: Schedule,
    generator: Generators = None,
    device=None,
    dtype=torch.float32,
    *,
    t: int | None = None,
) -> torch.Tensor:
    """Start point at class t (default T; pass the grid's first class): N(0, (a_t² + s_t²)·I), i.e. x_t for
    data of unit variance per dimension. On VP paths that is N(0, I) at every t, the official code's start."""
    host = _on_host(schedule)
    t = host.T if t is None else t
    if not 1 <= t <= host.T:
        raise ValueError(f"the start class must be between 1 and T={host.T}, got {t}")
    scale = float((host.a[t] ** 2 + host.s[t] ** 2).sqrt())
    return scale * randn_like(torch.empty(shape, device=device, dtype=dtype), generator)


def _on_host(schedule: Schedule) -> Schedule:
    """The schedule's numbers on the CPU: a sampler reads a_t and s_t as Python floats every step, and
    reading them from a GPU tensor would wait for the GPU each time (the values are the same)."""
    return schedule.to(device="cpu")


def _setup(schedule: Schedule, steps: int, time_grid: str, clip_x0: float | None) -> tuple[list[int], Schedule]:
    """The grid, and the schedule on the host (eps_fn holds its own copy on the model's device)."""
    if clip_x0 is not None and not clip_x0 > 0:
        raise ValueError(f"clip_x0 must be positive, or None for no clipping; got {clip_x0}")
    return timestep_grid(schedule.T, steps, time_grid), _on_host(schedule)


def _coefs(schedule: Schedule, t: int) -> tuple[float, float]:
    return float(schedule.a[t]), float(schedule.s[t])


def _predict_x0(x, eps, a, s, clip_x0):
    x0 = (x - s * eps) / a
    return x0.clamp(-clip_x0, clip_x0) if clip_x0 is not None else x0


def _predict(x, eps, a, s, clip_x0):
    """(x̂_0, ε̂) at a class with scales (a, s); with clipping, ε̂ is made consistent with the clipped x̂_0."""
    x0 = _predict_x0(x, eps, a, s, clip_x0)
    return x0, (eps if clip_x0 is None else (x - a * x0) / s)


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
    time_grid: str = "even",
) -> torch.Tensor:
    """Ancestral sampling with the posterior variance (Ho et al. 2020), on any (a, s) path and any grid.

    Between classes t > t' the forward process is x_t | x_t' ~ N(a_{t|t'} x_t', σ²_{t|t'} I) with
    a_{t|t'} = a_t/a_t' and σ²_{t|t'} = s_t² − a_{t|t'}² s_t'²; the step samples q(x_t' | x_t, x̂_0).
    With every class (steps = T) this is the official code's `ddpm` step exactly; on a coarser grid the
    official code keeps the one-class β_t, α_t of class t, which is this posterior only for skip 1.
    """
    grid, schedule = _setup(schedule, steps, time_grid, clip_x0)
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
    time_grid: str = "even",
) -> torch.Tensor:
    """Deterministic DDIM (η = 0): x_t' = a_t' x̂_0 + s_t' ε̂ (the official code's `ddim` step)."""
    grid, schedule = _setup(schedule, steps, time_grid, clip_x0)
    for t, t_next in zip(grid[:-1], grid[1:]):
        a_t, s_t = _coefs(schedule, t)
        a_n, s_n = _coefs(schedule, t_next)
        x0, eps = _predict(x, eps_fn(x, _batch_t(t, x)), a_t, s_t, clip_x0)
        x = a_n * x0 + s_n * eps
    return x


def dpmsolver2m_sample(
    eps_fn: EpsFn,
    x: torch.Tensor,
    schedule: Schedule,
    steps: int,
    *,
    clip_x0: float | None = None,
    generator: Generators = None,
    time_grid: str = "even",
) -> torch.Tensor:
    """DPM-Solver-2 multistep on the noise prediction (Lu et al. 2022): the paper's "2nd order DPMS".

    The official code's `second_order_dpm_solver` (`CDM.sample`). In λ = log(a/s), from class t to
    t' with h = λ_t' − λ_t, and the class t⁺ visited before t with h₀ = λ_t − λ_t⁺:

        x_t' = (a_t'/a_t)·x_t − s_t'(e^h − 1)·ε̂_t − s_t'(e^h − 1 − h)·(ε̂_t − ε̂_t⁺)/h₀,

    the Taylor form of the second-order term (diffusers' algorithm_type "dpmsolver", solver_type
    "heun"). One ε̂ per step. The first step has no history and is first order, which is DDIM
    exactly; the last, from the grid's smallest class to 0 (λ = +∞), returns x̂_0; every step
    between is second order, the one into the smallest class included (no lower-order final step).
    """
    grid, schedule = _setup(schedule, steps, time_grid, clip_x0)
    lam = lambda t: math.log(float(schedule.a[t]) / float(schedule.s[t]))  # noqa: E731
    eps_prev = None
    for i, (t, t_next) in enumerate(zip(grid[:-1], grid[1:])):
        a_t, s_t = _coefs(schedule, t)
        a_n, s_n = _coefs(schedule, t_next)
        x0, eps = _predict(x, eps_fn(x, _batch_t(t, x)), a_t, s_t, clip_x0)
        if t_next == 0:
            return x0
        h = lam(t_next) - lam(t)
        x = (a_n / a_t) * x - s_n * math.expm1(h) * eps
        if eps_prev is not None:
            h_prev = lam(t) - lam(grid[i - 1])
            x = x - s_n * (math.expm1(h) - h) / h_prev * (eps - eps_prev)
        eps_prev = eps
    return x


def dpmsolver_pp2m_sample(
    eps_fn: EpsFn,
    x: torch.Tensor,
    schedule: Schedule,
    steps: int,
    *,
    clip_x0: float | None = None,
    generator: Generators = None,
    time_grid: str = "even",
) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022): second-order multistep in λ = log(a/s), data prediction.

    One ε̂ per step; the first step is first order (no history yet), so is the step into the grid's
    smallest class (the lower-order final step of DPM-Solver++), and the last step, to λ = +∞ at
    t = 0, returns x̂_0.
    """
    grid, schedule = _setup(schedule, steps, time_grid, clip_x0)
    lam = lambda t: math.log(float(schedule.a[t]) / float(schedule.s[t]))  # noqa: E731
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


def schedule_derivatives(schedule: Schedule) -> tuple[torch.Tensor, torch.Tensor]:
    """(ȧ, ṡ): d/dτ of a and s at the classes τ = 0..T (float64, length T+1), for the ODE in τ.

    Closed forms where the arrays are one: `ot` (a = 1 − τ/(T+1), s = τ/(T+1): ȧ = −1/(T+1),
    ṡ = 1/(T+1)) and `uniform` (s = τ/(T+1), a = √(1 − s²): ṡ = 1/(T+1), ȧ = −s·ṡ/a). `linear` and
    `cosine` are cumulative products of discrete β's (cosine's last one clipped), whose parameters a
    Schedule does not keep: ȧ is the second-order difference of a over classes 0..T (central
    inside, one-sided at 0 and T), and ṡ = −a·ȧ/s, which keeps a² + s² = 1 (the difference of s
    itself can even come out negative at T, where s is flat). Class T+1 never enters: its a = 0 is
    pinned, not a point of a smooth curve, and a central difference through it makes ȧ_T ~50× too
    large on `linear`.
    """
    a, s = schedule.a.detach().cpu().to(torch.float64), schedule.s.detach().cpu().to(torch.float64)
    T = schedule.T
    tau = torch.arange(T + 1, dtype=torch.float64) / (T + 1)
    if schedule.name == "ot" and torch.allclose(s[: T + 1], tau, atol=1e-6) and torch.allclose(a, 1 - s, atol=1e-6):
        return torch.full((T + 1,), -1.0 / (T + 1), dtype=torch.float64), torch.full_like(tau, 1.0 / (T + 1))
    if schedule.name == "uniform" and torch.allclose(s[: T + 1], tau, atol=1e-6):
        a_closed = (1 - tau**2).sqrt()
        if torch.allclose(a[: T + 1], a_closed, atol=1e-6):
            s_dot = torch.full_like(tau, 1.0 / (T + 1))
            return -tau * s_dot / a_closed, s_dot
    a, s = a[: T + 1], s[: T + 1]
    edge = 2 if T >= 2 else 1  # a second-order one-sided difference needs three classes
    a_dot = torch.gradient(a, edge_order=edge)[0]
    s_dot = torch.gradient(s, edge_order=edge)[0]
    if torch.allclose(a**2 + s**2, torch.ones_like(a), atol=1e-6):
        s_dot[1:] = -a[1:] * a_dot[1:] / s[1:]  # at τ = 0, s = 0: keep the difference there (never used)
    return a_dot, s_dot


def euler_sample(
    eps_fn: EpsFn,
    x: torch.Tensor,
    schedule: Schedule,
    steps: int,
    *,
    clip_x0: float | None = None,
    generator: Generators = None,
    time_grid: str = "even",
) -> torch.Tensor:
    """Euler on the probability-flow ODE dx/dτ = ȧ(τ)·x̂_0 + ṡ(τ)·ε̂, with τ the class index.

    ȧ and ṡ come from `schedule_derivatives`. On the `ot` path a and s are linear in τ, so this is
    the flow-matching Euler sampler (and coincides with DDIM); on VP paths it is a genuinely
    different, first-order integrator of the same ODE.
    """
    grid, schedule = _setup(schedule, steps, time_grid, clip_x0)
    a_dot, s_dot = schedule_derivatives(schedule)
    for t, t_next in zip(grid[:-1], grid[1:]):
        a_t, s_t = _coefs(schedule, t)
        x0, eps = _predict(x, eps_fn(x, _batch_t(t, x)), a_t, s_t, clip_x0)
        if t_next == 0:
            return x0
        velocity = float(a_dot[t]) * x0 + float(s_dot[t]) * eps
        x = x + (t_next - t) * velocity
    return x


SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {
    "ddpm": ddpm_sample,
    "ddim": ddim_sample,
    "dpmsolver2m": dpmsolver2m_sample,
    "dpmsolver++2m": dpmsolver_pp2m_sample,
    "euler": euler_sample,
}

# Names no longer accepted, with what to use instead (pipelines.evaluate.config repeats the text: it must not import torch).
RETIRED_SAMPLERS: dict[str, str] = {
    "dpm2": "'dpm2' is no longer a sampler name (it was ambiguous): use dpmsolver2m for DPM-Solver-2 multistep on "
    "the noise prediction (the official CDM code's, the paper's \"2nd order DPMS\") or dpmsolver++2m for "
    "DPM-Solver++(2M) on the data prediction (what dpm2 ran)",
}


def sample(name: str, eps_fn: EpsFn, x: torch.Tensor, schedule: Schedule, steps: int, **kwargs) -> torch.Tensor:
    """Run the sampler called `name` (a key of SAMPLERS) from start noise x; kwargs go to the sampler."""
    if name in RETIRED_SAMPLERS:
        raise ValueError(RETIRED_SAMPLERS[name])
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    return SAMPLERS[name](eps_fn, x, schedule, steps, **kwargs)
