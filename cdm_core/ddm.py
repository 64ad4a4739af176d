"""The DDM baseline objective: ε-prediction with a time-conditioned denoiser.

Same schedules, same noising and the same samplers as the CDM, so the two can
be compared on equal terms. Classes 0 and T+1 are skipped in training: at 0
there is no noise to predict and at T+1 ε = x_t exactly.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from cdm_core.objective import draw_noise, noise_data
from cdm_core.schedules import Schedule

# eps_model(x_t, t) -> ε̂; a conditional model is passed as `lambda x, t: model(x, t, y)`.
EpsModel = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def sample_ddm_timesteps(
    batch_size: int, schedule: Schedule, *, generator: torch.Generator | None = None, device=None
) -> torch.Tensor:
    """t ~ U{1, …, T} for each sample of a batch (int64), drawn on the generator's device."""
    dev = generator.device if generator is not None else device
    return torch.randint(1, schedule.T + 1, (batch_size,), generator=generator, device=dev).to(device)


def ddm_loss(
    eps_model: EpsModel,
    x0: torch.Tensor,
    schedule: Schedule,
    *,
    t: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Ho et al.'s simple loss: mean‖ε_θ(x_t, t) − ε‖², t ~ U{1, …, T}, averaged over batch and dimensions."""
    if t is None:
        t = sample_ddm_timesteps(x0.shape[0], schedule, generator=generator, device=x0.device)
    if noise is None:
        noise = draw_noise(x0, generator)
    x_t = noise_data(x0, t, schedule, noise)
    return F.mse_loss(eps_model(x_t, t).float(), noise.float())
