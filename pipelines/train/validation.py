"""Validation during training, on each worker's share of the validation split, with the EMA model.

The numbers sweeps optimise:

    val/nll_bpd   NLL in bits/dim from one forward pass (Theorem 3.2), convention
                  −log p(x)/(d·ln 2) + log2(127.5), optionally dequantized  (CDM only); on continuous
                  data (data.normalization) the continuous convention −log p_x(x)/(d·ln 2), the
                  normalization's Jacobian undone (pipelines.data.normalization)
    val/ce        cross-entropy of the noise-level classifier, averaged over the t grid  (CDM only)
    val/accuracy  how often the classifier's most likely class is the true t, over the t grid  (CDM only)
    val/mse       denoising MSE ‖ε̂(x_t, t) − ε‖² per dimension, averaged over the t grid
    val/mse_t     the same per grid point (the per-t curve, plotted at the end)

The 0 → 1 link and the model's self-consistency (CDM only):

    val/link01_nats           mean ℓ₀ − ℓ₁ at the images val/nll_bpd scores, every validation
    val/link01_expected_nats  its scale on 8-bit data, d·ln(√(2π)·s₁/Δ) + log π(0) − log π(1), Δ = 2/255
                              (cdm_core.likelihood.link01_expected_nats): ≈ 0 against it means val/nll_bpd
                              is the density at class 1 (the data blurred by s₁), not the data's
    val/nll_bpd_elbo          final validation, 8-bit images: the model's own ELBO (discretized decoder,
                              validation.consistency_classes classes even in log-SNR) on the first N images
    val/consistency_nll_bpd   the one-pass figure on the same images
    val/consistency_gap_bpd   one-pass − ELBO on one footing (cdm_core.likelihood.one_pass_minus_elbo_bpd);
                              above 0 contradicts a bound of the same model. Even a consistent model's is
                              below 0 by the chain's own looseness (1.5 bits/dim for 39 classes on an exact
                              mixture, tests/test_likelihood_core.py)
    val/consistency_samples, val/consistency_elbo_classes, val/consistency_seconds

N is validation.consistency_samples, cut so that the ELBO's ε̂ calls (N × classes) stay within
CONSISTENCY_BUDGET of the run's validation ε̂ calls (validations × images × t_points); a count of work,
so that N does not depend on timing. Measured in one process (benchmarks/consistency_cost.py): at
configs/demo.toml's settings (18 images × 20 classes) +8.4% of the run's validation time; on
configs/train_tiny.toml's 8×8 network (17 × 20), where a call's fixed cost outweighs its images, +31%. With several workers the
first N images fall where the reader put them, so one worker may hold more of them. The ELBO's x_t
noise of sample i comes from (validation.seed, i), as the rest.

The t grid is `t_points` classes evenly spaced in 1..T, and the noise of sample i
comes from a generator seeded with (validation.seed, i): the figures depend on
neither the worker count nor the batch size. Padding rows of the reader are
skipped, so every sample counts exactly once; workers' sums are all-reduced.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from cdm_core.likelihood import elbo_bits_per_dim, link01_expected_nats, log_snr_classes, one_pass_minus_elbo_bpd
from cdm_core.objective import (
    LOG2_BIN_OFFSET,
    denoise_with_logits,
    dequantize,
    log_likelihood_from_logits,
    nats_to_bits_per_dim,
    noise_data,
)
from cdm_core.samplers import cdm_eps_fn, ddim_sample, ddm_eps_fn, initial_noise
from cdm_core.schedules import Schedule
from pipelines.common.precision import tf32
from pipelines.data.normalization import Normalization
from pipelines.data.preview import image_grid, labelled_rows
from pipelines.data.readers import from_model_input
from pipelines.train import collectives
from pipelines.train.config import TrainConfig

BPD_CONVENTION = "bpd = -log p(x)/(d ln 2) + log2(127.5); 8-bit data in [-1,1], bin width 2/255"
CONSISTENCY_BUDGET = 0.10  # the final ELBO's share of a run's validation work, at most
ELBO_TAG = 11  # keeps the ELBO's per-sample noise streams apart from the t grid's


def validations_per_run(config: TrainConfig) -> int:
    """How many validations a run of train.steps makes: every validation.every and checkpoint.every steps, and
    at the last step."""
    steps, every, ckpt = config.train.steps, config.validation.every, config.checkpoint.every
    both = every * ckpt // math.gcd(every, ckpt)
    last = 0 if steps % every == 0 or steps % ckpt == 0 else 1
    return steps // every + steps // ckpt - steps // both + last


def consistency_subset(config: TrainConfig, images: int, classes: int) -> int:
    """N of the final validation's ELBO: validation.consistency_samples, within CONSISTENCY_BUDGET of the work."""
    budget = CONSISTENCY_BUDGET * validations_per_run(config) * images * config.validation.t_points / classes
    return max(0, min(config.validation.consistency_samples, images, int(budget)))


def _elbo_generators(indices: torch.Tensor, seed: int) -> list[torch.Generator]:
    return [
        torch.Generator().manual_seed(int(np.random.default_rng([int(seed), int(i), ELBO_TAG]).integers(2**62)))
        for i in indices.tolist()
    ]


def t_grid(T: int, points: int) -> torch.Tensor:
    return torch.linspace(1, T, points, dtype=torch.float64).round().long().unique()


def _sample_noise(indices: torch.Tensor, count: int, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """(B, count, *shape) standard normal noise; sample i's noise depends only on (seed, i)."""
    out = torch.empty((len(indices), count, *shape))
    for row, i in enumerate(indices.tolist()):
        g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(i))
        out[row] = torch.randn((count, *shape), generator=g)
    return out


class Validator:
    """Holds this worker's validation batches (read once, kept in memory) and computes the metrics."""

    def __init__(
        self,
        config: TrainConfig,
        schedule: Schedule,
        prior: torch.Tensor | None,
        device: torch.device,
        data_shape: tuple[int, ...] | None = None,
    ):
        self.config = config
        # The data's dimension for val/link01_expected_nats: a worker may hold no validation batch (a small
        # split over several workers), and every worker computes the same metrics.
        self.dims = math.prod(data_shape) if data_shape else None
        self.schedule = schedule.to(device=device, dtype=torch.float32)
        self.prior = prior
        self.device = device
        self.grid = t_grid(config.schedule.T, config.validation.t_points)
        self.batches: list[dict[str, torch.Tensor]] | None = None
        self.curve: list[float] = []  # val/mse per grid point, from the latest validation
        self.normalization = Normalization.from_json(config.data.normalization, "data.normalization")

    def load(self, batches: Iterable[dict[str, Any]]) -> None:
        limit = self.config.validation.max_samples
        kept = []
        for b in batches:
            keep = ~b["pad"].bool()
            if limit is not None:
                keep &= b["index"] < limit
            if keep.any():
                kept.append({k: b[k][keep].clone() for k in ("x", "label", "index")})
        self.batches = kept

    def __call__(self, model: torch.nn.Module, final: bool = False) -> dict[str, float]:
        """Metrics of `model` (the EMA network) over the whole validation set (all workers), in full fp32;
        `final`: the run's last validation, which adds the ELBO of the consistency check."""
        with tf32(self.config.validation.allow_tf32):
            metrics = self._measure(model)
            if final and metrics and self._checks_consistency():
                metrics |= self._consistency(model, int(metrics["val/samples"]))
            return metrics

    def _checks_consistency(self) -> bool:
        cfg = self.config
        return cfg.model.kind == "cdm" and self.normalization is None and cfg.validation.consistency_samples > 0

    def _one_pass(self, model: torch.nn.Module, b: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """val/nll_bpd's per-sample bits/dim and ℓ₀ − ℓ₁ of a batch, from one forward pass."""
        cfg = self.config
        x0 = b["x"].to(self.device)
        y = b["label"].to(self.device) if cfg.model.conditional else None
        dims = x0[0].numel()
        x_nll = x0
        if cfg.validation.dequantize:
            g = torch.Generator().manual_seed(cfg.validation.seed + int(b["index"][0]))
            x_nll = dequantize(x0.cpu(), g).to(self.device)
        logits = model(x_nll) if y is None else model(x_nll, y)
        log_px = log_likelihood_from_logits(logits, x_nll, self.prior)
        if self.normalization is None:  # 8-bit images
            bpd = nats_to_bits_per_dim(log_px, dims, LOG2_BIN_OFFSET)
        else:  # continuous data: the density of the data as given, no bin offset
            log_det = self.normalization.log_det(tuple(x0.shape[1:]))
            bpd = nats_to_bits_per_dim(log_px.double() - log_det, dims, 0.0)
        return bpd, logits[:, 0] - logits[:, 1]

    @torch.no_grad()
    def _consistency(self, model: torch.nn.Module, images: int) -> dict[str, float]:
        """The ELBO of the first N validation images and the one-pass figure beside it (module docstring)."""
        started = time.perf_counter()
        cfg = self.config
        classes = log_snr_classes(self.schedule, cfg.validation.consistency_classes)
        n = consistency_subset(cfg, images, len(classes))
        sums = torch.zeros(3, dtype=torch.float64, device=self.device)  # count, one-pass bpd, ELBO bpd
        for b in self.batches or []:
            keep = b["index"] < n
            if not keep.any():
                continue
            b = {key: v[keep] for key, v in b.items()}
            y = b["label"].to(self.device) if cfg.model.conditional else None
            one_pass, _ = self._one_pass(model, b)
            eps_fn = cdm_eps_fn(model, self.schedule, y)
            gens = _elbo_generators(b["index"], cfg.validation.seed)
            elbo = elbo_bits_per_dim(eps_fn, b["x"].to(self.device), self.schedule, classes=classes, generator=gens)
            sums += torch.tensor(
                [len(one_pass), float(one_pass.double().sum()), float(elbo.bpd.sum())], device=self.device
            )
        sums = collectives.all_sum(sums, self.device)
        count = float(sums[0])
        if count == 0:
            return {}
        one_pass, elbo = float(sums[1]) / count, float(sums[2]) / count
        return {
            "val/nll_bpd_elbo": elbo,
            "val/consistency_nll_bpd": one_pass,
            "val/consistency_gap_bpd": float(one_pass_minus_elbo_bpd(one_pass, elbo)),
            "val/consistency_samples": count,
            "val/consistency_elbo_classes": float(len(classes)),
            "val/consistency_seconds": time.perf_counter() - started,
        }

    @torch.no_grad()
    def _measure(self, model: torch.nn.Module) -> dict[str, float]:
        assert self.batches is not None, "call load() first"
        cfg = self.config
        is_cdm = cfg.model.kind == "cdm"
        k = len(self.grid)
        # sums: [count, nll_bpd, ce per t (k), mse per t (k), correct per t (k), ℓ₀ − ℓ₁]
        sums = torch.zeros(3 + 3 * k, dtype=torch.float64, device=self.device)
        dims = self.dims
        for b in self.batches:
            x0 = b["x"].to(self.device)
            y = b["label"].to(self.device) if cfg.model.conditional else None
            n = len(x0)
            dims = x0[0].numel()
            noise = _sample_noise(b["index"], k, tuple(x0.shape[1:]), cfg.validation.seed).to(self.device)
            sums[0] += n
            if is_cdm:
                logits_fn = model if y is None else (lambda z, y=y: model(z, y))
                bpd, link01 = self._one_pass(model, b)
                sums[1] += bpd.double().sum()
                sums[-1] += link01.double().sum()
            for j, t_val in enumerate(self.grid.tolist()):
                t = torch.full((n,), t_val, dtype=torch.long, device=self.device)
                x_t = noise_data(x0, t, self.schedule, noise[:, j])
                if is_cdm:
                    eps_hat, logits = denoise_with_logits(logits_fn, x_t, t, self.schedule)
                    sums[2 + j] += F.cross_entropy(logits.float(), t, reduction="sum").double()
                    sums[2 + 2 * k + j] += (logits.argmax(dim=1) == t).sum().double()
                else:
                    eps_hat = model(x_t, t) if y is None else model(x_t, t, y)
                err = (eps_hat.float() - noise[:, j]).pow(2).flatten(1).mean(1)
                sums[2 + k + j] += err.double().sum()
        sums = collectives.all_sum(sums, self.device)
        count = float(sums[0])
        if count == 0:
            return {}
        per_t_mse = (sums[2 + k : 2 + 2 * k] / count).tolist()
        self.curve = per_t_mse
        metrics = {"val/mse": sum(per_t_mse) / k, "val/samples": count}
        if is_cdm:
            metrics["val/nll_bpd"] = float(sums[1]) / count
            metrics["val/ce"] = float(sums[2 : 2 + k].sum()) / (count * k)
            metrics["val/accuracy"] = float(sums[2 + 2 * k : 2 + 3 * k].sum()) / (count * k)
            metrics["val/link01_nats"] = float(sums[-1]) / count
            if self.normalization is None and dims is not None:
                metrics["val/link01_expected_nats"] = link01_expected_nats(self.schedule, dims, self.prior)
        return {key: float(v) for key, v in metrics.items() if math.isfinite(v) or key == "val/samples"}


def plot_curve(grid: torch.Tensor, curve: list[float], path: str, title: str) -> None:
    """The per-t validation MSE as a PNG."""
    # Deferred: only rank 0 draws it, and every worker process would pay matplotlib's ~1 s of import.
    from matplotlib.figure import Figure  # noqa: PLC0415

    fig = Figure(figsize=(5, 3.5), dpi=100)
    ax = fig.subplots()
    ax.plot(grid.tolist(), curve, marker="o")
    ax.set_xlabel("t (noise level class)")
    ax.set_ylabel("val MSE ‖ε̂ − ε‖² per dim")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)


@torch.no_grad()
def sample_grid(
    model: torch.nn.Module, config: TrainConfig, schedule: Schedule, shape: tuple[int, ...], device: torch.device
) -> np.ndarray:
    """A uint8 (rows·H, cols·W, C) grid of DDIM samples from the EMA model (fixed start noise).

    A conditional model's grid has a row per class (up to `sampling.num_images` classes), labelled with
    it on the left, and comes enlarged to ≥ 512 px (`preview.labelled_rows`).
    """
    s = config.sampling
    sched = schedule.to(device=device, dtype=torch.float32)
    y, n, cols = None, s.num_images, None
    if config.model.conditional:
        classes = min(config.data.num_labels, s.num_images)
        cols = max(1, s.num_images // classes)
        n = classes * cols
        y = torch.arange(classes, device=device).repeat_interleave(cols)
    eps_fn = cdm_eps_fn(model, sched, y) if config.model.kind == "cdm" else ddm_eps_fn(model, y)
    g = torch.Generator().manual_seed(s.seed)
    x = initial_noise((n, *shape), sched, generator=g).to(device)
    images = from_model_input(ddim_sample(eps_fn, x, sched, s.steps, clip_x0=1.0).clamp(-1, 1).float().cpu())
    grid = image_grid(images, cols)
    if y is None:
        return grid
    return labelled_rows(grid, [f"class {k}" for k in range(n // cols)])
