"""Gaussian mixtures: data whose CDM quantities are all known in closed form.

If x_0 ~ Σ_k w_k N(μ_k, Σ_k) then x_t = a·x_0 + s·ε ~ Σ_k w_k N(a μ_k, a² Σ_k + s² I)
for every class t, so the Bayes-optimal CDM logits ℓ_t = log p_t(x) + log π(t),
the MMSE denoiser E[ε | x_t] and log p_0 are exact. The tests plug these into
the generic formulas of `cdm_core.objective`; the toy demo trains on them.
"""

from __future__ import annotations

import math

import torch

from cdm_core.objective import log_prior
from cdm_core.schedules import Schedule


class GaussianMixture:
    """A mixture of full-covariance Gaussians in R^d (float64 throughout)."""

    def __init__(self, weights, means, covariances):
        self.weights = torch.as_tensor(weights, dtype=torch.float64)
        self.means = torch.as_tensor(means, dtype=torch.float64)
        self.covs = torch.as_tensor(covariances, dtype=torch.float64)
        k, d = self.means.shape
        if self.weights.shape != (k,) or self.covs.shape != (k, d, d):
            raise ValueError("weights (K,), means (K, d) and covariances (K, d, d) must agree")
        if not math.isclose(float(self.weights.sum()), 1.0, rel_tol=1e-9):
            raise ValueError("mixture weights must sum to 1")

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """n samples and the index of the component each came from."""
        comp = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, dtype=torch.float64, generator=generator)
        chol = torch.linalg.cholesky(self.covs)[comp]
        return self.means[comp] + (chol @ z[:, :, None]).squeeze(-1), comp

    def _noisy_components(self, schedule: Schedule) -> tuple[torch.Tensor, torch.Tensor]:
        """Means (C, K, d) and covariances (C, K, d, d) of p_t's components for all C = T+2 classes."""
        a = schedule.a.to(torch.float64)[:, None, None]
        s = schedule.s.to(torch.float64)[:, None, None, None]
        means = a * self.means[None]
        eye = torch.eye(self.dim, dtype=torch.float64, device=self.means.device)
        covs = a[..., None] ** 2 * self.covs[None] + s**2 * eye
        return means, covs

    @staticmethod
    def _gaussian_log_prob(diff: torch.Tensor, covs: torch.Tensor) -> torch.Tensor:
        """log N(diff; 0, covs) over the last axis; covs broadcast against diff's leading axes."""
        chol = torch.linalg.cholesky(covs)
        chol = chol.expand(*diff.shape[:-1], *chol.shape[-2:])
        sol = torch.linalg.solve_triangular(chol, diff[..., None], upper=False).squeeze(-1)
        logdet = 2 * torch.diagonal(chol, dim1=-2, dim2=-1).log().sum(-1)
        return -0.5 * (sol.pow(2).sum(-1) + logdet + diff.shape[-1] * math.log(2 * math.pi))

    def _component_log_probs(self, x: torch.Tensor, means: torch.Tensor, covs: torch.Tensor) -> torch.Tensor:
        """log w_k + log N(x; means, covs) for x (B, d) against (..., K, d) means: shape (B, ..., K)."""
        diff = x.reshape(x.shape[0], *([1] * (means.dim() - 1)), x.shape[1]) - means
        return self._gaussian_log_prob(diff, covs) + self.weights.log()

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """log p_0(x), per sample."""
        return torch.logsumexp(self._component_log_probs(x, self.means, self.covs), dim=-1)

    def noisy_log_prob(self, x: torch.Tensor, schedule: Schedule) -> torch.Tensor:
        """log p_t(x) for every class t: shape (B, T+2)."""
        means, covs = self._noisy_components(schedule)
        return torch.logsumexp(self._component_log_probs(x, means, covs), dim=-1)

    def optimal_logits(self, x: torch.Tensor, schedule: Schedule, prior: torch.Tensor | None = None) -> torch.Tensor:
        """The Bayes-optimal CDM logits ℓ_t(x) = log p_t(x) + log π(t), shape (B, T+2)."""
        return self.noisy_log_prob(x, schedule) + log_prior(prior, schedule.num_classes, device=x.device)

    def posterior_mean_noise(self, x: torch.Tensor, t: torch.Tensor, schedule: Schedule) -> torch.Tensor:
        """E[ε | x_t = x] in closed form, without autograd: Σ_k r_k(x) · s C_k⁻¹ (x − a μ_k)."""
        t = torch.as_tensor(t, device=x.device).long().expand(x.shape[0])
        return self.posterior_mean_noise_at(x, schedule.a.to(torch.float64)[t], schedule.s.to(torch.float64)[t])

    def posterior_mean_noise_at(self, x: torch.Tensor, a: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """E[ε | a·x_0 + s·ε = x] for any scales, e.g. `Schedule.continuous(τ)` at a real τ: a and s are (B,).

        The same closed form as `posterior_mean_noise`, and differentiable in x
        (the probability-flow ODE's divergence takes its Jacobian).
        """
        a = torch.as_tensor(a, dtype=torch.float64, device=x.device).expand(x.shape[0])
        s = torch.as_tensor(s, dtype=torch.float64, device=x.device).expand(x.shape[0])
        if bool((a == a[0]).all() and (s == s[0]).all()):  # a sampler or solver step: one level, factorise once
            a, s = a[:1], s[:1]
        means = a[:, None, None] * self.means[None]  # (B or 1, K, d)
        eye = torch.eye(self.dim, dtype=torch.float64, device=self.means.device)
        covs = a[:, None, None, None] ** 2 * self.covs[None] + s[:, None, None, None] ** 2 * eye
        x = x.to(torch.float64)
        diff = x[:, None, :] - means
        r = torch.softmax(self._gaussian_log_prob(diff, covs) + self.weights.log(), dim=-1)
        cond = torch.linalg.solve(covs, diff[..., None]).squeeze(-1)  # C_k⁻¹ (x − a μ_k)
        return s[:, None] * (r[..., None] * cond).sum(1)

    def entropy(self, n: int = 400_000, seed: int = 0) -> tuple[float, float]:
        """Differential entropy in nats by Monte Carlo on exact log-densities: (estimate, standard error).

        A mixture's entropy has no closed form; with exact log p the only error
        is sampling error, which the standard error reports.
        """
        gen = torch.Generator().manual_seed(seed)
        x, _ = self.sample(n, gen)
        nll = -self.log_prob(x)
        return float(nll.mean()), float(nll.std() / math.sqrt(n))


def toy_mixture(dim: int = 2) -> GaussianMixture:
    """A fixed 3-component, non-isotropic mixture used by the demo, tests and benchmarks."""
    if dim != 2:
        gen = torch.Generator().manual_seed(dim)
        means = 2.0 * torch.randn(3, dim, generator=gen, dtype=torch.float64)
        factors = 0.4 * torch.randn(3, dim, dim, generator=gen, dtype=torch.float64)
        covs = factors @ factors.transpose(1, 2) + 0.05 * torch.eye(dim, dtype=torch.float64)
        return GaussianMixture([0.5, 0.3, 0.2], means, covs)
    means = [[-2.0, -1.0], [2.0, -1.0], [0.0, 2.0]]
    covs = [
        [[0.30, 0.15], [0.15, 0.20]],
        [[0.15, -0.10], [-0.10, 0.35]],
        [[0.40, 0.00], [0.00, 0.05]],
    ]
    return GaussianMixture([0.5, 0.3, 0.2], means, covs)
