"""The sample stage on a real local Ray and a real MLflow store.

Reproducibility per seed across worker counts is checked bit for bit; the
exact mixture logits (`cdm_core.analytic`) check that the stage's samples
follow the data distribution, so the test can fail for a wrong sampler wiring,
not only for a crash.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import new_store

ray = pytest.importorskip("ray")

from cdm_core.analytic import GaussianMixtureLogits  # noqa: E402
from cdm_core.checkpoint import save_checkpoint  # noqa: E402
from cdm_core.mixture import toy_mixture  # noqa: E402
from cdm_core.networks import UNetClassifier, UNetDenoiser, unet_preset  # noqa: E402
from pipelines.common.config import nest  # noqa: E402
from pipelines.common.errors import UserError  # noqa: E402
from pipelines.data import shards as sh  # noqa: E402
from pipelines.data.readers import load_split  # noqa: E402
from pipelines.evaluate.config import SampleConfig  # noqa: E402
from pipelines.evaluate.sample import generate, run  # noqa: E402


def config_for(kind: str, t: int, num_labels=None, schedule: str = "linear") -> dict:
    return {
        "model": {"kind": kind},
        "schedule": {"name": schedule, "T": t},
        "loss": {"prior": None},
        "data": {"num_labels": num_labels},
    }


@pytest.fixture(scope="module")
def unet(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("unet") / "checkpoint.pt"
    save_checkpoint(
        path,
        model=UNetClassifier(unet_preset("tiny", 1, 8), 20),
        step=7,
        config=config_for("cdm", 20),
        extra={"mlflow_run_id": "train-run-abc"},
    )
    return path.parent


@pytest.fixture(scope="module")
def conditional_unet(tmp_path_factory):
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("cunet") / "checkpoint.pt"
    model = UNetClassifier(unet_preset("tiny", 3, 8, num_labels=3), 20)
    with torch.no_grad():  # a fresh U-Net's zero-initialised residual convs would ignore the label entirely
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    save_checkpoint(path, model=model, step=1, config=config_for("cdm", 20, num_labels=3))
    return path


def _sample(ckpt, out, **kw):
    kw.setdefault("track", False)
    return run(nest(SampleConfig, checkpoint=str(ckpt), out=str(out), **kw))


def direct(ckpt, indices, **settings) -> np.ndarray:
    """What a worker computes for these sample indices, here in the test process with one thread (as workers use)."""
    from pipelines.common.checkpoints import load_trained_model
    from pipelines.data.readers import from_model_input

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return from_model_input(generate(load_trained_model(ckpt), indices, **settings)["x"])
    finally:
        torch.set_num_threads(threads)


def test_samples_per_seed_do_not_depend_on_worker_count(ray_session, unet, tmp_path):
    common = dict(n=10, batch_size=4, steps=4, sampler="ddpm", seed=3)
    one = _sample(unet, tmp_path / "w1", workers=1, **common)
    two = _sample(unet, tmp_path / "w2", workers=2, **common)
    a, _ = load_split(one.uri, "samples")
    b, _ = load_split(two.uri, "samples")
    assert a.shape == (10, 8, 8, 1) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert len({a[i].tobytes() for i in range(10)}) == 10  # every sample its own stream
    # Sample i is a function of (seed, i): the batch [4, 8) computed on its own is the stage's samples 4..7 ...
    settings = dict(sampler="ddpm", steps=4, seed=3)
    assert np.array_equal(direct(unet, range(4, 8), **settings), a[4:8])
    # ... and another seed gives other samples.
    assert not np.array_equal(direct(unet, range(4, 8), **{**settings, "seed": 4}), a[4:8])
    # The output is a dataset like any prepared one, with a grid beside it.
    report = sh.verify(one.uri)
    assert report.ok and report.counts == {"samples": 10} and report.decoded == 10
    assert Path(one.grid).is_file() and Path(one.grid).stat().st_size > 100


def test_in_this_process_the_samples_are_the_workers(unet, tmp_path):
    """--workers 0: one SampleWorker in this process (no Ray is joined: the address given leads nowhere) draws
    what a pool's worker draws for each index; this process's torch threads are as they were."""
    threads = max(2, torch.get_num_threads())
    torch.set_num_threads(threads)
    here = _sample(
        unet, tmp_path / "w0", workers=0, address="127.0.0.1:1", n=10, batch_size=4, steps=4, sampler="ddpm", seed=3
    )
    a, _ = load_split(here.uri, "samples")
    settings = dict(sampler="ddpm", steps=4, seed=3)
    for batch in (range(0, 4), range(4, 8), range(8, 10)):
        assert np.array_equal(direct(unet, batch, **settings), a[batch.start : batch.stop])
    assert torch.get_num_threads() == threads
    assert sh.verify(here.uri).ok and Path(here.grid).is_file()


def test_exact_mixture_samples_follow_the_mixture(ray_session, tmp_path):
    mixture = toy_mixture(2)
    model = GaussianMixtureLogits(
        mixture.weights.tolist(), mixture.means.tolist(), mixture.covs.tolist(), "cosine", 100
    )
    ckpt = tmp_path / "exact" / "checkpoint.pt"
    save_checkpoint(ckpt, model=model, step=0, config=config_for("cdm", 100, schedule="cosine"))
    result = _sample(ckpt, tmp_path / "out", n=600, batch_size=150, steps=40, sampler="ddim", workers=2)
    x, labels = load_split(result.uri, "samples")
    assert x.shape == (600, 2) and x.dtype == np.float32 and (labels == -1).all()
    ref, _ = mixture.sample(200_000, torch.Generator().manual_seed(0))
    ref = ref.numpy()
    np.testing.assert_allclose(x.mean(0), ref.mean(0), atol=0.15)
    np.testing.assert_allclose(np.cov(x.T), np.cov(ref.T), atol=0.3)
    # Most samples sit where the mixture has mass (a broken sampler spreads them out).
    log_p = mixture.log_prob(torch.from_numpy(x).double()).numpy()
    ref_log_p = mixture.log_prob(torch.from_numpy(ref[:600]).double()).numpy()
    assert log_p.mean() > ref_log_p.mean() - 0.3


def test_conditional_labels_guidance_and_bad_options(ray_session, conditional_unet, unet, tmp_path):
    plain = _sample(conditional_unet, tmp_path / "plain", n=6, batch_size=3, steps=3, workers=2)
    x, labels = load_split(plain.uri, "samples")
    assert x.shape == (6, 8, 8, 3) and labels.tolist() == [0, 1, 2, 0, 1, 2]  # classes in turn
    assert sh.open_dataset(plain.uri).spec.num_classes == 3
    fixed = _sample(conditional_unet, tmp_path / "fixed", n=4, batch_size=4, steps=3, label=2, cfg=1.5)
    xf, lf = load_split(fixed.uri, "samples")
    assert lf.tolist() == [2, 2, 2, 2]
    assert not np.array_equal(direct(conditional_unet, range(3), sampler="ddim", steps=3, seed=0, cfg=3.0), x[:3])
    assert np.array_equal(direct(conditional_unet, range(3), sampler="ddim", steps=3, seed=0, cfg=0.0), x[:3])

    with pytest.raises(UserError, match="unconditional"):
        _sample(unet, tmp_path / "e1", n=2, steps=2, label=1)
    with pytest.raises(UserError, match="guidance needs a class-conditional model"):
        _sample(unet, tmp_path / "e2", n=2, steps=2, cfg=1.0)
    with pytest.raises(UserError, match="the model knows labels 0..2"):
        _sample(conditional_unet, tmp_path / "e3", n=2, steps=2, label=5)
    with pytest.raises(UserError, match="between 1 and the model's T=20"):
        _sample(unet, tmp_path / "e4", n=2, steps=50)
    prepared = tmp_path / "prepared"
    from conftest import prepare_quick

    prepare_quick("toy2d", prepared, name="gmm8", num_train=5, num_test=0)
    with pytest.raises(UserError, match="holds a prepared dataset"):
        _sample(unet, prepared, n=2, steps=2)  # never overwrite real data


def test_ddm_checkpoints_sample_through_the_same_stage(ray_session, tmp_path):
    torch.manual_seed(0)
    ckpt = tmp_path / "ddm" / "checkpoint.pt"
    save_checkpoint(ckpt, model=UNetDenoiser(unet_preset("tiny", 1, 8), 20), step=0, config=config_for("ddm", 20))
    a = load_split(
        _sample(ckpt, tmp_path / "a", n=4, batch_size=2, steps=5, sampler="dpmsolver2m", workers=2).uri, "samples"
    )[0]
    assert np.array_equal(a[2:], direct(ckpt, range(2, 4), sampler="dpmsolver2m", steps=5, seed=0))


def test_mlflow_run_rerun_and_cli(ray_session, unet, tmp_path, cdm_forks):
    import mlflow

    store = new_store(tmp_path / "mlflow.db")
    out = tmp_path / "tracked"
    first = _sample(unet, out, n=4, batch_size=4, steps=2, track=True, tracking_uri=store)
    client = mlflow.tracking.MlflowClient(store)
    got = client.get_run(first.run_id)
    assert got.info.status == "FINISHED"
    assert got.data.tags["cdm.stage"] == "sample" and got.data.tags["cdm.train_run_id"] == "train-run-abc"
    assert got.data.params["sampler"] == "ddim" and got.data.params["steps"] == "2"
    assert got.data.metrics["sample/count"] == 4 and got.data.metrics["sample/images_per_s"] > 0
    assert "grid.png" in [a.path for a in client.list_artifacts(first.run_id)]
    assert sh.open_dataset(out).meta["options"]["train_run_id"] == "train-run-abc"
    # Same checkpoint and settings: nothing to do.
    again = _sample(unet, out, n=4, batch_size=4, steps=2)
    assert again.up_to_date

    env = {k: v for k, v in os.environ.items() if k not in ("CDM_DEBUG", "MLFLOW_TRACKING_URI")}
    r = cdm_forks.run(
        ["sample", str(unet), "--out", str(tmp_path / "c"), "--sampler", "heun", "--no-track"], tmp_path, env
    )
    assert r.returncode == 2 and "--sampler 'heun'" in r.stderr and "Traceback" not in r.stderr


def test_sigterm_stops_sampling_with_a_message_and_leaves_out_as_it_was(ray_session, unet, tmp_path, cdm_forks):
    """The real `cdm sample` on the suite's Ray, stopped by SIGTERM once its workers write shards: exit 130,
    cdm's line, the MLflow run KILLED, and no --out (issue 29: exit 134 from Ray's C++ handler and an empty
    --out). The samples are written beside --out and renamed into place only when complete."""
    import signal
    import time

    import mlflow

    def stop_midway(pid: int) -> None:
        partial, deadline = tmp_path / f".c.partial-{pid}", time.monotonic() + 180
        while time.monotonic() < deadline and not any(partial.glob("*.tar")):
            time.sleep(0.2)
        os.kill(pid, signal.SIGTERM)

    store = new_store(tmp_path / "mlflow.db")
    env = {k: v for k, v in os.environ.items() if k not in ("CDM_DEBUG", "MLFLOW_TRACKING_URI")}
    env["RAY_ADDRESS"] = ray_session
    # Batches of a shard's size (1000 samples), so that the first shard is written as soon as the worker runs.
    argv = ["--n", "200000", "--batch-size", "1000", "--steps", "2", "--workers", "1", "--tracking-uri", store]
    result = cdm_forks.run(["sample", str(unet), "--out", "c", *argv], tmp_path, env, timeout=300, on_start=stop_midway)
    assert result.returncode == 130, result.stderr[-3000:]
    assert "interrupted: what was finished is kept" in result.stderr, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert not (tmp_path / "c").exists() and not list(tmp_path.glob(".c.*")), os.listdir(tmp_path)
    client = mlflow.tracking.MlflowClient(store)
    (run,) = client.search_runs([client.get_experiment_by_name("cdm").experiment_id])
    assert run.info.status == "KILLED"
