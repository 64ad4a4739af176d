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
from conftest import cli_in_process, new_store, prepare_quick

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
from pipelines.evaluate.nll import (  # noqa: E402
    check_complete,
    consistency_reading,
    manifest_keys,
    read_scores,
    resolve_methods,
    run,
)
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
    """The test's MLflow store: made on the first call, the same URI after."""
    path = tmp_path / "mlflow.db"
    return f"sqlite:///{path}" if path.exists() else new_store(path)


def test_exact_logits_reproduce_the_analytic_log_density_with_0_1_and_2_workers(
    ray_session, gmm, exact_checkpoint, tmp_path
):
    """0 workers: one scorer in this process, with no Ray joined (the address given leads nowhere), and this
    process's torch threads as they were afterwards."""
    ds = sh.open_dataset(gmm)
    dist = ds.meta["toy"]["distribution"]
    points, _ = load_split(gmm, "test")
    analytic = toy_log_density(dist, points)  # float64 closed form at the stored float32 points
    expected_keys = manifest_keys(ds, "test")
    assert len(expected_keys) == 300
    threads = max(2, torch.get_num_threads())
    torch.set_num_threads(threads)
    for workers in (0, 1, 2):
        result = run(
            nest(
                NllConfig,
                checkpoint=str(exact_checkpoint),
                dataset=str(gmm),
                split="test",
                workers=workers,
                **({"address": "127.0.0.1:1"} if workers == 0 else {}),
                batch_size=32,
                out=str(tmp_path / f"w{workers}"),
                track=False,
            )
        )
        assert_the_analytic_density(result, ds, analytic, expected_keys)
        assert torch.get_num_threads() == threads


def assert_the_analytic_density(result, ds, analytic, expected_keys) -> None:
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
    # The pools' share of this test is official (1 worker) against tracked (2); the others run in this process.
    plain = run(nest(NllConfig, **common, workers=0, out=str(tmp_path / "plain"), track=False))
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
        nest(NllConfig, **common, dequantize=True, seed=1, workers=0, out=str(tmp_path / "seed1"), track=False)
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
    with pytest.raises(UserError, match="needs a CDM.*use --method ode"):
        run(
            nest(
                NllConfig,
                checkpoint=str(ddm),
                dataset=str(digits_small),
                method="one-pass",
                track=False,
                out=str(tmp_path / "o"),
            )
        )
    with pytest.raises(UserError, match="--method elbo: the ELBO's discretized decoder is for 8-bit images"):
        run(nest(NllConfig, checkpoint=str(exact_checkpoint), dataset=str(gmm), method="elbo", track=False))
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
            workers=0,  # in this process: OOD scores through the NLL stage's `score`, whose pool is tested above
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


# --------------------------------------------------------------------------- --method one-pass|elbo|ode|all


def test_methods_resolve_per_model_and_data_kind():
    def names(kind, data, method=None):
        return resolve_methods(NllConfig(checkpoint="c", method=method), kind, data).names

    assert names("cdm", "image") == ("one-pass",) and names("ddm", "image") == ("ode",)
    assert names("cdm", "image", "all") == ("one-pass", "elbo", "ode") and names("ddm", "image", "all") == (
        "elbo",
        "ode",
    )
    assert names("cdm", "vector", "all") == ("one-pass", "ode")  # the ELBO's decoder is for 8-bit data
    assert names("cdm", "image", "ode,one-pass") == ("one-pass", "ode")
    assert resolve_methods(NllConfig(checkpoint="c"), "cdm", "image").trace == "hutchinson"
    assert resolve_methods(NllConfig(checkpoint="c"), "cdm", "vector").trace == "exact"
    with pytest.raises(UserError, match="--method 'exact' is not one of"):
        names("cdm", "image", "exact")
    with pytest.raises(UserError, match="--trace 'hutch' is not one of"):
        resolve_methods(NllConfig(checkpoint="c", trace="hutch"), "cdm", "image")


@pytest.fixture(scope="module")
def gmm_small(tmp_path_factory):
    out = tmp_path_factory.mktemp("gmm_small") / "ds"
    prepare_quick("toy2d", out, name="gmm", num_train=4, num_test=24, samples_per_shard=10)
    return out


def test_method_all_on_the_exact_mixture_cdm_gives_its_density_twice(
    ray_session, gmm_small, tmp_path, capsys, monkeypatch
):
    """The exact CDM of the mixture (`ot`, T = 100: class T is near N(0, I), so the ODE's ε̂ between T and T+1
    is accurate): the one-pass likelihood is the closed form, the ODE of the same CDM reproduces it, through the
    real `cdm nll --method all`, with each method's NFE and seconds in Parquet, summary.json and MLflow."""
    import json

    import mlflow

    dist = sh.open_dataset(gmm_small).meta["toy"]["distribution"]
    model = GaussianMixtureLogits(dist["weights"], dist["means"], dist["covariances"], "ot", 100)
    ckpt = tmp_path / "exact" / "checkpoint.pt"
    save_checkpoint(ckpt, model=model, step=0, config=config_for("cdm", schedule="ot", t=100))
    out, store = tmp_path / "all", _store(tmp_path)
    argv = ["nll", str(ckpt), str(gmm_small), "--method", "all", "--ode-rtol", "1e-4", "--ode-atol", "1e-4"]
    code, text = cli_in_process(
        [*argv, "--workers", "2", "--batch-size", "8", "--out", str(out), "--tracking-uri", store], capsys, monkeypatch
    )
    assert code == 0, text
    assert "NLL one-pass" in text and "NLL ode" in text and "elbo" not in text  # vectors: no ELBO
    table = read_scores(str(out))
    keys = table.column("key").to_pylist()
    assert sorted(keys) == sorted(manifest_keys(sh.open_dataset(gmm_small), "test")) and len(set(keys)) == 24
    points, _ = load_split(gmm_small, "test")
    analytic = toy_log_density(dist, points)[table.column("index").to_numpy()]
    np.testing.assert_allclose(table.column("log_px").to_numpy(), analytic, rtol=0, atol=1e-9)
    ode = table.column("log_px_ode").to_numpy()
    assert np.abs(ode - analytic).max() <= 2e-3 * np.abs(analytic).max()
    assert 0 < np.abs(ode - analytic).max()  # a different computation, not a copy of the one-pass column
    nfe = table.column("nfe_ode").to_numpy()
    assert (nfe >= 10).all()
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["methods"]) == ["one-pass", "ode"] and summary["method"] == "one-pass"
    m_ode = summary["methods"]["ode"]
    assert m_ode["trace"] == "exact" and m_ode["convention"] == "continuous" and m_ode["nfe_per_sample"] == nfe.mean()
    assert m_ode["seconds"] > 0 and summary["methods"]["one-pass"]["nfe_per_sample"] == 1
    assert abs(summary["consistency"]["ode_minus_one_pass_bpd"]["mean"]) < 1e-3
    # ℓ₀ − ℓ₁ per point; continuous data has no bin, so neither its 8-bit scale nor the consistency ELBO
    with torch.no_grad():
        logits = model(torch.from_numpy(points[table.column("index").to_numpy()]))
    np.testing.assert_allclose(table.column("link01").to_numpy(), (logits[:, 0] - logits[:, 1]).numpy(), atol=1e-9)
    assert summary["consistency"]["link01_nats"] == pytest.approx(float((logits[:, 0] - logits[:, 1]).mean()))
    assert not {"link01_expected_nats", "gap_bpd"} & set(summary["consistency"])
    assert "bpd_elbo_subset" not in table.column_names
    assert (out / "nll_methods.png").stat().st_size > 1000
    client = mlflow.tracking.MlflowClient(store)
    run_id = client.search_runs([client.get_experiment_by_name("cdm").experiment_id])[0].info.run_id
    got = client.get_run(run_id).data
    assert got.metrics["eval/nll_bpd"] == pytest.approx(summary["methods"]["one-pass"]["nll_bpd"])
    assert got.metrics["eval/nll_bpd_ode"] == pytest.approx(m_ode["nll_bpd"])
    assert got.metrics["eval/nfe_per_sample_one_pass"] == 1.0
    assert got.metrics["eval/nfe_per_sample_ode"] == pytest.approx(nfe.mean())
    assert got.metrics["eval/nll_seconds_ode"] > 0 and "eval/nll_bpd_elbo" not in got.metrics
    assert got.params["method"] == "one-pass,ode" and got.params["ode_trace"] == "exact"
    assert {"nll_methods.png", "summary.json"} <= {a.path for a in client.list_artifacts(run_id)}


@pytest.fixture(scope="module")
def digits_tiny(tmp_path_factory):
    """30 test images in shards of 12 (12, 12, 6)."""
    out = tmp_path_factory.mktemp("digits_tiny") / "ds"
    prepare_quick("digits", out, samples_per_shard=12, test_fraction=30 / 1797)
    return out


def test_consistency_of_a_cdm_on_8bit_images(digits_tiny, unet_checkpoint, tmp_path, capsys, monkeypatch):
    """`cdm nll --workers 0` (no Ray) on 8-bit digits: ℓ₀ − ℓ₁ per image and the ELBO of the first N images on the
    log-SNR chain (here all 10 classes of T = 10, so it is `--method elbo`'s own figure for those images, from the
    same noise streams) beside the one-pass figure; the gap on one footing in Parquet, summary.json, MLflow and
    the printed reading, and the same gap whatever the one-pass figure's convention."""
    import json

    import mlflow

    out, store = tmp_path / "c", _store(tmp_path)
    argv = ["nll", str(unet_checkpoint), str(digits_tiny), "--method", "one-pass,elbo", "--workers", "0"]
    code, text = cli_in_process(
        [*argv, "--consistency-samples", "7", "--batch-size", "8", "--out", str(out), "--tracking-uri", store],
        capsys,
        monkeypatch,
    )
    assert code == 0, text
    table = read_scores(str(out))
    index, subset = table.column("index").to_numpy(), table.column("bpd_elbo_subset").to_numpy()
    first = index < 7
    assert np.isfinite(subset[first]).all() and np.isnan(subset[~first]).all() and first.sum() == 7
    np.testing.assert_allclose(subset[first], table.column("bpd_elbo").to_numpy()[first], rtol=1e-9)
    assert np.isfinite(table.column("link01").to_numpy()).all()
    c = json.loads((out / "summary.json").read_text())["consistency"]
    one_pass = table.column("bpd").to_numpy()[first].mean()
    assert (c["samples"], c["elbo_classes"]) == (7, 10)
    assert c["nll_bpd"] == pytest.approx(one_pass) and c["nll_bpd_elbo"] == pytest.approx(subset[first].mean())
    assert c["gap_bpd"] == pytest.approx(one_pass - subset[first].mean())
    s1 = math.sqrt(1 - (1 - 1e-4))  # linear, T = 10: β₁ = 1e-4
    assert c["link01_expected_nats"] == pytest.approx(64 * math.log(math.sqrt(2 * math.pi) * s1 * 127.5))
    assert c["link01_nats"] == pytest.approx(table.column("link01").to_numpy().mean())
    assert c["reading"] in text and "bits/dim" in c["reading"] and "ℓ₀−ℓ₁" in c["reading"]
    got = mlflow.tracking.MlflowClient(store).get_run(_only_run(store))
    for key, metric in (
        ("gap_bpd", "consistency_gap_bpd"),
        ("link01_nats", "link01_nats"),
        ("samples", "consistency_samples"),
    ):
        assert got.data.metrics[f"eval/{metric}"] == pytest.approx(c[key])
    assert got.data.metrics["eval/link01_expected_nats"] == pytest.approx(c["link01_expected_nats"])
    assert got.data.params["consistency_classes"] == "10"
    assert got.data.metrics["eval/consistency_seconds"] == pytest.approx(c["seconds"]) and c["seconds"] > 0
    assert "seconds_consistency" in table.column_names  # timed apart from the one-pass figure's seconds

    official = run(
        nest(
            NllConfig,
            checkpoint=str(unet_checkpoint),
            dataset=str(digits_tiny),
            bpd_convention="official",
            consistency_samples=7,
            workers=0,
            out=str(tmp_path / "official"),
            track=False,
        )
    ).summary
    shift = OFFICIAL_CODE_OFFSET - LOG2_BIN_OFFSET
    assert official["consistency"]["nll_bpd"] == pytest.approx(c["nll_bpd"] + shift, abs=1e-9)
    assert official["consistency"]["gap_bpd"] == pytest.approx(c["gap_bpd"], abs=1e-9)


def test_consistency_reading_says_what_the_figures_mean():
    above = {"gap_bpd": 1.6, "samples": 64, "elbo_classes": 20, "link01_nats": 0.3, "link01_expected_nats": 74.4}
    reading = consistency_reading(above)
    assert "1.60 bits/dim above the model's own ELBO (20-class ELBO, 64 samples)" in reading
    assert "not the model's density" in reading and "≈ 0 against a scale of 74.4" in reading
    assert "density at class 1" in reading
    below = consistency_reading(above | {"gap_bpd": -1.4, "link01_nats": 60.0})
    assert "1.40 bits/dim below" in below and "≈ 0" not in below and "60.00 nats against a scale of 74.4" in below
    assert consistency_reading({"link01_nats": -2.0}) == "consistency: ℓ₀−ℓ₁ = -2.00 nats"  # continuous data


def _only_run(store: str) -> str:
    import mlflow

    client = mlflow.tracking.MlflowClient(store)
    (found,) = client.search_runs([client.get_experiment_by_name("cdm").experiment_id])
    return found.info.run_id


def test_elbo_and_ode_of_a_ddm_score_every_sample_once_whatever_the_batching(
    ray_session, digits_tiny, unet_checkpoint, tmp_path
):
    """A DDM (no one-pass likelihood): --method all is the ELBO and the ODE. The ELBO's noise and the ODE's
    probes are per sample (seed, index): 1 worker × 30 and 2 workers × 7 give the same ELBO to float precision
    and the same ODE figure up to the solver's tolerance; another seed moves them; MLflow holds their metrics."""
    import mlflow

    ddm = tmp_path / "ddm" / "checkpoint.pt"
    torch.manual_seed(0)
    net = UNetDenoiser(unet_preset("tiny", 1, 8), 10)
    with torch.no_grad():  # off its zero-initialised output: an ε̂ that depends on x, so the probes matter
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    save_checkpoint(ddm, model=net, step=0, config=config_for("ddm", t=10))
    tol = 1e-3
    common = dict(checkpoint=str(ddm), dataset=str(digits_tiny), method="all", ode_rtol=tol, ode_atol=tol)
    store = _store(tmp_path)
    one = run(nest(NllConfig, **common, workers=1, batch_size=30, out=str(tmp_path / "a"), tracking_uri=store))
    two = run(nest(NllConfig, **common, workers=2, batch_size=7, out=str(tmp_path / "b"), track=False))
    other = run(
        nest(NllConfig, **common, seed=1, elbo_stride=3, workers=0, batch_size=30, out=str(tmp_path / "c"), track=False)
    )
    a, b, c = (read_scores(r.scores_uri) for r in (one, two, other))
    expected = sorted(manifest_keys(sh.open_dataset(digits_tiny), "test"))
    assert len(expected) == 30
    for t in (a, b, c):  # exactly once, for both methods (one table holds both)
        assert sorted(t.column("key").to_pylist()) == expected and t.num_rows == 30
        assert "bpd" not in t.column_names and {"bpd_elbo", "bpd_ode", "nfe_elbo", "nfe_ode"} <= set(t.column_names)
    np.testing.assert_allclose(a.column("bpd_elbo").to_numpy(), b.column("bpd_elbo").to_numpy(), rtol=1e-6)
    # The adaptive steps are shared by a batch (the hardest sample sets them): the ODE's figure moves with the
    # batching, within a few times the solver's tolerance (measured: 1.7e-3 relative at rtol = atol = 1e-3 with
    # one channel per GroupNorm group, 5.8e-3 for one of 30 samples since the DDM's first level sees t; at 1e-2
    # the figures move by 4%: loose tolerances are for smoke tests only).
    np.testing.assert_allclose(a.column("bpd_ode").to_numpy(), b.column("bpd_ode").to_numpy(), rtol=10 * tol)
    assert np.abs(a.column("bpd_ode").to_numpy() - c.column("bpd_ode").to_numpy()).max() > 1e-4  # other probes
    assert (a.column("nfe_elbo").to_numpy() == 10).all()  # T = 10 classes, stride 1
    assert (c.column("nfe_elbo").to_numpy() == 4).all()  # stride 3: classes 1, 4, 7, 10
    assert one.summary["method"] == "ode" and one.summary["methods"]["elbo"]["convention"] == "discrete"
    got = mlflow.tracking.MlflowClient(store).get_run(one.run_id).data
    assert "eval/nll_bpd" not in got.metrics  # the one-pass figure's name is not reused for another method
    assert got.metrics["eval/nll_bpd_elbo"] == pytest.approx(one.summary["methods"]["elbo"]["nll_bpd"])
    assert got.metrics["eval/nll_bpd_ode"] == pytest.approx(one.summary["methods"]["ode"]["nll_bpd"])
    assert got.metrics["eval/nfe_per_sample_elbo"] == 10.0
    assert got.metrics["eval/nfe_per_sample_ode"] == pytest.approx(a.column("nfe_ode").to_numpy().mean())
    assert got.params["elbo_convention"] == "discrete" and got.params["ode_trace"] == "hutchinson"
    # A CDM on images: all three, the ELBO through Theorem 3.1's ε̂, with the per-sample comparison plotted.
    cdm = run(
        nest(
            NllConfig, **common | {"checkpoint": str(unet_checkpoint)}, workers=0, out=str(tmp_path / "e"), track=False
        )
    )
    assert list(cdm.summary["methods"]) == ["one-pass", "elbo", "ode"] and cdm.plot
    t = read_scores(cdm.scores_uri)
    gap = t.column("bpd_elbo").to_numpy() - t.column("bpd").to_numpy()  # standard convention: the same footing
    assert cdm.summary["consistency"]["elbo_minus_one_pass_bpd"]["mean"] == pytest.approx(gap.mean())
    assert cdm.summary["consistency"]["elbo_minus_one_pass_bpd"]["fraction_one_pass_le_elbo"] == (gap >= 0).mean()
