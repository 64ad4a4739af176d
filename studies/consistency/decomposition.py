"""log p₀ of a CDM split class by class: the one-pass increments ℓ_t − ℓ_{t+1} beside what the model's ε̂ implies.

Theorem 3.2 telescopes, at a fixed input x (uniform prior; otherwise each increment also carries
log π(t+1) − log π(t)):

    log p₀(x) = Σ_{t=0}^{T} (ℓ_t − ℓ_{t+1})(x) + log N(x; 0, I),     ℓ_t − ℓ_{t+1} = log p_t(x) − log p_{t+1}(x).

The same increments follow from the denoiser alone. The marginals x_τ = a(τ)·x₀ + s(τ)·ε obey the continuity
equation of the probability-flow velocity v = ȧ·x̂₀ + ṡ·ε̂ (x̂₀ = (x − s·ε̂)/a), and the score is −ε̂/s, so at
the fixed x

    log p_t(x) − log p_{t+1}(x) = ∫_t^{t+1} (∇·v − v·ε̂/s) dτ
                                = ∫_t^{t+1} (ȧ/a)·(d − s·∇·ε̂ − x·ε̂/s + ‖ε̂‖²) + ṡ·(∇·ε̂ − ‖ε̂‖²/s) dτ,

with ε̂ the one the probability-flow ODE integrates (`cdm_continuous_eps_fn`: Theorem 3.1 on the log-density
interpolated linearly between classes), ∇·ε̂ by Hutchinson's estimator, the integral by Gauss–Legendre in each
class interval. The grouping keeps both brackets finite at the ends (ε̂ ∝ s as s → 0; the first bracket → 0 as
a → 0). A consistent model's two sets of increments agree (up to the interpolation between classes and the
quadrature: `tests/test_studies.py` checks it on an exact Gaussian-mixture CDM); where they part is where the
one-pass figure stops being the density the model's denoiser describes.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from cdm_core.likelihood import cdm_continuous_eps_fn
from cdm_core.objective import log_prior
from cdm_core.schedules import Schedule


def one_pass_increments(logits: torch.Tensor, prior: torch.Tensor | None = None) -> torch.Tensor:
    """(B, T+1) nats: log p_t(x) − log p_{t+1}(x) = ℓ_t − ℓ_{t+1} − log π(t) + log π(t+1), t = 0..T."""
    log_pi = log_prior(prior, logits.shape[1], dtype=torch.float64, device=logits.device)
    ratio = logits.double() - log_pi
    return ratio[:, :-1] - ratio[:, 1:]


def implied_increments(
    model: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    schedule: Schedule,
    *,
    nodes: int = 3,
    probes: int = 4,
    seed: int = 0,
    chunk: int = 4096,
) -> torch.Tensor:
    """(B, T+1) nats: ∫_t^{t+1} (∇·v − v·ε̂/s) dτ at x for t = 0..T (module docstring), from the model's ε̂.

    `nodes` Gauss–Legendre points per class interval; `probes` Rademacher probes per digit (fixed for every τ,
    seeded), averaged. Every (digit, τ) pair is one row of a batch of up to `chunk` rows: (T+1)·nodes·B rows
    in all, each one forward pass and 1 + `probes` backward passes.
    """
    host = schedule.to(device="cpu", dtype=torch.float64)
    T, dims, B = host.T, x[0].numel(), x.shape[0]
    eps_fn = cdm_continuous_eps_fn(model, host)
    xi, w = np.polynomial.legendre.leggauss(nodes)
    taus = torch.tensor([t + (n + 1) / 2 for t in range(T + 1) for n in xi], dtype=torch.float64)
    weights = torch.tensor([v / 2 for _ in range(T + 1) for v in w], dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    zs = (2 * torch.randint(0, 2, (probes, *x.shape), generator=gen) - 1).to(x.dtype)
    # Row r is digit r % B at τ = taus[r // B].
    n_rows = len(taus) * B
    out = torch.zeros(len(taus), B, dtype=torch.float64)
    for start in range(0, n_rows, chunk):
        rows = torch.arange(start, min(start + chunk, n_rows))
        digit, node = rows % B, rows // B
        tau = taus[node]
        a, s = host.continuous(tau)
        a_dot, s_dot = host.continuous_derivatives(tau)
        x_in = x.detach()[digit].clone().requires_grad_(True)
        eps = eps_fn(x_in, tau)
        div = torch.zeros(len(rows), dtype=torch.float64)
        for i in range(probes):
            z = zs[i][digit]
            (g,) = torch.autograd.grad((eps * z).sum(), x_in, retain_graph=i + 1 < probes)
            div += (g * z).flatten(1).sum(1).double() / probes
        e = eps.detach().double().flatten(1)
        sq, xe = e.pow(2).sum(1), (x_in.detach().double().flatten(1) * e).sum(1)
        integrand = (a_dot / a) * (dims - s * div - xe / s + sq) + s_dot * (div - sq / s)
        out[node, digit] = weights[node] * integrand
    return out.reshape(T + 1, nodes, B).sum(1).T


def log_normal(x: torch.Tensor) -> torch.Tensor:
    """log N(x; 0, I) per sample, nats: the telescope's base at class T+1."""
    flat = x.detach().double().flatten(1)
    return -0.5 * flat.pow(2).sum(1) - 0.5 * flat.shape[1] * math.log(2 * math.pi)
