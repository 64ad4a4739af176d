"""Noise schedules over the CDM's T+2 classes.

Class t ∈ {0, …, T+1} noises clean data as x_t = a[t]·x_0 + s[t]·ε. Class 0 is
clean data (a=1, s=0) and class T+1 is pure N(0, I) (a=0, s=1); the CDM's
denoiser and likelihood formulas rely on those two endpoints being exact, so
every schedule pins them rather than trusting floating-point products.

Arrays are built in float64 and cast on demand (`Schedule.to`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SCHEDULE_NAMES = ("linear", "cosine", "uniform", "ot")


@dataclass(frozen=True)
class Schedule:
    """Signal scale `a` and noise scale `s` for each of the T+2 classes."""

    name: str
    a: torch.Tensor
    s: torch.Tensor

    @property
    def T(self) -> int:
        """Number of intermediate noise levels; there are T+2 classes in all."""
        return self.a.shape[0] - 2

    @property
    def num_classes(self) -> int:
        return self.a.shape[0]

    def to(self, device=None, dtype=None) -> Schedule:
        return Schedule(self.name, self.a.to(device=device, dtype=dtype), self.s.to(device=device, dtype=dtype))

    def log_snr(self) -> torch.Tensor:
        """log(a²/s²): +inf at t=0, -inf at t=T+1."""
        return 2 * (torch.log(self.a) - torch.log(self.s))


def _vp_from_alpha_bar(name: str, alpha_bar: torch.Tensor) -> Schedule:
    """VP path: a = sqrt(ᾱ), s = sqrt(1-ᾱ), with ᾱ over classes 1..T and exact endpoints."""
    a = torch.cat([torch.ones(1, dtype=torch.float64), alpha_bar.sqrt(), torch.zeros(1, dtype=torch.float64)])
    s = torch.cat([torch.zeros(1, dtype=torch.float64), (1 - alpha_bar).sqrt(), torch.ones(1, dtype=torch.float64)])
    return Schedule(name, a, s)


def linear_schedule(T: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> Schedule:
    """DDPM's linear β schedule (Ho et al. 2020), the paper's default with T=1000."""
    betas = torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
    return _vp_from_alpha_bar("linear", torch.cumprod(1 - betas, dim=0))


def cosine_schedule(T: int, offset: float = 0.008, max_beta: float = 0.999) -> Schedule:
    """Nichol & Dhariwal's cosine ᾱ, with β clipped at `max_beta` as in improved-diffusion."""
    steps = torch.arange(T + 1, dtype=torch.float64)
    f = torch.cos((steps / T + offset) / (1 + offset) * math.pi / 2) ** 2
    betas = (1 - f[1:] / f[:-1]).clamp(max=max_beta)
    return _vp_from_alpha_bar("cosine", torch.cumprod(1 - betas, dim=0))


def uniform_schedule(T: int) -> Schedule:
    """The paper's "CDM (unif.)": noise scale uniform in t, variance preserving."""
    s = torch.arange(T + 2, dtype=torch.float64) / (T + 1)
    a = (1 - s**2).clamp(min=0).sqrt()
    a[-1] = 0.0
    return Schedule("uniform", a, s)


def ot_schedule(T: int) -> Schedule:
    """The paper's "CDM (OT)": the straight flow-matching path a = 1 - τ, s = τ."""
    s = torch.arange(T + 2, dtype=torch.float64) / (T + 1)
    return Schedule("ot", 1 - s, s)


def get_schedule(name: str, T: int = 1000, **params) -> Schedule:
    """Build a schedule by name: `linear`, `cosine`, `uniform` or `ot`.

    `params` go to the schedule (`beta_start`, `beta_end` for linear; `offset`,
    `max_beta` for cosine).
    """
    if not isinstance(T, int) or T < 1:
        raise ValueError(f"T must be a positive integer, got {T!r}")
    builders = {"linear": linear_schedule, "cosine": cosine_schedule, "uniform": uniform_schedule, "ot": ot_schedule}
    if name not in builders:
        raise ValueError(f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULE_NAMES)}")
    try:
        schedule = builders[name](T, **params)
    except TypeError as err:
        raise ValueError(f"bad parameters for schedule {name!r}: {err}") from None
    _check(schedule)
    return schedule


def _check(schedule: Schedule) -> None:
    a, s = schedule.a, schedule.s
    if not (a[0] == 1 and s[0] == 0 and a[-1] == 0 and s[-1] == 1):
        raise ValueError(f"schedule {schedule.name!r} does not pin the endpoints a[0]=1, s[0]=0, a[T+1]=0, s[T+1]=1")
    if not bool(torch.all(schedule.log_snr()[1:] <= schedule.log_snr()[:-1])):
        raise ValueError(f"schedule {schedule.name!r}: signal-to-noise ratio must not increase with t")
