"""The Bayes-optimal CDM for Gaussian-mixture data, as a network the checkpoint format can store.

`GaussianMixtureLogits` returns the exact logits ℓ_t(x) = log p_t(x) + log π(t)
of `cdm_core.mixture.GaussianMixture.optimal_logits`, in float64. Saved with
`save_checkpoint` and loaded with `model_from_checkpoint` like any trained
network, it lets the batch stages (likelihood, sampling, OOD) be checked end to
end against closed forms, with no training in the way.

`ConditionalGaussianMixtureLogits` is its class-conditional twin, the labels
being the mixture's components: `forward(x, y)` returns the exact logits of
component y alone, ℓ_t(x | y) = log N(x; a_t μ_y, a_t² Σ_y + s_t² I) + log π(t),
so its one-pass likelihood is log p(x | y) = log N(x; μ_y, Σ_y) and a Bayes
classifier built on it must give the analytic posterior p(y | x) ∝ p(y) N(x; μ_y, Σ_y).
The null label (y = K, as classifier-free guidance uses it) gives the whole mixture.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from cdm_core.mixture import GaussianMixture
from cdm_core.objective import log_prior
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


class ConditionalGaussianMixtureLogits(GaussianMixtureLogits):
    """Exact class-conditional CDM logits of a Gaussian mixture: label y is component y (uniform class prior)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # GaussianMixtureLogits' arguments
        super().__init__(*args, **kwargs)
        self.num_labels = len(self.mixture.weights)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        mixture = GaussianMixture(self.weights, self.means, self.covariances)
        schedule = Schedule(self.schedule_name, self.a, self.s)
        x = x.to(torch.float64)
        labels = torch.full((x.shape[0],), self.num_labels, device=x.device) if y is None else y.to(x.device).long()
        if bool(((labels < 0) | (labels > self.num_labels)).any()):
            raise ValueError(f"labels must lie in 0..{self.num_labels} ({self.num_labels}: the null label)")
        means, covs = mixture._noisy_components(schedule)
        # log N(x; a_t μ_k, a_t² Σ_k + s_t² I) for every class t and component k: (B, T+2, K)
        per_component = mixture._component_log_probs(x, means, covs) - mixture.weights.log()
        own = per_component.gather(
            2, labels.clamp(max=self.num_labels - 1)[:, None, None].expand(-1, means.shape[0], 1)
        )
        # the null label: the whole mixture, log Σ_k w_k N(…) = log p_t(x)
        log_pt = torch.where(
            (labels == self.num_labels)[:, None],
            torch.logsumexp(per_component + mixture.weights.log(), -1),
            own[..., 0],
        )
        return log_pt + log_prior(None, schedule.num_classes, device=x.device)
