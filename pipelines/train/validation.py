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

The t grid is `t_points` classes evenly spaced in 1..T, and the noise of sample i
comes from a generator seeded with (validation.seed, i): the figures depend on
neither the worker count nor the batch size. Padding rows of the reader are
skipped, so every sample counts exactly once; workers' sums are all-reduced.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure

from cdm_core.objective import (
    LOG2_BIN_OFFSET,
    denoise_with_logits,
    dequantize,
    log_likelihood,
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

    def __init__(self, config: TrainConfig, schedule: Schedule, prior: torch.Tensor | None, device: torch.device):
        self.config = config
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

    def __call__(self, model: torch.nn.Module) -> dict[str, float]:
        """Metrics of `model` (the EMA network) over the whole validation set (all workers), in full fp32."""
        with tf32(self.config.validation.allow_tf32):
            return self._measure(model)

    @torch.no_grad()
    def _measure(self, model: torch.nn.Module) -> dict[str, float]:
        assert self.batches is not None, "call load() first"
        cfg = self.config
        is_cdm = cfg.model.kind == "cdm"
        k = len(self.grid)
        # sums: [count, nll_bpd, ce per t (k), mse per t (k), correct per t (k)]
        sums = torch.zeros(2 + 3 * k, dtype=torch.float64, device=self.device)
        dims = None
        for b in self.batches:
            x0 = b["x"].to(self.device)
            y = b["label"].to(self.device) if cfg.model.conditional else None
            n = len(x0)
            dims = x0[0].numel()
            noise = _sample_noise(b["index"], k, tuple(x0.shape[1:]), cfg.validation.seed).to(self.device)
            sums[0] += n
            if is_cdm:
                logits_fn = model if y is None else (lambda z, y=y: model(z, y))
                x_nll = x0
                if cfg.validation.dequantize:
                    g = torch.Generator().manual_seed(cfg.validation.seed + int(b["index"][0]))
                    x_nll = dequantize(x0.cpu(), g).to(self.device)
                log_px = log_likelihood(logits_fn, x_nll, prior=self.prior)
                if self.normalization is None:  # 8-bit images
                    bpd = nats_to_bits_per_dim(log_px, dims, LOG2_BIN_OFFSET)
                else:  # continuous data: the density of the data as given, no bin offset
                    log_det = self.normalization.log_det(tuple(x0.shape[1:]))
                    bpd = nats_to_bits_per_dim(log_px.double() - log_det, dims, 0.0)
                sums[1] += bpd.double().sum()
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
            metrics["val/accuracy"] = float(sums[2 + 2 * k :].sum()) / (count * k)
        return {key: float(v) for key, v in metrics.items() if math.isfinite(v) or key == "val/samples"}


def plot_curve(grid: torch.Tensor, curve: list[float], path: str, title: str) -> None:
    """The per-t validation MSE as a PNG."""
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
