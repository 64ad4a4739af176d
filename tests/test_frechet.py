"""Fréchet distance against pytorch-fid's formula, and streaming feature statistics."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import scipy.linalg
import torch

from cdm_core.frechet import FeatureStats, fd_from_stats, frechet_distance


def reference_frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """pytorch-fid's calculate_frechet_distance (non-symmetric sqrtm, eps fallback)."""
    diff = mu1 - mu2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        covmean = scipy.linalg.sqrtm(sigma1.dot(sigma2))
        if not np.isfinite(covmean).all():
            offset = np.eye(sigma1.shape[0]) * eps
            covmean = scipy.linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"imaginary component {np.max(np.abs(covmean.imag))}")
        covmean = covmean.real
    return diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean)


def random_gaussian(rng: np.random.Generator, dim: int) -> tuple[np.ndarray, np.ndarray]:
    a = rng.normal(size=(dim, 2 * dim))
    return rng.normal(size=dim), a @ a.T / (2 * dim) + 0.1 * np.eye(dim)


@pytest.mark.parametrize("dim", [8, 64, 256])
def test_matches_pytorch_fid_reference(dim):
    rng = np.random.default_rng(dim)
    mu1, cov1 = random_gaussian(rng, dim)
    mu2, cov2 = random_gaussian(rng, dim)
    expected = reference_frechet_distance(mu1, cov1, mu2, cov2)
    assert frechet_distance(mu1, cov1, mu2, cov2) == pytest.approx(expected, rel=1e-6)
    # Symmetric in its two arguments.
    assert frechet_distance(mu2, cov2, mu1, cov1) == pytest.approx(expected, rel=1e-6)


def test_closed_forms():
    # Diagonal covariances: FD = ‖Δμ‖² + Σ (√a − √b)².
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 0.0])
    mu1, mu2 = np.zeros(3), np.array([1.0, 2.0, 0.0])
    expected = 5.0 + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-12)


def test_accepts_torch_tensors():
    rng = np.random.default_rng(0)
    mu1, cov1 = random_gaussian(rng, 16)
    mu2, cov2 = random_gaussian(rng, 16)
    as_torch = [torch.from_numpy(v) for v in (mu1, cov1, mu2, cov2)]
    result = frechet_distance(*as_torch)
    assert isinstance(result, float)
    assert result == pytest.approx(frechet_distance(mu1, cov1, mu2, cov2), rel=1e-12)


@pytest.mark.parametrize("dim", [8, 64, 256])
def test_identical_inputs_give_zero(dim):
    mu, cov = random_gaussian(np.random.default_rng(1), dim)
    value = frechet_distance(mu, cov, mu, cov)
    assert 0.0 <= value < 1e-9 * np.trace(cov)


@pytest.mark.parametrize("dim,n", [(64, 20), (128, 50), (32, 10)])
def test_rank_deficient_covariances(dim, n):
    """Fewer samples than dimensions: singular covariances, still finite, real, and right."""
    rng = np.random.default_rng(dim + n)
    a = rng.normal(size=(n, dim))
    b = 1.3 * rng.normal(size=(n, dim)) + 0.2
    mu1, cov1 = a.mean(0), np.cov(a, rowvar=False)
    mu2, cov2 = b.mean(0), np.cov(b, rowvar=False)
    assert np.linalg.matrix_rank(cov1) < dim
    value = frechet_distance(mu1, cov1, mu2, cov2)
    assert np.isfinite(value) and value >= 0.0
    assert value == pytest.approx(reference_frechet_distance(mu1, cov1, mu2, cov2), rel=1e-6)
    # A single-sample "covariance" of zeros still gives ‖Δμ‖² + tr C2.
    assert frechet_distance(mu1, np.zeros_like(cov1), mu2, cov2) == pytest.approx(
        ((mu1 - mu2) ** 2).sum() + np.trace(cov2), rel=1e-10
    )


def test_rejects_bad_inputs():
    with pytest.raises(ValueError, match="shape mismatch"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance(np.zeros(2), np.array([[np.nan, 0], [0, 1]]), np.zeros(2), np.eye(2))


@pytest.mark.parametrize("mean_over_std", [100.0, 1e6])
def test_streaming_stats_merge_equal_one_pass_and_numpy(mean_over_std):
    # At 1e6 the unshifted formula sum_outer/N − μμᵀ is off by ~4e-3; the shifted one is exact to ~1e-12.
    rng = np.random.default_rng(0)
    dim, n = 16, 1000
    scale = rng.uniform(0.5, 2.0, size=dim)
    features = mean_over_std * scale * rng.uniform(0.5, 1.5, size=dim) + scale * rng.normal(size=(n, dim))
    expected_mean, expected_cov = features.mean(axis=0), np.cov(features, rowvar=False)

    one_pass = FeatureStats().update(features)
    chunks = [features[:137], features[137:700], features[700:]]
    shards = []
    for i, chunk in enumerate(chunks):
        stats = FeatureStats(dim)
        # Uneven sub-batches; torch float64 input for one shard.
        for part in np.array_split(chunk, i + 1):
            stats.update(torch.from_numpy(part) if i == 1 else part)
        shards.append(stats)
    merged = FeatureStats.merged(shards)
    assert [s.count for s in shards] == [137, 563, 300]  # inputs untouched

    for stats in (one_pass, merged):
        assert stats.count == n
        np.testing.assert_allclose(stats.mean(), expected_mean, rtol=1e-10, atol=0)
        np.testing.assert_allclose(stats.cov(), expected_cov, rtol=0, atol=1e-10 * np.abs(expected_cov).max())
    assert fd_from_stats(one_pass, merged) < 1e-9


def test_stats_dict_round_trip_and_empty_merges():
    rng = np.random.default_rng(3)
    stats = FeatureStats().update(rng.normal(size=(50, 4)))
    for as_lists in (False, True):
        data = stats.to_dict(as_lists=as_lists)
        if as_lists:
            data = json.loads(json.dumps(data))
        back = FeatureStats.from_dict(data)
        assert back.count == stats.count
        np.testing.assert_array_equal(back.mean(), stats.mean())
        np.testing.assert_array_equal(back.cov(), stats.cov())
    empty = FeatureStats.from_dict(FeatureStats().to_dict())
    assert empty.count == 0 and empty.dim is None
    merged = FeatureStats.merged([FeatureStats(), stats, FeatureStats(4)])
    np.testing.assert_array_equal(merged.cov(), stats.cov())
    with pytest.raises(ValueError, match="dimension"):
        stats.update(np.zeros((2, 5)))
    with pytest.raises(ValueError, match="at least 2"):
        FeatureStats().update(np.zeros((1, 4))).cov()


def test_fd_from_stats_matches_direct_computation():
    rng = np.random.default_rng(4)
    a, b = rng.normal(size=(300, 8)), 0.5 + rng.normal(size=(200, 8))
    expected = frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    assert fd_from_stats(FeatureStats().update(a), FeatureStats().update(b)) == pytest.approx(expected, rel=1e-10)
