"""The training stage on a real local Ray (one session for the module) and a real MLflow SQLite store.

Two training runs serve several tests each, because a Ray Train start costs
~20 s on 2 cores:

* `two_workers`: 2 workers, rank 1 dies at step 25 (CDM_FAIL_AT_STEP) and Ray
  restarts the group from the step-20 checkpoint (run.max_failures=1).
* `one_worker`: 1 worker, the loss turns NaN at step 25 (CDM_NAN_AT_STEP), the
  run stops with an error; then `resume` continues it from step 20 to the end.

Both use the same global batch and seed on sklearn's 8×8 digits.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ONE_LEVEL, new_store

ray = pytest.importorskip("ray")
mlflow = pytest.importorskip("mlflow")

from pipelines.common import config as cfg  # noqa: E402
from pipelines.train.config import TrainConfig  # noqa: E402
from pipelines.train.trainer import NonFiniteLossError, resume, run  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
STEPS = 40


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    return root, new_store(root / "mlflow.db")


def tiny_config(dataset, store, name: str, *overrides: str) -> TrainConfig:
    root, uri = store
    return cfg.load(
        TrainConfig,
        ROOT / "configs" / "train_tiny.toml",
        [
            f"data.uri={dataset}",
            f"run.storage_path={root / 'runs'}",
            f"run.name={name}",
            f"tracking.tracking_uri={uri}",
            f"train.steps={STEPS}",
            *overrides,
        ],
    )


def client(store):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=store[1])


def steps_of(store, run_id: str, key: str) -> list[int]:
    return [m.step for m in client(store).get_metric_history(run_id, key)]


def loss_curve(store, run_id: str) -> np.ndarray:
    history = sorted(client(store).get_metric_history(run_id, "train/loss"), key=lambda m: m.step)
    return np.array([m.value for m in history])


@pytest.fixture(scope="module")
def two_workers(ray_session, digits_dataset, store, tmp_path_factory):
    marker = tmp_path_factory.mktemp("fault") / "failed-once"
    config = tiny_config(
        digits_dataset,
        store,
        "two-workers",
        "scaling.num_workers=2",
        "run.max_failures=1",
        "run.log_model=true",
        f"sampling.every={STEPS}",
    )
    with pytest.MonkeyPatch.context() as env:
        env.setenv("CDM_FAIL_AT_STEP", "25")
        env.setenv("CDM_FAIL_RANK", "1")
        env.setenv("CDM_FAIL_MARKER", str(marker))
        result = run(config)
    return result, marker


@pytest.fixture(scope="module")
def one_worker(ray_session, digits_dataset, store):
    config = tiny_config(digits_dataset, store, "one-worker")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("CDM_NAN_AT_STEP", "25")
        with pytest.raises(NonFiniteLossError) as failure:
            run(config)
    run_dir = Path(store[0] / "runs" / "one-worker")
    run_id = (
        client(store)
        .search_runs(
            [client(store).get_experiment_by_name("cdm").experiment_id],
            filter_string="tags.`cdm.run_name` = 'one-worker'",
        )[0]
        .info.run_id
    )
    after_failure = {
        "status": client(store).get_run(run_id).info.status,
        "checkpoints": sorted(p.name for p in run_dir.glob("checkpoint_0*")),
    }
    resumed = resume(str(run_dir))
    return str(failure.value), after_failure, resumed


@pytest.fixture(scope="module")
def local_mode(ray_session, digits_dataset, store):
    """`one_worker` again in Ray Train's local mode (scaling.num_workers=0): the loop in this process, with
    dequantized training (data.dequantize), which changes the numbers but nothing the comparison looks at."""
    config = tiny_config(digits_dataset, store, "local-mode", "scaling.num_workers=0", "data.dequantize=true")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("CDM_NAN_AT_STEP", "25")
        with pytest.raises(NonFiniteLossError) as failure:
            run(config)
    run_dir = Path(store[0] / "runs" / "local-mode")
    checkpoints = sorted(p.name for p in run_dir.glob("checkpoint_0*"))
    return str(failure.value), checkpoints, resume(str(run_dir))


# --------------------------------------------------------------------------- failures and restarts


def test_two_workers_survive_a_worker_death_without_duplicate_steps(two_workers, store):
    result, marker = two_workers
    assert marker.exists(), "the injected failure never happened"
    info = client(store).get_run(result.mlflow_run_id)
    assert info.info.status == "FINISHED"
    assert info.data.tags["cdm.world_size"] == "2"
    # Ray restarted from its latest *registered* checkpoint: step 20, or 10 if the controller had not
    # yet processed the step-20 report when the worker died (reports are polled asynchronously).
    restarts = [k for k in info.data.tags if k.startswith("cdm.restarted_from_step.")]
    assert restarts in (["cdm.restarted_from_step.20"], ["cdm.restarted_from_step.10"]), restarts
    assert info.data.tags[restarts[0]] == "rng restored"
    assert result.step == STEPS
    # Steps 21-24 ran twice (before the failure and after the restart) but are logged once.
    assert steps_of(store, result.mlflow_run_id, "train/loss") == list(range(1, STEPS + 1))
    assert steps_of(store, result.mlflow_run_id, "val/nll_bpd") == [10, 20, 30, 40]


def test_nonfinite_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(one_worker):
    message, after_failure, _ = one_worker
    assert "step 25" in message and "nan" in message.lower()
    assert "checkpoint_00000020" in message and "--resume" in message
    assert after_failure["status"] == "FAILED"
    assert after_failure["checkpoints"] == ["checkpoint_00000010", "checkpoint_00000020"]


def test_resume_continues_at_the_right_step_with_the_optimizer_state(one_worker, store):
    from cdm_core.checkpoint import load_checkpoint
    from pipelines.train.step import lr_factor

    _, _, resumed = one_worker
    assert resumed.step == STEPS
    info = client(store).get_run(resumed.mlflow_run_id)
    assert info.info.status == "FINISHED"
    assert (
        "cdm.restarted_from_step.20" in info.data.tags
        and info.data.tags["cdm.restarted_from_step.20"] == "rng restored"
    )
    assert steps_of(store, resumed.mlflow_run_id, "train/loss") == list(range(1, STEPS + 1))

    final = load_checkpoint(Path(resumed.checkpoint) / "checkpoint.pt")
    assert final["step"] == STEPS
    # Adam's per-parameter step counters, the LR scheduler and the EMA all went on from 20:
    # a fresh optimizer after the restart would count 20, not 40.
    assert {int(s["step"]) for s in final["optimizer"]["state"].values()} == {STEPS}
    assert final["scheduler"]["last_epoch"] == STEPS
    assert final["ema"]["num_updates"] == STEPS
    lrs = {m.step: m.value for m in client(store).get_metric_history(resumed.mlflow_run_id, "train/lr")}
    tiny = tiny_config("x", store, "x").optim
    for step in (20, 21, 40):
        assert lrs[step] == pytest.approx(tiny.lr * lr_factor(tiny, step + 1))


def test_one_and_two_workers_give_close_loss_curves(one_worker, two_workers, store):
    """Same global batch and seed: both learn, and their losses differ by no more than two runs differ by chance.

    That the two workers' averaged gradient is one process's is checked exactly in test_grad_accum.py; this is
    the end-to-end view. A run's whole trajectory moves with its data order (Ray Data's split, timing-dependent),
    so the noise is the spread across runs, not the scatter within one: benchmarks/results/loss_spread.json
    measured the mean loss of steps 11-40 varying by sd 0.014 (1 worker) and 0.026 (2 workers) across seeds,
    so their difference by sd 0.03; 0.12 is 4 of those. (Steps 31-40 alone, compared before at 0.06, differ by
    sd 0.03 too: ~5% of runs failed on that window.) Steps 1-10 to 31-40 dropped ≥ 0.145 in all 36 runs there."""
    one = loss_curve(store, one_worker[2].mlflow_run_id)
    two = loss_curve(store, two_workers[0].mlflow_run_id)
    assert len(one) == len(two) == STEPS
    for curve in (one, two):
        assert curve[-10:].mean() < curve[:10].mean() - 0.07, curve
    assert abs(one[10:].mean() - two[10:].mean()) < 0.12, (one[10:].mean(), two[10:].mean())


def test_local_mode_writes_what_a_one_worker_run_writes(local_mode, one_worker, store):
    """The same NaN at step 25 and the same resume, in one process: the same message, checkpoints, run folder
    and MLflow run (params, metrics and their steps, tags, artifacts) as the one-worker run's, less Ray's own
    files (its checkpoint snapshot and storage marker; local mode keeps its record in cdm_run.json)."""
    local_message, local_after_failure, local = local_mode
    message, after_failure, worker = one_worker
    assert local_message == message.replace("one-worker", "local-mode")
    assert local_after_failure == after_failure["checkpoints"]
    assert local.step == worker.step == STEPS and Path(local.checkpoint).name == Path(worker.checkpoint).name
    assert Path(local.best_checkpoint).name in {p.name for p in Path(local.run_dir).glob("checkpoint_0*")}

    def folder(result) -> set[str]:  # which checkpoints are the best 2 depends on each run's scores
        return {
            re.sub(r"checkpoint_\d{8}", "checkpoint_N", str(p.relative_to(result.run_dir)))
            for p in Path(result.run_dir).rglob("*")
        }

    assert folder(local) == folder(worker) - {"checkpoint_manager_snapshot.json", ".validate_storage_marker"}
    for result in (local, worker):  # the best 2 by val/nll_bpd and the latest, as Ray keeps them
        kept = sorted(p.name for p in Path(result.run_dir).glob("checkpoint_0*"))
        assert 2 <= len(kept) <= 3 and kept[-1] == "checkpoint_00000040", kept
    runs = {name: client(store).get_run(r.mlflow_run_id) for name, r in (("local", local), ("worker", worker))}
    assert runs["local"].info.status == runs["worker"].info.status == "FINISHED"
    params = {n: dict(r.data.params) for n, r in runs.items()}
    assert params["local"].pop("scaling.num_workers") == "0" and params["worker"].pop("scaling.num_workers") == "1"
    assert params["local"].pop("data.dequantize") == "True" and params["worker"].pop("data.dequantize") == "False"
    assert params["local"] == {k: v.replace("one-worker", "local-mode") for k, v in params["worker"].items()}
    tags = {n: r.data.tags for n, r in runs.items()}
    assert tags["local"]["cdm.local_mode"] == "true" and tags["worker"]["cdm.local_mode"] == "false"
    assert tags["local"]["cdm.restarted_from_step.20"] == tags["worker"]["cdm.restarted_from_step.20"]
    assert set(tags["local"]) == set(tags["worker"])
    # MLflow samples system/ metrics every 10 s of wall time, so a short run may log none of them
    logged = {n: {k for k in r.data.metrics if not k.startswith("system/")} for n, r in runs.items()}
    assert logged["local"] == logged["worker"] and "val/nll_bpd" in logged["local"]
    for key in ("train/loss", "val/nll_bpd"):
        assert steps_of(store, local.mlflow_run_id, key) == steps_of(store, worker.mlflow_run_id, key)
    # The 0 → 1 link at every validation, the ELBO and the gap at the final one (step 40), on the first 17 of
    # the 179 validation digits (64 cut to 10% of 4 validations × 179 images × 5 grid points / 20 classes).
    for name, r in runs.items():
        metrics = r.data.metrics
        consistency = ("val/nll_bpd_elbo", "val/consistency_nll_bpd", "val/consistency_gap_bpd")
        for key in ("val/link01_nats", "val/link01_expected_nats", *consistency):
            assert math.isfinite(metrics[key]), (name, key, metrics.get(key))
        assert steps_of(store, r.info.run_id, "val/link01_nats") == steps_of(store, r.info.run_id, "val/nll_bpd")
        assert steps_of(store, r.info.run_id, "val/consistency_gap_bpd") == [STEPS]
        assert metrics["val/consistency_samples"] == 17 and metrics["val/consistency_elbo_classes"] == 20
        assert metrics["val/link01_expected_nats"] == pytest.approx(
            64 * math.log(math.sqrt(2 * math.pi) * 0.01 * 127.5)
        )
        gap = metrics["val/consistency_nll_bpd"] - metrics["val/nll_bpd_elbo"]
        assert metrics["val/consistency_gap_bpd"] == pytest.approx(gap)
    listed = {n: {a.path for a in client(store).list_artifacts(r.info.run_id)} for n, r in runs.items()}
    assert listed["local"] == listed["worker"]


# --------------------------------------------------------------------------- what the run leaves behind


def test_mlflow_run_holds_params_metrics_artifacts_and_model(two_workers, store, digits_dataset):
    from cdm_core.objective import bits_per_dim
    from pipelines.common.checkpoints import load_trained_model
    from pipelines.data.readers import LocalReader

    result, _ = two_workers
    c = client(store)
    info = c.get_run(result.mlflow_run_id)
    params, tags, metrics = info.data.params, info.data.tags, info.data.metrics
    assert params["model.kind"] == "cdm" and params["schedule.name"] == "linear" and params["schedule.T"] == "20"
    assert (
        params["scaling.num_workers"] == "2" and params["train.batch_size"] == "32" and params["loss.w_ce"] == "0.001"
    )
    assert params["data.uri"] == str(digits_dataset)
    assert tags["cdm.dataset"] == str(digits_dataset) and tags["cdm.checkpoint_dir"] == result.run_dir
    assert "log2(127.5)" in tags["cdm.bpd_convention"]
    assert {
        "train/loss",
        "train/ce",
        "train/mse",
        "train/lr",
        "train/grad_norm",
        "train/images_per_s",
        "val/nll_bpd",
        "val/ce",
        "val/accuracy",
        "val/mse",
    } <= set(metrics)
    artifacts = {a.path for a in c.list_artifacts(result.mlflow_run_id)}
    assert {"val_mse_per_t.png", "val_mse_per_t.json"} <= artifacts
    assert [a.path for a in c.list_artifacts(result.mlflow_run_id, "samples")] == ["samples/step_00000040.png"]

    # The logged validation NLL is the EMA model's, recomputed here from the final checkpoint.
    trained = load_trained_model(result.checkpoint)
    assert trained.step == STEPS and trained.kind == "cdm" and trained.num_labels is None
    x = torch.from_numpy(LocalReader(digits_dataset, "test").inputs(np.arange(179)))
    bpd = bits_per_dim(trained.model, x).mean().item()
    assert bpd == pytest.approx(metrics["val/nll_bpd"], abs=1e-4)

    # The MLflow model (the final EMA network) loads back and scores data the same way.
    mlflow.set_tracking_uri(store[1])
    models = mlflow.search_logged_models(
        experiment_ids=[info.info.experiment_id],
        output_format="list",
        filter_string=f"source_run_id = '{result.mlflow_run_id}'",
    )
    assert len(models) == 1
    loaded = mlflow.pytorch.load_model(f"models:/{models[0].model_id}")
    assert bits_per_dim(loaded, x[:50]).mean().item() == pytest.approx(
        bits_per_dim(trained.model, x[:50]).mean().item(), abs=1e-4
    )


def test_checkpoints_follow_the_contract_and_keep_the_best(two_workers):
    from cdm_core.checkpoint import load_checkpoint
    from pipelines.common.checkpoints import load_trained_model

    result, _ = two_workers
    run_dir = Path(result.run_dir)
    kept = sorted(p.name for p in run_dir.glob("checkpoint_0*"))
    assert len(kept) <= 3 and "checkpoint_00000040" in kept  # best 2 by val/nll_bpd, plus the latest
    assert Path(result.best_checkpoint).name in kept
    ckpt = load_checkpoint(run_dir / "checkpoint_00000040" / "checkpoint.pt")
    config = ckpt["config"]
    assert config["model"]["kind"] == "cdm" and config["schedule"] == {"name": "linear", "T": 20, "params": {}}
    assert config["loss"]["prior"] is None and config["data"]["num_labels"] is None
    assert ckpt["optimizer"] is not None and ckpt["scheduler"] is not None and len(ckpt["extra"]["rng"]) == 2
    assert ckpt["extra"]["mlflow_run_id"] == result.mlflow_run_id  # batch stages link their runs to it
    assert cfg.from_dict(TrainConfig, config).scaling.num_workers == 2  # the whole config round-trips
    model = load_trained_model(result.best_checkpoint)
    assert model.schedule.T == 20 and model.eps_fn() is not None


# --------------------------------------------------------------------------- the compiled step on two workers
# (That DDP's gradients with the loss's double backward are one process's is test_grad_accum.py's two-process test.)


def test_cdm_train_with_train_compile_runs_on_two_workers(ray_session, digits_dataset, store):
    """The real loop with train.compile: the bare network on each worker, a compiled step, checkpoints.
    (The one-level network with 4 images per worker is test_compiled_step.py's graph, so Inductor's on-disk
    cache serves it; that the two workers' gradients are averaged as DDP's are is test_compiled_step.py's
    two-process test.)"""
    from cdm_core.checkpoint import load_checkpoint

    config = tiny_config(
        digits_dataset,
        store,
        "compiled",
        *ONE_LEVEL,
        "train.compile=true",
        "train.batch_size=8",
        "scaling.num_workers=2",
        "train.steps=4",
        "checkpoint.every=4",
        "validation.every=4",
    )
    result = run(config)
    assert result.step == 4
    losses = loss_curve(store, result.mlflow_run_id)
    assert len(losses) == 4 and np.isfinite(losses).all()
    ckpt = load_checkpoint(Path(result.run_dir) / "checkpoint_00000004" / "checkpoint.pt")
    assert ckpt["config"]["train"]["compile"] is True and ckpt["step"] == 4
    assert not any(name.startswith("module.") for name in ckpt["model"])  # no DDP wrapper's prefix
