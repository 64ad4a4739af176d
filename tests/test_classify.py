"""`cdm classify`: a class-conditional CDM as an exact Bayes classifier, on a real local Ray and MLflow store.

The exactness check: a 2-D Gaussian mixture prepared with `cdm prepare toy2d` (labels: the component each
point came from), classified with a checkpoint of the exact class-conditional CDM logits (label y =
component y, `cdm_core.analytic.ConditionalGaussianMixtureLogits`), must give the analytic Bayes posterior
p(y | x) ∝ p(y) N(x; μ_y, Σ_y) of every point — through shards, Ray Data, the actor pool and Parquet — with
the accuracy, the NLL of the labels, the ECE and the confusion matrix recomputed here independently. The
model's mixture is the data's squeezed (means ×0.3, covariances ×2), so that its classes overlap: the data's
own components are too far apart to be mistaken (accuracy 1), which would leave the figures untested.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import cli_in_process, new_store, prepare_quick
from scipy.special import logsumexp
from scipy.stats import multivariate_normal
from sklearn.metrics import accuracy_score, confusion_matrix, log_loss

ray = pytest.importorskip("ray")

from cdm_core.analytic import ConditionalGaussianMixtureLogits  # noqa: E402
from cdm_core.checkpoint import save_checkpoint  # noqa: E402
from pipelines.common.checkpoints import load_trained_model  # noqa: E402
from pipelines.common.config import nest  # noqa: E402
from pipelines.common.errors import UserError  # noqa: E402
from pipelines.data import shards as sh  # noqa: E402
from pipelines.data.readers import load_split  # noqa: E402
from pipelines.evaluate.classify import (  # noqa: E402
    class_log_likelihoods,
    class_prior,
    expected_calibration_error,
    run,
)
from pipelines.evaluate.config import ClassifyConfig  # noqa: E402
from pipelines.evaluate.nll import manifest_keys, read_scores  # noqa: E402

T = 20
SQUEEZE, WIDEN = 0.3, 2.0


def model_mixture(gmm) -> tuple[list, list, list]:
    """(weights, means, covariances) of the model: the data's mixture, its classes pushed into one another."""
    dist = sh.open_dataset(gmm).meta["toy"]["distribution"]
    means = (SQUEEZE * np.asarray(dist["means"])).tolist()
    return dist["weights"], means, (WIDEN * np.asarray(dist["covariances"])).tolist()


@pytest.fixture(scope="module")
def gmm(tmp_path_factory):
    """The toy mixture (3 components, weights 0.5/0.3/0.2): 300 train points for the prior, 170 test points in
    uneven shards of 40 (40, 40, 40, 40, 10)."""
    out = tmp_path_factory.mktemp("gmm") / "ds"
    prepare_quick("toy2d", out, name="gmm", num_train=300, num_test=170, samples_per_shard=40)
    return out


@pytest.fixture(scope="module")
def exact(gmm, tmp_path_factory):
    model = ConditionalGaussianMixtureLogits(*model_mixture(gmm), "linear", T)
    path = tmp_path_factory.mktemp("exact") / "checkpoint.pt"
    config = {"model": {"kind": "cdm"}, "schedule": {"name": "linear", "T": T}, "loss": {"prior": None}}
    save_checkpoint(path, model=model, step=0, config=config | {"data": {"num_labels": 3}})
    return path


def analytic_posterior(gmm, prior: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(log p(y|x) (N, 3), log p(x|y) (N, 3), labels) of the test points by scipy, in index order."""
    _, means, covariances = model_mixture(gmm)
    points, labels = load_split(gmm, "test")
    log_px_y = np.stack(
        [multivariate_normal(m, c).logpdf(points.astype(np.float64)) for m, c in zip(means, covariances)], 1
    )
    joint = log_px_y + np.log(prior)
    return joint - logsumexp(joint, 1, keepdims=True), log_px_y, labels


def ece_by_loops(probs: np.ndarray, labels: np.ndarray) -> float:
    """The textbook ECE (Guo et al. 2017), 15 bins ((m−1)/15, m/15], one bin at a time."""
    conf, pred = probs.max(1), probs.argmax(1)
    total = 0.0
    for m in range(1, 16):
        inside = (conf > (m - 1) / 15) & (conf <= m / 15)
        if inside.any():
            total += inside.mean() * abs((pred[inside] == labels[inside]).mean() - conf[inside].mean())
    return total


def test_the_posterior_is_the_analytic_bayes_posterior_and_the_figures_recompute(ray_session, gmm, exact, tmp_path):
    import mlflow

    store = new_store(tmp_path / "mlflow.db")
    result = run(
        nest(
            ClassifyConfig,
            checkpoint=str(exact.parent),
            dataset=str(gmm),
            workers=2,
            batch_size=20,  # 6 samples × 3 classes per forward pass: 29 batches over 5 shards
            out=str(tmp_path / "out"),
            tracking_uri=store,
        )
    )
    _, train_labels = load_split(gmm, "train")
    prior = np.bincount(train_labels, minlength=3) / len(train_labels)
    assert np.abs(prior - [0.5, 0.3, 0.2]).max() < 0.08  # the frequencies, not the weights
    log_post, log_px_y, labels = analytic_posterior(gmm, prior)

    table = read_scores(result.scores_uri)
    keys = table.column("key").to_pylist()
    assert sorted(keys) == sorted(manifest_keys(sh.open_dataset(gmm), "test")) and len(set(keys)) == 170
    index = table.column("index").to_numpy()
    got = np.stack(table.column("log_p_y_given_x").to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(got, log_post[index], rtol=0, atol=1e-9)
    np.testing.assert_allclose(
        np.stack(table.column("log_px_given_y").to_numpy(zero_copy_only=False)), log_px_y[index], rtol=0, atol=1e-9
    )
    np.testing.assert_allclose(
        table.column("log_px").to_numpy(), logsumexp(log_px_y + np.log(prior), 1)[index], rtol=0, atol=1e-9
    )
    np.testing.assert_array_equal(table.column("label").to_numpy(), labels[index])
    np.testing.assert_array_equal(table.column("predicted").to_numpy(), log_post[index].argmax(1))
    np.testing.assert_allclose(table.column("log_p_true").to_numpy(), log_post[index, labels[index]], atol=1e-9)

    probs = np.exp(log_post)
    s = result.summary
    assert s["count"] == 170 and s["num_classes"] == 3 and s["prior"] == "train"
    np.testing.assert_allclose(s["prior_probs"], prior, rtol=1e-12)
    assert s["accuracy"] == pytest.approx(accuracy_score(labels, probs.argmax(1)), abs=1e-12)
    assert 0.6 < s["accuracy"] < 0.95 and s["ece"] > 0.05  # overlapping, miscalibrated: the figures are tested
    assert s["nll"] == pytest.approx(log_loss(labels, probs, labels=[0, 1, 2]), rel=1e-9)
    assert s["ece"] == pytest.approx(ece_by_loops(probs, labels), abs=1e-9) and s["ece_bins"] == 15
    assert s["confusion"] == confusion_matrix(labels, probs.argmax(1), labels=[0, 1, 2]).tolist()
    on_disk = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert on_disk["accuracy"] == s["accuracy"] and on_disk["forward_rows"] == 3 * 170
    assert (tmp_path / "out" / "confusion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    client = mlflow.MlflowClient(store)
    mrun = client.get_run(result.run_id)
    m, p = mrun.data.metrics, mrun.data.params
    assert m["eval/classify_accuracy"] == pytest.approx(s["accuracy"])
    assert m["eval/classify_nll"] == pytest.approx(s["nll"]) and m["eval/classify_ece"] == pytest.approx(s["ece"])
    assert p["prior"] == "train" and p["split"] == "test" and p["checkpoint"] == str(exact)
    assert p["dataset"] == sh.open_dataset(gmm).loc.uri and mrun.data.tags["cdm.stage"] == "classify"
    assert {a.path for a in client.list_artifacts(result.run_id)} >= {"summary.json", "confusion.png"}


def test_the_command_line_with_a_uniform_prior_after_a_worker_died(
    ray_session, gmm, exact, tmp_path, capsys, monkeypatch
):
    marker = tmp_path / "killed"
    monkeypatch.setenv("CDM_KILL_WORKER_AFTER", "2")
    monkeypatch.setenv("CDM_FAIL_MARKER", str(marker))
    out = tmp_path / "uniform"
    argv = ["classify", str(exact), str(gmm), "--prior", "uniform", "--workers", "2", "--batch-size", "30"]
    code, text = cli_in_process([*argv, "--out", str(out), "--no-track"], capsys, monkeypatch)
    assert code in (0, None), text
    assert marker.is_file(), "the hook did not kill a worker"
    log_post, _, labels = analytic_posterior(gmm, np.full(3, 1 / 3))
    table = read_scores(out)
    assert table.column("index").to_pylist() == list(range(170))  # every sample exactly once, in order
    np.testing.assert_allclose(
        np.stack(table.column("log_p_y_given_x").to_numpy(zero_copy_only=False)), log_post, rtol=0, atol=1e-9
    )
    accuracy = accuracy_score(labels, log_post.argmax(1))
    assert f"accuracy {accuracy:.4f} (170 samples of test, 3 classes, prior uniform)" in text
    assert json.loads((out / "summary.json").read_text())["prior"] == "uniform"


def test_forward_passes_chunked_across_classes_give_the_same_likelihoods(gmm, exact):
    trained = load_trained_model(exact)
    x = torch.from_numpy(load_split(gmm, "test")[0][:7])
    whole = class_log_likelihoods(trained.model, x, 3, trained.prior, rows=1000)
    for rows in (1, 4, 5):  # chunks that split a class's rows, and one that splits the batch unevenly
        torch.testing.assert_close(class_log_likelihoods(trained.model, x, 3, trained.prior, rows), whole)
    _, means, covariances = model_mixture(gmm)
    exact_px_y = [multivariate_normal(means[y], covariances[y]).logpdf(x.double()) for y in range(3)]
    np.testing.assert_allclose(whole.numpy(), np.stack(exact_px_y, 1), rtol=0, atol=1e-9)


def test_ece_by_hand():
    conf = np.array([1.0, 0.95, 0.9, 0.5, 0.5, 0.05, 0.39])
    correct = np.array([1, 0, 1, 1, 0, 0, 1], bool)
    # bins of width 1/15: {1.0, 0.95} the 15th (14/15, 1], 0.9 the 14th, {0.5, 0.5} the 8th, 0.05 the 1st, 0.39 the 6th
    by_hand = (2 * abs(0.5 - 0.975) + abs(1 - 0.9) + 2 * abs(0.5 - 0.5) + abs(0 - 0.05) + abs(1 - 0.39)) / 7
    assert expected_calibration_error(conf, correct) == pytest.approx(by_hand, abs=1e-12)
    assert math.isnan(expected_calibration_error(np.zeros(0), np.zeros(0, bool)))


def test_a_class_missing_from_the_train_split_needs_the_uniform_prior(tmp_path):
    ds = tmp_path / "few"
    prepare_quick("toy2d", ds, name="gmm", num_train=2, num_test=5)
    opened = sh.open_dataset(ds)
    with pytest.raises(UserError, match=r"never occur in the train split.*--prior uniform"):
        class_prior(opened, 3, "train")
    np.testing.assert_allclose(class_prior(opened, 3, "uniform"), [1 / 3] * 3)
    with pytest.raises(UserError, match=r"--prior 'flat' is not one of train, uniform"):
        run(nest(ClassifyConfig, checkpoint=str(tmp_path), dataset=str(ds), prior="flat", track=False))
