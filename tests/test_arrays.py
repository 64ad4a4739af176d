"""`cdm prepare arrays` and training, NLL and sampling on continuous data, through the real `cdm` command.

Float arrays (N, D) and (N, C, H, W) become npy shards holding the data as given, with the
standardization (per-channel mean/std of the train split) recorded in dataset.json and applied by the
readers. The likelihood checks are exact: a Gaussian mixture's exact CDM logits in the standardized
space, scored by `cdm nll`, must give the closed-form density of the data *as given* (the Jacobian
−Σ log σ undone), and a trained network's figures must equal its one-pass likelihood on the
standardized data, computed here by hand, minus Σ log σ. Samples come back in the data's units.
One local Ray for the module; training runs join it (tiny settings, a few steps).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, cli_in_process, new_store, prepare_quick
from scipy.special import logsumexp
from scipy.stats import multivariate_normal

ray = pytest.importorskip("ray")

from cdm_core.analytic import GaussianMixtureLogits  # noqa: E402
from cdm_core.checkpoint import save_checkpoint  # noqa: E402
from cdm_core.objective import log_likelihood  # noqa: E402
from pipelines.common.checkpoints import load_trained_model  # noqa: E402
from pipelines.data import shards as sh  # noqa: E402
from pipelines.data.normalization import Normalization, of_dataset  # noqa: E402
from pipelines.data.readers import LocalReader, load_split  # noqa: E402
from pipelines.evaluate.nll import read_scores  # noqa: E402
from pipelines.evaluate.sample import generate  # noqa: E402

TINY = str(ROOT / "configs" / "train_tiny.toml")
# A 2-component mixture in 3-D with very different scales per dimension (Σ log σ ≈ 2 nats).
WEIGHTS = [0.4, 0.6]
MEANS = [[1.0, -4.0, 0.2], [3.0, 6.0, -0.3]]
COVS = [np.diag([4.0, 9.0, 0.04]).tolist(), np.diag([1.0, 16.0, 0.09]).tolist()]


def mixture_log_density(x: np.ndarray, weights, means, covs) -> np.ndarray:
    comps = [math.log(w) + multivariate_normal(m, c).logpdf(x) for w, m, c in zip(weights, means, covs)]
    return logsumexp(np.stack(comps, -1), axis=-1)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("arrays")
    rng = np.random.default_rng(0)
    comp = rng.choice(2, size=240, p=WEIGHTS)
    chol = np.linalg.cholesky(np.asarray(COVS))
    x = np.asarray(MEANS)[comp] + np.einsum("nij,nj->ni", chol[comp], rng.standard_normal((240, 3)))
    np.save(d / "vectors.npy", x)  # float64: the shards hold its float32 rounding
    np.save(d / "labels.npy", comp.astype(np.int64))
    images = (rng.standard_normal((72, 2, 8, 8)) * [[[3.0]], [[0.5]]] + [[[10.0]], [[-1.0]]]).astype(np.float32)
    np.savez(d / "images.npz", x=images, other=np.zeros(3))
    return d, x, comp, images


@pytest.fixture(scope="module")
def vectors(files, tmp_path_factory):
    d, *_ = files
    out = tmp_path_factory.mktemp("v") / "ds"
    prepare_quick("arrays", out, path=str(d / "vectors.npy"), labels=str(d / "labels.npy"), samples_per_shard=100)
    return out


@pytest.fixture(scope="module")
def arrays(files, tmp_path_factory):
    d, *_ = files
    out = tmp_path_factory.mktemp("a") / "ds"
    prepare_quick("arrays", out, path=str(d / "images.npz"), key="x", test_fraction=0.25)
    return out


def _norm(ds: Path) -> Normalization:
    return of_dataset(sh.open_dataset(ds).meta)


def test_prepare_arrays_keeps_the_data_and_records_its_statistics(files, tmp_path, capsys, monkeypatch):
    d, x, comp, images = files
    out = tmp_path / "v"
    argv = ["prepare", "arrays", "--path", str(d / "vectors.npy"), "--labels", str(d / "labels.npy")]
    code, text = cli_in_process([*argv, "--out", str(out), "--no-track"], capsys, monkeypatch)
    assert code == 0, text
    assert "normalization: standardize per channel" in text
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["sample"] == {"kind": "vector", "encoding": "npy", "labeled": True, "shape": [3], "dtype": "float32"}
    assert meta["array"] == {"file": "vectors.npy", "key": None, "dtype": "float64", "shape": [240, 3]}
    assert meta["counts"] == {"train": 216, "test": 24}  # --test-fraction 0.1 by default, stratified by label
    # The shards hold the data as given (float32), every sample once, labels with them.
    for split in ("train", "test"):
        data, labels = load_split(out, split)
        rows = [int(s.split(":")[1]) for s in _manifest(out, split)]
        np.testing.assert_array_equal(data, x.astype(np.float32)[rows])
        np.testing.assert_array_equal(labels, comp[rows])
        stats = meta["splits"][split]
        np.testing.assert_allclose(stats["min"], data.min(0), rtol=0)
        np.testing.assert_allclose(stats["max"], data.max(0), rtol=0)
        np.testing.assert_allclose(stats["std"], data.astype(np.float64).std(0), atol=1e-6)
    train, _ = load_split(out, "train")
    norm = meta["normalization"]
    assert norm["kind"] == "standardize" and norm["statistics_of"] == "train split"
    np.testing.assert_allclose(norm["mean"], train.astype(np.float64).mean(0), rtol=1e-12)
    np.testing.assert_allclose(norm["std"], train.astype(np.float64).std(0), rtol=1e-12)
    # The readers feed the model the standardized values.
    reader = LocalReader(out, "test")
    z = reader.inputs(np.arange(len(reader)))
    np.testing.assert_allclose(z, (reader.data - np.array(norm["mean"])) / np.array(norm["std"]), rtol=1e-5, atol=1e-6)

    # The guarantees of prepare hold for this source: a rerun skips, another option never replaces it silently.
    code, text = cli_in_process([*argv, "--out", str(out), "--no-track"], capsys, monkeypatch)
    assert code == 0 and "up to date" in text
    before = (out / "dataset.json").read_bytes()
    code, text = cli_in_process([*argv, "--normalize", "none", "--out", str(out), "--no-track"], capsys, monkeypatch)
    assert code == 2 and "would replace it. Give --force" in text
    assert (out / "dataset.json").read_bytes() == before

    # (N, C, H, W) from an .npz with several arrays, as given: per-channel statistics over (N, H, W).
    out4 = tmp_path / "a"
    argv4 = ["prepare", "arrays", "--path", str(d / "images.npz"), "--key", "x", "--normalize", "none"]
    code, text = cli_in_process([*argv4, "--out", str(out4), "--no-track"], capsys, monkeypatch)
    assert code == 0, text
    meta4 = json.loads((out4 / "dataset.json").read_text())
    assert meta4["sample"]["shape"] == [2, 8, 8] and meta4["normalization"] == {"kind": "identity"}
    data4, labels4 = load_split(out4, "train")
    assert data4.dtype == np.float32 and (labels4 == -1).all()
    np.testing.assert_allclose(meta4["splits"]["train"]["mean"], data4.mean(axis=(0, 2, 3)), atol=1e-5)
    np.testing.assert_allclose(meta4["splits"]["train"]["max"], data4.max(axis=(0, 2, 3)), rtol=0)
    np.testing.assert_array_equal(LocalReader(out4, "train").inputs(np.arange(3)), data4[:3])  # none: as given


def _manifest(ds: Path, split: str) -> list[str]:
    import pyarrow.parquet as pq

    table = pq.read_table(ds / sh.MANIFEST)
    return [s for s, sp in zip(table.column("source_id").to_pylist(), table.column("split").to_pylist()) if sp == split]


def test_nll_of_standardized_data_is_the_density_of_the_data_as_given(
    ray_session, vectors, files, tmp_path, capsys, monkeypatch
):
    """The exact logits of the mixture *in the standardized space* (mean (m − μ)/σ, covariance Σ/σσᵀ)
    scored by `cdm nll` on the standardized data: log p_x(x) = log p_z(z) − Σ log σ must be the
    closed-form density of the original mixture at the stored points."""
    norm = _norm(vectors)
    mu, sigma = np.array(norm.mean), np.array(norm.std)
    means = [((np.array(m) - mu) / sigma).tolist() for m in MEANS]
    covs = [(np.array(c) / np.outer(sigma, sigma)).tolist() for c in COVS]
    model = GaussianMixtureLogits(WEIGHTS, means, covs, "linear", 20)
    config = {
        "model": {"kind": "cdm"},
        "schedule": {"name": "linear", "T": 20},
        "loss": {"prior": None},
        "data": {"num_labels": None, "normalization": norm.to_json()},
    }
    ckpt = tmp_path / "exact" / "checkpoint.pt"
    save_checkpoint(ckpt, model=model, step=0, config=config)
    table = _nll(ckpt, vectors, tmp_path / "nll", capsys, monkeypatch)
    points, _ = load_split(vectors, "test")
    index = table.column("index").to_numpy()
    log_px = table.column("log_px").to_numpy()
    analytic = mixture_log_density(points.astype(np.float64), WEIGHTS, MEANS, COVS)[index]
    log_det = float(np.log(sigma).sum())
    assert abs(log_det) > 1.0  # the Jacobian term is far larger than the tolerance below
    np.testing.assert_allclose(log_px, analytic, rtol=0, atol=2e-4)
    # The continuous convention: nats per sample, bits/dim with no bin offset.
    np.testing.assert_allclose(table.column("bpd").to_numpy(), -log_px / (3 * math.log(2)), rtol=1e-12)
    _check_samples(ckpt, norm, tmp_path / "samples", capsys, monkeypatch)


def _train(data: Path, tmp_path: Path, capsys, monkeypatch, *sets: str) -> Path:
    argv = ["train", TINY, "--set", f"data.uri={data}", "--set", f"run.storage_path={tmp_path / 'runs'}"]
    argv += ["--set", "run.name=r", "--set", f"tracking.tracking_uri={new_store(tmp_path / 'mlflow.db')}"]
    # Local mode (the loop in this process): what is checked is the data's path through training, not the workers.
    for s in (
        "train.steps=3",
        "checkpoint.every=3",
        "validation.every=3",
        "train.batch_size=16",
        "scaling.num_workers=0",
        *sets,
    ):
        argv += ["--set", s]
    code, text = cli_in_process(argv, capsys, monkeypatch)
    assert code == 0, text
    return sorted((tmp_path / "runs" / "r").glob("checkpoint_0*"))[-1] / "checkpoint.pt"


def _nll(ckpt: Path, data: Path, out: Path, capsys, monkeypatch):
    argv = ["nll", str(ckpt), str(data), "--split", "test", "--out", str(out), "--no-track", "--workers", "1"]
    code, text = cli_in_process(argv, capsys, monkeypatch)
    assert code == 0, text
    summary = json.loads((out / "summary.json").read_text())
    assert summary["bpd_convention"] == "continuous" and summary["bpd_offset"] == 0.0
    return read_scores(str(out))


def _check_samples(ckpt: Path, norm: Normalization, out: Path, capsys, monkeypatch) -> None:
    """`cdm sample` writes samples.npy (and the shards) in the data's units: x = μ + σ·z of the model's z."""
    trained = load_trained_model(ckpt)
    argv = ["sample", str(ckpt), "--n", "6", "--sampler", "ddim", "--steps", "4", "--out", str(out)]
    # In this process: sampling reads no data, and the sample stage's pool is test_sample.py's.
    code, text = cli_in_process([*argv, "--no-track", "--workers", "0"], capsys, monkeypatch)
    assert code == 0, text
    drawn = np.load(out / "samples.npy")
    assert drawn.shape == (6, *trained.model.data_shape) and drawn.dtype == np.float32
    np.testing.assert_array_equal(load_split(out, "samples")[0], drawn)  # the shards hold the same values
    z = generate(trained, range(6), sampler="ddim", steps=4, seed=0)["x"]  # the model's own space, in-process
    np.testing.assert_allclose(drawn, norm.undo(z), rtol=1e-5, atol=1e-5)
    assert json.loads((out / "dataset.json").read_text())["normalization"] == norm.to_json()
    assert (out / "grid.png").stat().st_size > 0


def _check_trained(ckpt: Path, data: Path, tmp_path: Path, capsys, monkeypatch, sample: bool = True) -> float:
    """`cdm nll` = the one-pass likelihood on the normalized data, by hand, minus Σ log σ; returns Σ log σ."""
    trained = load_trained_model(ckpt)
    norm = _norm(data)
    assert trained.config["data"]["normalization"] == norm.to_json()  # the checkpoint carries it
    table = _nll(ckpt, data, tmp_path / "nll", capsys, monkeypatch)
    reader = LocalReader(data, "test")
    z = torch.from_numpy(reader.inputs(table.column("index").to_numpy()))
    shape = tuple(z.shape[1:])
    sigma = np.asarray(norm.std if norm.kind == "standardize" else np.ones(shape[0]))
    log_det = (int(np.prod(shape[1:])) if len(shape) == 3 else 1) * float(np.log(sigma).sum())
    assert norm.log_det(shape) == pytest.approx(log_det, rel=1e-12, abs=0)
    with torch.no_grad():
        by_hand = log_likelihood(trained.model, z).double().numpy() - log_det
    log_px = table.column("log_px").to_numpy()
    np.testing.assert_allclose(log_px, by_hand, rtol=1e-5, atol=1e-4)
    dims = int(np.prod(shape))
    np.testing.assert_allclose(table.column("bpd").to_numpy(), -log_px / (dims * math.log(2)), rtol=1e-12)
    if sample:
        _check_samples(ckpt, norm, tmp_path / "samples", capsys, monkeypatch)
    return log_det


def test_standardized_arrays_train_with_the_unet_and_report_in_data_units(
    ray_session, arrays, tmp_path, capsys, monkeypatch
):
    ckpt = _train(arrays, tmp_path, capsys, monkeypatch)  # the tiny U-Net on 2 channels of 8×8
    assert load_trained_model(ckpt).model.data_shape == (2, 8, 8)
    log_det = _check_trained(ckpt, arrays, tmp_path, capsys, monkeypatch)
    assert log_det == pytest.approx(64 * (math.log(3.0) + math.log(0.5)), rel=0.05)  # σ ≈ 3 and 0.5 per channel


def test_cdm_run_on_vectors(ray_session, tmp_path, capsys, monkeypatch):
    """The whole workflow on (D,) vectors (`cdm prepare toy2d`'s, kept as given): prepare, the untrained
    network's NLL, train with the mlp preset (in local mode), sample, NLL; the trained model's figures are its one-pass
    likelihood by hand."""
    workflow = tmp_path / "vectors.toml"
    workflow.write_text(
        f"""
name = "vectors"
[prepare]
source = "toy2d"
name = "gmm8"
num_train = 64
num_test = 16
[train]
extends = "{TINY}"
[train.model]
preset = "mlp"
base_channels = "none"
mlp_hidden = 16
mlp_depth = 2
[train.train]
steps = 3
batch_size = 16
[train.validation]
every = 3
[train.checkpoint]
every = 3
[train.scaling]
num_workers = 0
[sample]
n = 16
steps = 3
batch_size = 16
workers = 0
[nll]
workers = 1
[fid]
enabled = false
"""
    )
    argv = ["run", str(workflow), "--workdir", str(tmp_path / "work")]
    code, text = cli_in_process(argv, capsys, monkeypatch)
    assert code == 0, text
    summary = json.loads(next((tmp_path / "work").glob("outputs/workflows/*/summary.json")).read_text())
    metrics = summary["metrics"]
    assert math.isfinite(metrics["eval/nll_bpd"]) and math.isfinite(metrics["eval/nll_bpd_untrained"])
    samples = np.load(next((tmp_path / "work").glob("outputs/stages/sample-*/samples.npy")))
    assert samples.shape == (16, 2) and np.isfinite(samples).all()
    ckpt, data = Path(summary["checkpoint"]), Path(summary["dataset"])
    trained = load_trained_model(ckpt)
    assert trained.step == 3 and trained.model.spec()["class"] == "MLPClassifier"
    assert trained.config["data"]["normalization"] == {"kind": "identity"}  # toy2d: the points as given
    # (sampling (D,) vectors is checked on the exact mixture above, and on arrays below: the same code)
    assert _check_trained(ckpt, data, tmp_path, capsys, monkeypatch, sample=False) == 0.0
