"""The NLL and OOD stages on a real local Ray and a real MLflow store.

The exactness check: a 2-D Gaussian mixture prepared with `cdm prepare toy2d`,
scored by a checkpoint of its exact CDM logits (`cdm_core.analytic`), must give
the closed-form log-density of every point — through shards, Ray Data, the
actor pool, Parquet — with every manifest key scored exactly once.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import prepare_quick

ray = pytest.importorskip("ray")

from cdm_core.analytic import GaussianMixtureLogits  # noqa: E402
from cdm_core.checkpoint import save_checkpoint  # noqa: E402
from cdm_core.networks import UNetClassifier, UNetDenoiser, unet_preset  # noqa: E402
from cdm_core.objective import LOG2_BIN_OFFSET, OFFICIAL_CODE_OFFSET  # noqa: E402
from pipelines.common.config import nest  # noqa: E402
from pipelines.common.errors import UserError  # noqa: E402
from pipelines.data import shards as sh  # noqa: E402
from pipelines.data.readers import load_split  # noqa: E402
from pipelines.data.sources import toy_log_density  # noqa: E402
from pipelines.evaluate.config import NllConfig, OodConfig  # noqa: E402
from pipelines.evaluate.nll import check_complete, manifest_keys, read_scores, run  # noqa: E402
from pipelines.evaluate.ood import auroc  # noqa: E402
from pipelines.evaluate.ood import run as run_ood  # noqa: E402

T = 50


def config_for(kind: str, schedule: str = "linear", t: int = T, num_labels=None) -> dict:
    return {
        "model": {"kind": kind},
        "schedule": {"name": schedule, "T": t},
        "loss": {"prior": None},
        "data": {"num_labels": num_labels},
    }


@pytest.fixture(scope="module")
def gmm(tmp_path_factory):
    """The toy mixture: 300 test points in uneven shards of 70 (70, 70, 70, 70, 20)."""
    out = tmp_path_factory.mktemp("gmm") / "ds"
    prepare_quick("toy2d", out, name="gmm", num_train=20, num_test=300, samples_per_shard=70)
    return out


@pytest.fixture(scope="module")
def exact_checkpoint(gmm, tmp_path_factory):
    dist = sh.open_dataset(gmm).meta["toy"]["distribution"]
    model = GaussianMixtureLogits(dist["weights"], dist["means"], dist["covariances"], "linear", T)
    path = tmp_path_factory.mktemp("exact") / "checkpoint.pt"
    save_checkpoint(path, model=model, step=0, config=config_for("cdm"), extra={"mlflow_run_id": "train-run-123"})
    return path.parent


@pytest.fixture(scope="module")
def digits_small(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits") / "ds"
    prepare_quick("digits", out, samples_per_shard=60, test_fraction=0.05)
    return out


@pytest.fixture(scope="module")
def unet_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = UNetClassifier(unet_preset("tiny", 1, 8), 10)
    path = tmp_path_factory.mktemp("unet") / "checkpoint.pt"
    save_checkpoint(path, model=model, step=3, config=config_for("cdm", t=10))
    return path


def _store(tmp_path):
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def test_exact_logits_reproduce_the_analytic_log_density_with_1_and_2_workers(
    ray_session, gmm, exact_checkpoint, tmp_path
):
    ds = sh.open_dataset(gmm)
    dist = ds.meta["toy"]["distribution"]
    points, _ = load_split(gmm, "test")
    analytic = toy_log_density(dist, points)  # float64 closed form at the stored float32 points
    expected_keys = manifest_keys(ds, "test")
    assert len(expected_keys) == 300
    for workers in (1, 2):
        result = run(
            nest(
                NllConfig,
                checkpoint=str(exact_checkpoint),
                dataset=str(gmm),
                split="test",
                workers=workers,
                batch_size=32,
                out=str(tmp_path / f"w{workers}"),
                track=False,
            )
        )
        table = read_scores(result.scores_uri)
        keys = table.column("key").to_pylist()
        assert sorted(keys) == sorted(expected_keys) and len(set(keys)) == len(keys)  # each manifest key exactly once
        index = table.column("index").to_numpy()
        log_px = table.column("log_px").to_numpy()
        np.testing.assert_allclose(log_px, analytic[index], rtol=0, atol=1e-9)
        # Vector data: bits/dim without the 8-bit bin offset.
        np.testing.assert_allclose(table.column("bpd").to_numpy(), -log_px / (2 * math.log(2)), rtol=1e-12)
        assert result.summary["bpd_convention"] == "continuous" and result.count == 300
        # The dataset-wide figure is the analytic mean log-density (recorded by `cdm prepare` from float64 points).
        assert result.summary["mean_log_px_nats"] == pytest.approx(ds.meta["toy"]["test_mean_log_density"], abs=1e-5)
        bpd = table.column("bpd").to_numpy()
        assert result.nll_bpd == pytest.approx(bpd.mean(), rel=1e-12)
        assert result.ci95 == pytest.approx(1.96 * bpd.std(ddof=1) / math.sqrt(300), rel=1e-9)


def test_completeness_check_names_missing_extra_and_repeated_keys():
    expected = ["test-00000000", "test-00000001", "test-00000002"]
    check_complete(list(reversed(expected)), expected, "x")  # order does not matter
    with pytest.raises(RuntimeError, match=r"1 missing .*test-00000002"):
        check_complete(expected[:2], expected, "x")
    with pytest.raises(RuntimeError, match=r"scored more than once .*test-00000001"):
        check_complete(expected + ["test-00000001"], expected, "x")
    with pytest.raises(RuntimeError, match=r"not in the manifest .*test-00000009"):
        check_complete(expected + ["test-00000009"], expected, "x")


def test_image_conventions_dequantization_and_mlflow(ray_session, digits_small, unet_checkpoint, tmp_path):
    import mlflow

    common = dict(checkpoint=str(unet_checkpoint), dataset=str(digits_small), split="test", batch_size=40)
    plain = run(nest(NllConfig, **common, workers=1, out=str(tmp_path / "plain"), track=False))
    tracked = run(
        nest(NllConfig, **common, dequantize=True, workers=2, out=str(tmp_path / "t"), tracking_uri=_store(tmp_path))
    )
    official = run(
        nest(
            NllConfig,
            **common,
            dequantize=True,
            bpd_convention="official",
            workers=1,
            out=str(tmp_path / "off"),
            track=False,
        )
    )
    reseeded = run(
        nest(NllConfig, **common, dequantize=True, seed=1, workers=2, out=str(tmp_path / "seed1"), track=False)
    )
    p, t, o, r = (read_scores(x.scores_uri) for x in (plain, tracked, official, reseeded))
    assert plain.count == tracked.count == official.count == sh.open_dataset(digits_small).count("test")
    # Dequantization noise is per sample (seed, index): the same with 1 or 2 workers, new with another seed.
    np.testing.assert_allclose(o.column("log_px").to_numpy(), t.column("log_px").to_numpy(), rtol=1e-6, atol=1e-6)
    assert np.abs(r.column("log_px").to_numpy() - t.column("log_px").to_numpy()).max() > 1e-3
    assert np.abs(p.column("log_px").to_numpy() - t.column("log_px").to_numpy()).max() > 1e-3
    # The official code's convention differs from the standard one by a constant 7 − log2(127.5) bits/dim.
    shift = o.column("bpd").to_numpy() - t.column("bpd").to_numpy()
    np.testing.assert_allclose(shift, OFFICIAL_CODE_OFFSET - LOG2_BIN_OFFSET, atol=1e-6)

    got = mlflow.tracking.MlflowClient(_store(tmp_path)).get_run(tracked.run_id)
    assert got.info.status == "FINISHED"
    assert got.data.metrics["eval/nll_bpd"] == pytest.approx(tracked.nll_bpd)
    assert got.data.metrics["eval/nll_bpd_ci95"] == pytest.approx(tracked.ci95)
    assert got.data.params["bpd_convention"] == "standard" and got.data.params["dequantize"] == "True"
    assert float(got.data.params["bpd_offset"]) == pytest.approx(LOG2_BIN_OFFSET)
    assert got.data.tags["cdm.stage"] == "nll"


def test_refuses_a_ddm_a_wrong_shape_and_bad_conventions(
    ray_session, gmm, digits_small, unet_checkpoint, exact_checkpoint, tmp_path
):
    ddm = tmp_path / "ddm" / "checkpoint.pt"
    save_checkpoint(ddm, model=UNetDenoiser(unet_preset("tiny", 1, 8), 10), step=0, config=config_for("ddm", t=10))
    with pytest.raises(UserError, match="needs a CDM"):
        run(nest(NllConfig, checkpoint=str(ddm), dataset=str(digits_small), track=False, out=str(tmp_path / "o")))
    with pytest.raises(UserError, match="the model takes"):
        run(nest(NllConfig, checkpoint=str(unet_checkpoint), dataset=str(gmm), track=False, out=str(tmp_path / "o")))
    with pytest.raises(UserError, match="vector data is continuous"):
        run(nest(NllConfig, checkpoint=str(exact_checkpoint), dataset=str(gmm), bpd_convention="official", track=False))
    with pytest.raises(UserError, match="--dequantize applies to 8-bit images"):
        run(nest(NllConfig, checkpoint=str(exact_checkpoint), dataset=str(gmm), dequantize=True, track=False))
    with pytest.raises(UserError, match="room for 3 workers"):  # 4 CPUs: one stays free for the read tasks
        run(nest(NllConfig, checkpoint=str(exact_checkpoint), dataset=str(gmm), workers=4, track=False))
    with pytest.raises(UserError, match="no checkpoint"):
        run(nest(NllConfig, checkpoint=str(tmp_path / "nothing"), dataset=str(gmm), track=False))


def test_auroc_matches_pairwise_definition():
    rng = np.random.default_rng(0)
    a, b = rng.normal(0, 1, 50), rng.normal(0.7, 1, 40)
    b[:5] = a[:5]  # ties count half
    pairwise = np.mean([(y > x) + 0.5 * (y == x) for x in a for y in b])
    assert auroc(a, b) == pytest.approx(pairwise, abs=1e-12)


def test_ood_auroc_is_that_of_the_exact_density(ray_session, gmm, exact_checkpoint, tmp_path):
    import mlflow

    other = tmp_path / "gmm25"
    prepare_quick("toy2d", other, name="gmm25", num_train=1, num_test=200, samples_per_shard=100)

    result = run_ood(
        nest(
            OodConfig,
            checkpoint=str(exact_checkpoint),
            in_dataset=str(gmm),
            out_dataset=str(other),
            workers=2,
            batch_size=64,
            out=str(tmp_path / "ood"),
            tracking_uri=_store(tmp_path),
        )
    )
    # The AUROC of the exact density, computed here from the closed form, is what the stage must report.
    dist = sh.open_dataset(gmm).meta["toy"]["distribution"]
    exact = auroc(
        -toy_log_density(dist, load_split(gmm, "test")[0]), -toy_log_density(dist, load_split(other, "test")[0])
    )
    assert result.auroc == pytest.approx(exact, abs=1e-12) and result.auroc > 0.8
    assert result.summary["ood"]["nll_bpd"] > result.summary["in"]["nll_bpd"]
    assert (tmp_path / "ood" / "ood_histogram.png").stat().st_size > 1000
    assert read_scores(str(tmp_path / "ood" / "ood")).num_rows == 200
    got = mlflow.tracking.MlflowClient(_store(tmp_path)).get_run(result.run_id)
    assert got.data.metrics["eval/ood_auroc"] == pytest.approx(result.auroc)
    assert got.data.tags["cdm.train_run_id"] == "train-run-123"  # linked to the run that trained the checkpoint
    assert "ood_histogram.png" in [
        a.path for a in mlflow.tracking.MlflowClient(_store(tmp_path)).list_artifacts(result.run_id)
    ]
