"""The FID stage on a real local Ray: exact merged statistics, shifts, the reference cache, every extractor."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import new_store, prepare_quick

ray = pytest.importorskip("ray")

from test_features import random_inception_weights, torch_fidelity_available  # noqa: E402

from cdm_core.frechet import frechet_distance  # noqa: E402
from pipelines.common.config import nest  # noqa: E402
from pipelines.common.errors import UserError  # noqa: E402
from pipelines.data import shards as sh  # noqa: E402
from pipelines.data.readers import load_split, to_model_input  # noqa: E402
from pipelines.evaluate.config import FidConfig, TrainFeaturesConfig  # noqa: E402
from pipelines.evaluate.feature_classifier import train_features  # noqa: E402
from pipelines.evaluate.features import InceptionFeatures, RawFeatures  # noqa: E402
from pipelines.evaluate.fid import run  # noqa: E402
from pipelines.evaluate.sample import write_dataset  # noqa: E402


def write_vectors(out, points, seed=0):
    """Vectors as a one-split dataset (the format `cdm sample` writes)."""
    spec = sh.SampleSpec("vector", (points.shape[1],), False, None)
    write_dataset(
        str(out),
        "samples",
        spec,
        iter([{"x": points.astype(np.float32)}]),
        source="samples",
        options={},
        fingerprint=f"test-{seed}-{len(points)}",
        samples_per_shard=150,
    )
    return out


def write_images(out, images, tag):
    """uint8 (N, H, W, C) images as a one-split dataset."""
    spec = sh.SampleSpec("image", images.shape[1:], False, None)
    write_dataset(
        str(out),
        "samples",
        spec,
        iter([{"x": to_model_input(images)}]),
        source="samples",
        options={},
        fingerprint=f"test-{tag}",
        samples_per_shard=40,
    )
    return out


def direct_fd(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return frechet_distance(a.mean(0), np.cov(a.T), b.mean(0), np.cov(b.T))


def test_in_this_process_the_fd_is_the_direct_computation(tmp_path):
    """--workers 0: one FeatureWorker in this process (no Ray is joined: the address given leads nowhere)
    merges every shard's statistics of both datasets into the two-pass FD."""
    reference = tmp_path / "reference"
    prepare_quick("toy2d", reference, name="gmm", num_train=400, num_test=1, samples_per_shard=130)
    ref_points, _ = load_split(reference, "train")
    other = write_vectors(tmp_path / "other", ref_points[::-1] + np.array([0.5, 0.0]), seed=2)
    result = run(
        nest(
            FidConfig,
            samples=str(other),
            reference=str(reference),
            features="raw",
            cache_dir=str(tmp_path / "cache"),
            workers=0,
            address="127.0.0.1:1",
            track=False,
        )
    )
    stored, _ = load_split(other, "samples")
    assert result.value == pytest.approx(direct_fd(stored, ref_points), rel=1e-9, abs=1e-12) and result.value > 0.2
    assert result.samples_count == result.reference_count == 400


def test_fd_is_exact_near_zero_for_one_distribution_grows_with_shift_and_caches(ray_session, tmp_path):
    reference = tmp_path / "reference"
    prepare_quick("toy2d", reference, name="gmm", num_train=800, num_test=1, samples_per_shard=130)
    other = tmp_path / "other"
    prepare_quick("toy2d", other, name="gmm", num_train=800, num_test=1, seed=1)
    ref_points, _ = load_split(reference, "train")
    draw, _ = load_split(other, "train")
    cache = tmp_path / "cache"

    # A pool of 2 merges the statistics over shards and workers for the first draw; the other calls test what the
    # stage does around its workers (the formula, the cache, a changed or altered reference) in this process.
    def fd(samples, workers=0, **kw):
        return run(
            nest(
                FidConfig,
                samples=str(samples),
                reference=str(reference),
                features="raw",
                cache_dir=str(cache),
                workers=workers,
                batch_size=64,
                track=False,
                **kw,
            )
        )

    values, cached = [], []
    for shift in (0.0, 1.0, 2.0):
        samples = write_vectors(tmp_path / f"shift{shift}", draw + np.array([shift, 0.0]), seed=int(shift))
        result = fd(samples, workers=2 if shift == 0.0 else 0)
        # Streaming statistics merged over shards (and workers) equal the direct two-pass computation.
        stored, _ = load_split(samples, "samples")
        assert result.value == pytest.approx(direct_fd(stored, ref_points), rel=1e-9, abs=1e-12)
        assert result.metric == "eval/fd_raw" and result.samples_count == 800 and result.reference_count == 800
        values.append(result.value)
        cached.append(result.reference_cached)
    assert values[0] < 0.05  # two draws of one distribution
    # A shift δ moves only the means: FD(δ) = FD(0) + δ² + 2δ·(mean of the draw − mean of the reference), along x.
    gap = float(np.asarray(draw, np.float64)[:, 0].mean() - np.asarray(ref_points, np.float64)[:, 0].mean())
    for shift, value in zip((1.0, 2.0), values[1:]):
        assert value == pytest.approx(values[0] + shift**2 + 2 * shift * gap, rel=1e-5)
    assert values[0] < values[1] < values[2]
    assert cached == [False, True, True]  # computed once, then reused

    # The reference changes (same folder, different content): the cached statistics no longer apply.
    prepare_quick("toy2d", reference, name="gmm", num_train=600, num_test=1, samples_per_shard=130, force=True)
    changed = fd(tmp_path / "shift0.0")
    assert not changed.reference_cached and changed.reference_count == 600
    assert changed.value == pytest.approx(direct_fd(draw, load_split(reference, "train")[0]), rel=1e-9, abs=1e-12)
    # A shard altered behind dataset.json's back is refused, never scored or served from cache.
    shard = reference / "train-000000.tar"
    data = bytearray(shard.read_bytes())
    data[700] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(UserError, match="SHA-256"):
        fd(tmp_path / "shift0.0")


def test_classifier_features_give_fd_of_the_dataset_not_fid(ray_session, tmp_path):
    import mlflow

    digits = tmp_path / "digits"
    prepare_quick("digits", digits, samples_per_shard=400)
    clf = train_features(nest(TrainFeaturesConfig, dataset=str(digits), out=str(tmp_path / "clf"), track=False))
    assert clf.test_accuracy > 0.85 and clf.dataset_name == "digits"
    test_images, _ = load_split(digits, "test")
    brighter = write_images(tmp_path / "brighter", np.clip(test_images.astype(int) + 100, 0, 255).astype(np.uint8), "b")
    store = new_store(tmp_path / "mlflow.db")
    common = dict(
        reference=str(digits), features=f"classifier:{clf.path}", cache_dir=str(tmp_path / "cache"), workers=2
    )
    same = run(nest(FidConfig, samples=str(digits), samples_split="test", tracking_uri=store, **common))
    shifted = run(nest(FidConfig, samples=str(brighter), track=False, **common | {"workers": 0}))
    assert same.metric == "eval/fd_digits" and same.reference_cached is False and shifted.reference_cached is True
    assert shifted.value > 5 * same.value  # the held-out split is close; shifted images are far
    got = mlflow.tracking.MlflowClient(store).get_run(same.run_id)
    assert got.data.metrics["eval/fd_digits"] == pytest.approx(same.value)
    assert "eval/fid" not in got.data.metrics and got.data.params["extractor"].startswith("classifier-")

    toy = tmp_path / "toy"
    prepare_quick("toy2d", toy, name="gmm8", num_train=20, num_test=5)
    with pytest.raises(UserError, match="holds vector"):
        run(nest(FidConfig, samples=str(toy), samples_split="test", reference=str(digits), features="raw", track=False))
    with pytest.raises(UserError, match="has splits"):
        run(nest(FidConfig, samples=str(digits), reference=str(digits), features="raw", track=False))


@pytest.mark.skipif(
    not torch_fidelity_available(),
    reason="torch-fidelity is not installed (pip install --no-deps torch-fidelity==0.4.0)",
)
def test_inception_path_end_to_end_with_random_weights(ray_session, tmp_path):
    """The whole Inception route on workers, with a random state dict: checks the plumbing, claims no FID figure."""
    import mlflow

    weights = tmp_path / "random-inception.pth"
    digest = random_inception_weights(weights)
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, size=(6, 12, 12, 3), dtype=np.uint8)
    b = rng.integers(0, 128, size=(6, 12, 12, 3), dtype=np.uint8)
    store = new_store(tmp_path / "mlflow.db")
    result = run(
        nest(
            FidConfig,
            samples=str(write_images(tmp_path / "a", a, "a")),
            reference=str(write_images(tmp_path / "b", b, "b")),
            reference_split="samples",
            features="inception",
            inception_weights=str(weights),
            inception_sha256=digest,
            cache_dir=str(tmp_path / "cache"),
            workers=1,
            tracking_uri=store,
        )
    )
    extractor = InceptionFeatures(str(weights), digest)
    assert result.metric == "eval/fid" and result.extractor == extractor.id
    assert result.value == pytest.approx(direct_fd(extractor(a), extractor(b)), rel=1e-6)
    assert mlflow.tracking.MlflowClient(store).get_run(result.run_id).data.metrics["eval/fid"] == pytest.approx(
        result.value
    )


def test_raw_features_scale_images_to_model_range():
    images = np.array([[[[0]], [[255]]]], dtype=np.uint8)  # one 2×1 grey image
    np.testing.assert_allclose(RawFeatures()(images), [[-1.0, 1.0]])
