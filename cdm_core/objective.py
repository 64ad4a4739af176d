"""The CDM objective: denoiser, one-pass likelihood and training loss.

A CDM network is a noise-level classifier. Its post-cumsum logits satisfy
ℓ_t(x) = log p(t | x) + c(x) = log p_t(x) + log π(t) + c'(x), so

* differences of logits are log density ratios, and because class T+1 is
  N(0, I) their input gradient gives the score of p_t, hence the MMSE
  denoiser by Tweedie's formula (paper, Theorem 3.1):
      ε̂(x, t) = s[t] · ( ∇_x[ ℓ_{T+1}(x) − ℓ_t(x) ] + x )
* at t = 0 the same difference is the density itself (Theorem 3.2):
      log p(x) = ℓ_0(x) − ℓ_{T+1}(x) + log N(x; 0, I) + log π(T+1) − log π(0)

`logits_fn(x)` is any callable returning post-cumsum logits of shape
(B, T+2); a conditional model is passed as `lambda x: model(x, y)`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F

from cdm_core.schedules import Schedule

LogitsFn = Callable[[torch.Tensor], torch.Tensor]

# bits/dim of 8-bit data mapped to [-1, 1]: each of the 256 bins is 2/255 wide,
# so a density becomes a probability by multiplying with (2/255)^d.
LOG2_BIN_OFFSET = math.log2(127.5)
# The official CDM code adds 7 = log2(128) instead; keep it around so numbers
# can be compared with theirs, and always record which one a figure uses.
OFFICIAL_CODE_OFFSET = 7.0


class LossParts(NamedTuple):
    total: torch.Tensor
    ce: torch.Tensor
    mse: torch.Tensor


def log_prior(prior: torch.Tensor | None, num_classes: int, *, dtype=torch.float64, device=None) -> torch.Tensor:
    """Log-probabilities of the class prior π over t ∈ {0, …, T+1}; uniform when `prior` is None."""
    if prior is None:
        return torch.full((num_classes,), -math.log(num_classes), dtype=dtype, device=device)
    prior = torch.as_tensor(prior, dtype=torch.float64)
    if prior.shape != (num_classes,):
        raise ValueError(f"class prior must have {num_classes} entries (T+2), got shape {tuple(prior.shape)}")
    if bool((prior < 0).any()) or not math.isclose(float(prior.sum()), 1.0, rel_tol=1e-6):
        raise ValueError("class prior must be non-negative and sum to 1")
    if prior[0] <= 0 or prior[-1] <= 0:
        raise ValueError("class prior must give positive mass to t=0 and t=T+1 (the likelihood needs both)")
    return prior.log().to(dtype=dtype, device=device)


def sample_timesteps(
    batch_size: int,
    num_classes: int,
    prior: torch.Tensor | None = None,
    *,
    generator: torch.Generator | None = None,
    device=None,
) -> torch.Tensor:
    """Draw t ~ π for each sample of a batch (int64)."""
    if prior is None:
        return torch.randint(0, num_classes, (batch_size,), generator=generator, device=device)
    probs = log_prior(prior, num_classes).exp()
    gen_device = generator.device if generator is not None else "cpu"
    t = torch.multinomial(probs.to(gen_device), batch_size, replacement=True, generator=generator)
    return t.to(device)


def draw_noise(x0: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """ε ~ N(0, I) shaped like x0, drawn on the generator's device and moved to x0's."""
    device = generator.device if generator is not None else x0.device
    return torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=device).to(x0.device)


def _per_sample(values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """values[t] shaped (B, 1, …, 1) to broadcast against `like`."""
    picked = values.to(device=like.device, dtype=like.dtype)[t]
    return picked.reshape(-1, *([1] * (like.dim() - 1)))


def noise_data(x0: torch.Tensor, t: torch.Tensor, schedule: Schedule, noise: torch.Tensor) -> torch.Tensor:
    """x_t = a[t]·x_0 + s[t]·ε."""
    return _per_sample(schedule.a, t, x0) * x0 + _per_sample(schedule.s, t, x0) * noise


INPUT_GRADS = ("autograd", "func")


def denoise_with_logits(
    logits_fn: LogitsFn,
    x: torch.Tensor,
    t: torch.Tensor,
    schedule: Schedule,
    *,
    create_graph: bool = False,
    input_grad: str = "autograd",
) -> tuple[torch.Tensor, torch.Tensor]:
    """ε̂(x, t) and the logits of the same forward pass (training needs both).

    `input_grad` is how ∇_x is taken; both give the same numbers. "autograd": `torch.autograd.grad`
    (with `create_graph` for a loss on ε̂). "func": `torch.func.grad`, whose result is always
    differentiable with respect to the network's parameters (`create_graph` is implied) and which,
    unlike `torch.autograd.grad` inside a compiled function, `torch.compile` traces into one graph
    whose backward it can compile: the double backward becomes a first-order backward of that graph.
    """
    t = torch.as_tensor(t, device=x.device).long().expand(x.shape[0])
    if input_grad == "func":

        def ratio(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            logits = logits_fn(z)
            return (logits[:, -1] - logits.gather(1, t[:, None]).squeeze(1)).sum(), logits

        grad, logits = torch.func.grad(ratio, has_aux=True)(x)
        return _per_sample(schedule.s, t, x) * (grad + x), logits
    if input_grad != "autograd":
        raise ValueError(f"input_grad must be one of {', '.join(INPUT_GRADS)}, got {input_grad!r}")
    with torch.enable_grad():
        x_in = x.detach().requires_grad_(True)
        logits = logits_fn(x_in)
        # Per-sample t: the sum over the batch separates because each logit row
        # depends only on its own input.
        ratio = logits[:, -1] - logits.gather(1, t[:, None]).squeeze(1)
        (grad,) = torch.autograd.grad(ratio.sum(), x_in, create_graph=create_graph)
    eps_hat = _per_sample(schedule.s, t, x) * (grad + x_in.detach())
    return eps_hat, logits


def denoise(
    logits_fn: LogitsFn,
    x: torch.Tensor,
    t: torch.Tensor | int,
    schedule: Schedule,
    *,
    create_graph: bool = False,
) -> torch.Tensor:
    """The MMSE noise prediction ε̂ = E[ε | x_t = x] from the classifier's logits (Theorem 3.1).

    `t` is an int or a (B,) tensor of classes. One forward and one backward pass;
    `create_graph=True` keeps the graph so a loss on ε̂ can be differentiated
    with respect to the network's parameters (a double backward).
    """
    return denoise_with_logits(logits_fn, x, t, schedule, create_graph=create_graph)[0]


def log_likelihood_from_logits(
    logits: torch.Tensor, x: torch.Tensor, prior: torch.Tensor | None = None
) -> torch.Tensor:
    """log p(x) in nats per sample from logits already computed at x (Theorem 3.2)."""
    d = x[0].numel()
    log_pi = log_prior(prior, logits.shape[1], dtype=logits.dtype, device=logits.device)
    flat = x.reshape(x.shape[0], -1).to(logits.dtype)
    log_normal = -0.5 * flat.pow(2).sum(1) - 0.5 * d * math.log(2 * math.pi)
    return logits[:, 0] - logits[:, -1] + log_normal + log_pi[-1] - log_pi[0]


@torch.no_grad()
def log_likelihood(
    logits_fn: LogitsFn, x: torch.Tensor, schedule: Schedule | None = None, prior: torch.Tensor | None = None
) -> torch.Tensor:
    """log p(x) in nats for each sample: one forward pass, no gradient, no ODE.

    `schedule` is accepted for symmetry with `denoise`; the likelihood needs only
    the endpoints t=0 and t=T+1, which every schedule shares.
    """
    return log_likelihood_from_logits(logits_fn(x), x, prior)


def nats_to_bits_per_dim(log_px: torch.Tensor, dims: int, offset: float = LOG2_BIN_OFFSET) -> torch.Tensor:
    """−log p(x) / (d ln 2) + offset; offset log2(127.5) makes it a discrete 8-bit NLL for data in [-1, 1]."""
    return -log_px / (dims * math.log(2)) + offset


def dequantize(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Uniform dequantization of 8-bit data in [-1, 1]: x + u·2/255, u ~ U[0, 1)."""
    u = torch.rand(x.shape, generator=generator, dtype=x.dtype, device=generator.device if generator else x.device)
    return x + u.to(x.device) * (2.0 / 255.0)


def bits_per_dim(
    logits_fn: LogitsFn,
    x: torch.Tensor,
    schedule: Schedule | None = None,
    prior: torch.Tensor | None = None,
    *,
    dequantize_data: bool = False,
    generator: torch.Generator | None = None,
    offset: float = LOG2_BIN_OFFSET,
) -> torch.Tensor:
    """Negative log-likelihood in bits per dimension for 8-bit images in [-1, 1], per sample.

    Convention: bpd = −log p(x)/(d·ln 2) + log2(127.5) (`offset`), optionally
    with uniform dequantization. Pass `offset=OFFICIAL_CODE_OFFSET` for the
    official code's +7.
    """
    if dequantize_data:
        x = dequantize(x, generator)
    return nats_to_bits_per_dim(log_likelihood(logits_fn, x, schedule, prior), x[0].numel(), offset)


def cdm_loss(
    logits_fn: LogitsFn,
    x0: torch.Tensor,
    schedule: Schedule,
    *,
    w_ce: float = 1e-3,
    w_mse: float = 1.0,
    prior: torch.Tensor | None = None,
    t: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    input_grad: str = "autograd",
) -> LossParts:
    """Algorithm 1: L = w_ce·CE(ℓ(x_t), t) + w_mse·mean‖ε̂(x_t, t) − ε‖², t ~ π.

    The MSE is averaged over batch and dimensions (per-dimension MSE, as the
    official code's `nn.MSELoss`), which is what the paper's w_ce = 0.001
    is calibrated against. With w_mse = 0 the input gradient is skipped, so
    CE-only training costs one backward pass. Under `torch.no_grad()` (e.g.
    validation) the denoiser is evaluated without a double-backward graph.
    `input_grad="func"` takes ∇_x with `torch.func.grad` (see `denoise_with_logits`): the form
    `torch.compile` can compile; pass `t` and `noise` then, since a compiled function cannot draw
    from a `torch.Generator`.
    """
    if w_ce < 0 or w_mse < 0 or (w_ce == 0 and w_mse == 0):
        raise ValueError(f"loss weights must be non-negative and not both zero, got w_ce={w_ce}, w_mse={w_mse}")
    batch = x0.shape[0]
    if t is None:
        t = sample_timesteps(batch, schedule.num_classes, prior, generator=generator, device=x0.device)
    if noise is None:
        noise = draw_noise(x0, generator)
    x_t = noise_data(x0, t, schedule, noise)

    if w_mse > 0:
        training = torch.is_grad_enabled()
        eps_hat, logits = denoise_with_logits(logits_fn, x_t, t, schedule, create_graph=training, input_grad=input_grad)
        mse = F.mse_loss(eps_hat.float(), noise.float())
    else:
        logits = logits_fn(x_t)
        mse = torch.zeros((), device=x0.device)
    ce = F.cross_entropy(logits.float(), t)
    return LossParts(w_ce * ce + w_mse * mse, ce, mse)


def drop_labels(y: torch.Tensor, p: float, null_label: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Replace each label by the null label with probability p (classifier-free guidance training).

    The paper trains conditional CDMs with p = 0.1; the official code forgot
    to apply it in its training loop, so its unconditional branch is untrained.
    """
    if not 0 <= p < 1:
        raise ValueError(f"label dropout must be in [0, 1), got {p}")
    u = torch.rand(y.shape, generator=generator, device=generator.device if generator else y.device).to(y.device)
    return torch.where(u < p, torch.full_like(y, null_label), y)
