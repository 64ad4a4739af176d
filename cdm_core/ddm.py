"""The DDM baseline objective: ε-prediction with a time-conditioned denoiser.

Same schedules, same noising and the same samplers as the CDM, so the two can
be compared on equal terms. Classes 0 and T+1 are skipped in training: at 0
there is no noise to predict and at T+1 ε = x_t exactly.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from cdm_core.objective import noise_data
from cdm_core.schedules import Schedule

# eps_model(x_t, t) -> ε̂; a conditional model is passed as `lambda x, t: model(x, t, y)`.
EpsModel = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


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
    dev = generator.device if generator is not None else x0.device
    if t is None:
        t = torch.randint(1, schedule.T + 1, (x0.shape[0],), generator=generator, device=dev).to(x0.device)
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=dev).to(x0.device)
    x_t = noise_data(x0, t, schedule, noise)
    return F.mse_loss(eps_model(x_t, t).float(), noise.float())
