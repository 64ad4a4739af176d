"""The Bayes-optimal CDM for Gaussian-mixture data, as a network the checkpoint format can store.

`GaussianMixtureLogits` returns the exact logits ℓ_t(x) = log p_t(x) + log π(t)
of `cdm_core.mixture.GaussianMixture.optimal_logits`, in float64. Saved with
`save_checkpoint` and loaded with `model_from_checkpoint` like any trained
network, it lets the batch stages (likelihood, sampling, OOD) be checked end to
end against closed forms, with no training in the way.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from cdm_core.mixture import GaussianMixture
from cdm_core.schedules import Schedule, get_schedule


class GaussianMixtureLogits(nn.Module):
    """Exact CDM logits of a Gaussian mixture under a named schedule (uniform class prior)."""

    def __init__(
        self,
        weights: list[float],
        means: list[list[float]],
        covariances: list[list[list[float]]],
        schedule: str,
        num_timesteps: int,
    ) -> None:
        super().__init__()
        self.mixture = GaussianMixture(weights, means, covariances)
        self.schedule_name = schedule
        self.num_timesteps = int(num_timesteps)
        self.num_labels = None
        self.data_shape = (self.mixture.dim,)
        schedule_ = get_schedule(schedule, self.num_timesteps)
        # Buffers, so `.to(device)` moves them and the checkpoint carries them.
        self.register_buffer("weights", self.mixture.weights.clone())
        self.register_buffer("means", self.mixture.means.clone())
        self.register_buffer("covariances", self.mixture.covs.clone())
        self.register_buffer("a", schedule_.a.clone())
        self.register_buffer("s", schedule_.s.clone())

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if y is not None:
            raise ValueError("GaussianMixtureLogits is unconditional; labels were passed")
        mixture = GaussianMixture(self.weights, self.means, self.covariances)
        schedule = Schedule(self.schedule_name, self.a, self.s)
        # float64 throughout: the point of this model is exactness.
        return mixture.optimal_logits(x.to(torch.float64), schedule)

    def spec(self) -> dict[str, Any]:
        return {
            "class": type(self).__name__,
            "weights": self.mixture.weights.tolist(),
            "means": self.mixture.means.tolist(),
            "covariances": self.mixture.covs.tolist(),
            "schedule": self.schedule_name,
            "num_timesteps": self.num_timesteps,
        }
