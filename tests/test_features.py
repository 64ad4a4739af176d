"""Feature extractors: `cdm train-features` on mnist5k, and the Inception weights checks (no Ray needed).

The real FID weights cannot be downloaded here, so the Inception path is tested
with (1) the errors for a missing or wrong file and (2) torch-fidelity's
extractor loading a *randomly initialised* state dict from a temp file whose
hash is passed explicitly. No FID figure is claimed from it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import prepare_quick

from pipelines.common.config import nest
from pipelines.common.errors import UserError
from pipelines.common.storage import sha256_file
from pipelines.data.readers import load_split
from pipelines.evaluate.config import TrainFeaturesConfig
from pipelines.evaluate.feature_classifier import load_classifier, train_features
from pipelines.evaluate.features import (
    INCEPTION_FILENAMES,
    ClassifierFeatures,
    InceptionFeatures,
    inception_weights,
    resolve_extractor,
)

CDM = str(Path(sys.executable).with_name("cdm"))
# What `cdm train-features` reaches on mnist5k's 500 test digits with its defaults (8 epochs, seed 0): 97.6%
# on the development machine. The bar leaves room for other BLAS builds, not for a broken classifier.
MNIST5K_MIN_ACCURACY = 0.96


def torch_fidelity_available() -> bool:
    from importlib.util import find_spec

    return find_spec("torch_fidelity") is not None


def random_inception_weights(path: Path) -> str:
    """A randomly initialised state dict for torch-fidelity's Inception, saved to `path`; returns its SHA-256."""
    from pipelines.evaluate.features import _import_inception_extractor

    extractor_cls = _import_inception_extractor()

    class Unloaded(extractor_cls):
        def load_state_dict(self, *args, **kwargs):  # keep the random initialisation
            return None

    empty = path.with_name("empty.pt")
    torch.save({}, empty)
    torch.manual_seed(0)
    torch.save(Unloaded("random", ["2048"], feature_extractor_weights_path=str(empty)).state_dict(), path)
    return sha256_file(path)


def test_train_features_on_mnist5k_reaches_the_stated_accuracy(tmp_path):
    import mlflow

    ds = tmp_path / "mnist5k"
    prepare_quick("mnist5k", ds)
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = train_features(nest(TrainFeaturesConfig, dataset=str(ds), out=str(tmp_path / "clf"), tracking_uri=store))
    assert result.test_accuracy >= MNIST5K_MIN_ACCURACY, result
    assert result.dataset_name == "mnist5k" and result.path.endswith("clf/classifier.pt")
    got = mlflow.tracking.MlflowClient(store).get_run(result.run_id)
    assert got.data.metrics["features/test_accuracy"] == pytest.approx(result.test_accuracy)

    # It loads back (weights_only) and its features separate the classes: same-class test digits are closer.
    model, meta, _ = load_classifier(result.path)
    assert meta["test_accuracy"] == result.test_accuracy and meta["dataset_name"] == "mnist5k"
    images, labels = load_split(ds, "test")
    feats = ClassifierFeatures(result.path)(images[:200])
    assert feats.shape == (200, 128) and np.isfinite(feats).all()
    centroids = np.stack([feats[labels[:200] == c].mean(0) for c in range(10)])
    nearest = np.argmin(((feats[:, None, :] - centroids[None]) ** 2).sum(-1), axis=1)
    assert (nearest == labels[:200]).mean() > 0.9

    spec = resolve_extractor(f"classifier:{result.path}")
    assert spec.metric == "eval/fd_mnist5k" and spec.kind == "classifier" and "FID" not in spec.metric


def test_train_features_refuses_unlabelled_or_vector_data(tmp_path):
    prepare_quick("toy2d", tmp_path / "toy", name="gmm8", num_train=20, num_test=5)
    with pytest.raises(UserError, match="holds vectors"):
        train_features(nest(TrainFeaturesConfig, dataset=str(tmp_path / "toy"), track=False))
    (tmp_path / "junk.pt").write_bytes(b"not a classifier")
    with pytest.raises(UserError, match="not a cdm feature classifier"):
        load_classifier(tmp_path / "junk.pt")


def test_missing_inception_weights_say_which_file_and_where(tmp_path, monkeypatch):
    monkeypatch.setenv("CDM_WEIGHTS_DIR", str(tmp_path / "weights"))
    monkeypatch.delenv("CDM_INCEPTION_SHA256", raising=False)
    with pytest.raises(UserError) as err:
        inception_weights()
    message = str(err.value)
    assert str(tmp_path / "weights" / INCEPTION_FILENAMES[0]) in message and "never downloads" in message
    assert "classifier:PATH" in message  # the offline alternative
    with pytest.raises(UserError, match=r"nope.pth: no such Inception weights file"):
        inception_weights(str(tmp_path / "nope.pth"))


def test_wrong_inception_weights_are_refused_before_loading(tmp_path, monkeypatch):
    monkeypatch.delenv("CDM_INCEPTION_SHA256", raising=False)
    wrong = tmp_path / "weights" / INCEPTION_FILENAMES[0]
    wrong.parent.mkdir()
    # A pickle that would run code if it were loaded with torch.load(weights_only=False): it must never be.
    wrong.write_bytes(b"cos\nsystem\n(S'touch " + str(tmp_path / "pwned").encode() + b"'\ntR.")
    monkeypatch.setenv("CDM_WEIGHTS_DIR", str(wrong.parent))
    with pytest.raises(UserError, match=r"SHA-256 [0-9a-f]{16}… does not match the expected 6726825d"):
        resolve_extractor("inception")
    digest = sha256_file(wrong)
    with pytest.raises(UserError, match="does not match the expected 0000"):
        inception_weights(str(wrong), "0000" + digest[4:])
    assert not (tmp_path / "pwned").exists()


def test_cli_fid_without_inception_weights_exits_cleanly(tmp_path):
    prepare_quick("toy2d", tmp_path / "toy", name="gmm8", num_train=20, num_test=5)
    env = {k: v for k, v in os.environ.items() if k not in ("CDM_DEBUG", "MLFLOW_TRACKING_URI", "CDM_INCEPTION_SHA256")}
    env["CDM_WEIGHTS_DIR"] = str(tmp_path / "none")
    r = subprocess.run(
        [CDM, "fid", str(tmp_path / "toy"), str(tmp_path / "toy"), "--no-track"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=tmp_path,
    )
    assert r.returncode == 2 and INCEPTION_FILENAMES[0] in r.stderr and "Traceback" not in r.stderr


@pytest.mark.skipif(
    not torch_fidelity_available(),
    reason="torch-fidelity is not installed (pip install --no-deps torch-fidelity==0.4.0)",
)
def test_torch_fidelity_inception_extractor_runs_without_torchvision(tmp_path):
    weights = tmp_path / "random-inception.pth"
    digest = random_inception_weights(weights)
    extractor = InceptionFeatures(str(weights), digest)
    assert extractor.id == f"inception-v3-{digest[:16]}"
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, size=(3, 16, 16, 1), dtype=np.uint8)
    feats = extractor(grey)
    assert feats.shape == (3, 2048) and feats.dtype == np.float64 and np.isfinite(feats).all()
    # Grey images are fed as RGB with three equal channels.
    np.testing.assert_allclose(extractor(np.repeat(grey, 3, axis=3)), feats, rtol=1e-6, atol=1e-6)
    assert not np.allclose(feats[0], feats[1])
