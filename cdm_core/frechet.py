"""Fréchet distance between Gaussians fitted to feature sets (FID and its relatives).

    FD = ‖μ1 − μ2‖² + tr C1 + tr C2 − 2 tr (C1^{1/2} C2 C1^{1/2})^{1/2}

pytorch-fid computes the last term with ``scipy.linalg.sqrtm(C1 @ C2)``, a
non-symmetric matrix square root that turns complex or NaN when the covariances
are singular (fewer samples than feature dimensions). Here both square roots are
of symmetric positive semi-definite matrices, done with ``eigh``/``eigvalsh``
with negative round-off eigenvalues clamped to 0, so the result is always a
finite real number. The value is the same: C1 C2 and C1^{1/2} C2 C1^{1/2} are
similar matrices.

``FeatureStats`` accumulates the sufficient statistics (count, sum, sum of outer
products) in float64 so that workers can each process a shard and merge.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

__all__ = ["frechet_distance", "FeatureStats", "fd_from_stats"]


def _as_float64(x: Any, name: str, ndim: int) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().double().numpy()
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimension(s), got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return x


def frechet_distance(mu1: Any, cov1: Any, mu2: Any, cov2: Any) -> float:
    """Fréchet distance between N(mu1, cov1) and N(mu2, cov2), in float64 (numpy or torch inputs)."""
    mu1, mu2 = _as_float64(mu1, "mu1", 1), _as_float64(mu2, "mu2", 1)
    cov1, cov2 = _as_float64(cov1, "cov1", 2), _as_float64(cov2, "cov2", 2)
    d = mu1.shape[0]
    if mu2.shape != (d,) or cov1.shape != (d, d) or cov2.shape != (d, d):
        raise ValueError(f"shape mismatch: mu1 {mu1.shape}, cov1 {cov1.shape}, mu2 {mu2.shape}, cov2 {cov2.shape}")
    # Symmetrise: accumulated covariances are symmetric only up to round-off.
    cov1 = (cov1 + cov1.T) / 2
    cov2 = (cov2 + cov2.T) / 2

    eigvals, eigvecs = np.linalg.eigh(cov1)
    sqrt_cov1 = (eigvecs * np.sqrt(np.clip(eigvals, 0.0, None))) @ eigvecs.T
    middle = sqrt_cov1 @ cov2 @ sqrt_cov1
    middle_eigvals = np.linalg.eigvalsh((middle + middle.T) / 2)
    trace_sqrt = np.sqrt(np.clip(middle_eigvals, 0.0, None)).sum()

    diff = mu1 - mu2
    fd = diff @ diff + np.trace(cov1) + np.trace(cov2) - 2.0 * trace_sqrt
    return max(float(fd), 0.0)


class FeatureStats:
    """Streaming mean/covariance of feature vectors that merges exactly across workers.

    Fields: ``count``; ``shift`` (D,); ``sum`` = Σ (x − shift) (D,);
    ``sum_outer`` = Σ (x − shift)(x − shift)ᵀ (D, D); all float64.

    Why a shift: the covariance is sum_outer/N − mean·meanᵀ, and when features
    have a mean far larger than their spread (Inception pool features are
    positive with mean ≫ std in many dimensions) the two terms nearly cancel.
    Accumulating about ``shift`` — the mean of the first batch seen — keeps the
    terms small. Merging stats with different shifts re-expresses the other
    side's sums about our shift, which is exact algebra and only involves the
    (small) difference between the two shifts.
    """

    def __init__(self, dim: int | None = None) -> None:
        self.count = 0
        self.shift: np.ndarray | None = None
        self.sum: np.ndarray | None = None
        self.sum_outer: np.ndarray | None = None
        if dim is not None:
            self._init(np.zeros(dim))

    def _init(self, shift: np.ndarray) -> None:
        d = shift.shape[0]
        self.shift = shift.astype(np.float64, copy=True)
        self.sum = np.zeros(d)
        self.sum_outer = np.zeros((d, d))

    @property
    def dim(self) -> int | None:
        return None if self.shift is None else self.shift.shape[0]

    def update(self, features: Any) -> FeatureStats:
        """Add a (N, D) batch of features."""
        x = _as_float64(features, "features", 2)
        if x.shape[0] == 0:
            return self
        if self.dim is not None and x.shape[1] != self.dim:
            raise ValueError(f"features have dimension {x.shape[1]}, these stats have dimension {self.dim}")
        if self.count == 0:
            self._init(x.mean(axis=0))
        centred = x - self.shift
        self.count += x.shape[0]
        self.sum += centred.sum(axis=0)
        self.sum_outer += centred.T @ centred
        return self

    def merge(self, other: FeatureStats) -> FeatureStats:
        """Add another FeatureStats into this one (in place); returns self."""
        if other.count == 0:
            if other.dim is not None and self.dim is not None and other.dim != self.dim:
                raise ValueError(f"cannot merge stats of dimension {other.dim} into dimension {self.dim}")
            return self
        if self.count == 0:
            if self.dim is not None and other.dim != self.dim:
                raise ValueError(f"cannot merge stats of dimension {other.dim} into dimension {self.dim}")
            self._init(other.shift)
        if other.dim != self.dim:
            raise ValueError(f"cannot merge stats of dimension {other.dim} into dimension {self.dim}")
        # Re-express the other's sums about our shift: x − a = (x − b) + δ with δ = b − a.
        delta = other.shift - self.shift
        n = other.count
        self.sum_outer += (
            other.sum_outer + np.outer(other.sum, delta) + np.outer(delta, other.sum) + n * np.outer(delta, delta)
        )
        self.sum += other.sum + n * delta
        self.count += n
        return self

    @classmethod
    def merged(cls, stats: Iterable[FeatureStats]) -> FeatureStats:
        """A new FeatureStats equal to the union of ``stats`` (inputs untouched)."""
        result = cls()
        for s in stats:
            result.merge(s)
        return result

    def mean(self) -> np.ndarray:
        if self.count == 0:
            raise ValueError("mean of empty FeatureStats")
        return self.shift + self.sum / self.count

    def cov(self) -> np.ndarray:
        """Unbiased covariance (N − 1 denominator), as numpy.cov(features, rowvar=False)."""
        if self.count < 2:
            raise ValueError(f"covariance needs at least 2 features, have {self.count}")
        centred_mean = self.sum / self.count
        return (self.sum_outer - self.count * np.outer(centred_mean, centred_mean)) / (self.count - 1)

    def to_dict(self, as_lists: bool = False) -> dict[str, Any]:
        """Plain data (numpy arrays, or nested lists for JSON) for Ray object transfer or caching."""
        if self.shift is None:
            return {"count": 0, "shift": None, "sum": None, "sum_outer": None}
        convert = (lambda a: a.tolist()) if as_lists else (lambda a: a.copy())
        return {
            "count": int(self.count),
            "shift": convert(self.shift),
            "sum": convert(self.sum),
            "sum_outer": convert(self.sum_outer),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FeatureStats:
        stats = cls()
        if d["shift"] is None:
            return stats
        stats._init(np.asarray(d["shift"], dtype=np.float64))
        stats.sum = np.array(d["sum"], dtype=np.float64)
        stats.sum_outer = np.array(d["sum_outer"], dtype=np.float64)
        stats.count = int(d["count"])
        dim = stats.dim
        if stats.sum.shape != (dim,) or stats.sum_outer.shape != (dim, dim):
            raise ValueError(
                f"inconsistent FeatureStats dict: shift {dim}, sum {stats.sum.shape}, sum_outer {stats.sum_outer.shape}"
            )
        return stats

    def __repr__(self) -> str:
        return f"FeatureStats(count={self.count}, dim={self.dim})"


def fd_from_stats(a: FeatureStats, b: FeatureStats) -> float:
    """Fréchet distance between the Gaussians fitted to two FeatureStats."""
    return frechet_distance(a.mean(), a.cov(), b.mean(), b.cov())
