"""What each stage of `cdm run` does: call the stage's own `run(config)` with the workflow's wiring.

A runner gets its `Stage` (key, output folder) and the `Context` (the plan,
MLflow, the records of the stages already done) and returns the stage's
record: its outputs (absolute paths), its headline metrics and its MLflow run.
The stage modules do the work and log their own MLflow runs, nested under the
workflow's parent run through the `tracking` section every stage config has.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from mlflow.tracking import MlflowClient

from cdm_core.checkpoint import save_checkpoint
from cdm_core.ema import EMA
from pipelines.common import config as cfg
from pipelines.common import console, storage
from pipelines.common.checkpoints import CHECKPOINT_FILENAME
from pipelines.common.config import TrackingSection
from pipelines.common.errors import UserError
from pipelines.data import prepare, shards
from pipelines.data.config import PrepareConfig
from pipelines.evaluate import feature_classifier, fid, nll, sample
from pipelines.evaluate.config import FidConfig, NllConfig, SampleConfig, TrainFeaturesConfig
from pipelines.train import trainer
from pipelines.train.config import TrainConfig, resumable
from pipelines.train.run_dir import read_run_file
from pipelines.train.step import build_network
from pipelines.tune.sweep import run_for_workflow
from pipelines.workflow.config import stage_settings
from pipelines.workflow.plan import Plan, Stage, protocol_stage
from pipelines.workflow.progress import TrainingProgress


@dataclass
class Context:
    plan: Plan
    tracking_uri: str
    experiment: str
    parent_run_id: str
    records: dict[str, dict[str, Any]] = field(default_factory=dict)  # finished stages by name
    echo: Callable[[str], Any] = console.echo

    @property
    def tracking(self) -> TrackingSection:
        """Where every stage's MLflow run goes: the workflow's store, nested under its parent run."""
        return TrackingSection(
            experiment=self.experiment,
            tracking_uri=self.tracking_uri,
            workdir=str(self.plan.workdir),
            parent_run_id=self.parent_run_id,
        )

    def output(self, stage: str, name: str) -> Any:
        return self.records[stage]["outputs"][name]

    def pool_settings(self, section: Any) -> dict[str, Any]:
        """A batch stage's settings, its workers on the training's kind of device unless the section says otherwise.

        A cluster whose GPU nodes scale from zero may have none up when sampling starts: sized by what
        runs at that moment, the stage would run on CPUs; asked for GPUs, it waits for them.
        """
        settings = stage_settings(section)
        train = self.plan.config.train
        if settings.get("gpus_per_worker") is None and train.scaling.use_gpu:
            settings["gpus_per_worker"] = 1.0
        return {**settings, "address": train.run.ray_address}


# --------------------------------------------------------------------------- prepare


def run_prepare(stage: Stage, ctx: Context) -> dict[str, Any]:
    config = cfg.nest(PrepareConfig, **stage_settings(ctx.plan.config.prepare), out=stage.output, tracking=ctx.tracking)
    result = prepare.run(config)
    return {
        "outputs": {"dataset": result.uri},
        "metrics": {f"data/{s}_count": float(n) for s, n in result.counts.items()},
        "mlflow_run_id": result.run_id,
    }


def check_dataset_fits(ctx: Context) -> None:
    """The splits and labels the later stages read exist: fail now, not after training."""
    c = ctx.plan.config
    ds = shards.open_dataset(ctx.plan.dataset_uri)
    wanted = {
        "nll.split": c.nll.split if c.nll.enabled else None,
        "fid.reference_split": c.fid.reference_split if c.fid.enabled else None,
        "features.train_split": c.features.train_split if c.uses_feature_classifier else None,
        "features.test_split": c.features.test_split if c.uses_feature_classifier else None,
    }
    for key, split in wanted.items():
        if split is not None and split not in ds.splits:
            raise UserError(f"{key}: {split!r} is not a split of {ds.loc.uri}; it has {', '.join(ds.splits)}")
    if c.uses_feature_classifier and not (ds.spec.labeled and ds.spec.num_classes):
        raise UserError(
            f"fid.features: 'classifier' trains a classifier on the data, but {ds.loc.uri} has no labels; "
            "use fid.features = 'inception' or 'raw', or fid.enabled = false"
        )


# --------------------------------------------------------------------------- tune and train


def run_tune(stage: Stage, ctx: Context) -> dict[str, Any]:
    """`cdm tune` itself, through its entry point for workflows: the sweep in the stage's folder, nested here."""
    config = cfg.apply_overrides(ctx.plan.config.train, {"data.uri": ctx.plan.dataset_uri})
    result = run_for_workflow(
        config,
        dict(ctx.plan.config.tune),
        output=stage.output,
        tracking_uri=ctx.tracking_uri,
        experiment=ctx.experiment,
        parent_run_id=ctx.parent_run_id,
    )
    Path(stage.output).mkdir(parents=True, exist_ok=True)
    (Path(stage.output) / "best.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    metrics = {f"tune/best_{result['metric'].replace('/', '_')}": float(result["best_value"])}
    return {
        "outputs": {"best_overrides": result["best_overrides"]},
        "metrics": metrics,
        "mlflow_run_id": result.get("mlflow_run_id"),
    }


def planned_train_settings(plan: Plan, stage_output: str) -> dict[str, Any]:
    """What the workflow sets in the training config it trains, known from the plan: the data and the run folder."""
    return {
        "data.uri": plan.dataset_uri,
        "run.name": Path(stage_output).name,
        "run.storage_path": str(Path(stage_output).parent),
    }


def train_config(ctx: Context, stage_output: str) -> TrainConfig:
    """The training config this workflow trains: its data, the best tuned settings, and a run folder named by the key."""
    overrides: dict[str, Any] = {}
    if "tune" in ctx.records:
        overrides.update(ctx.output("tune", "best_overrides"))
    overrides.update(
        {
            **planned_train_settings(ctx.plan, stage_output),
            **{f"tracking.{k}": v for k, v in dataclasses.asdict(ctx.tracking).items()},
        }
    )
    return cfg.apply_overrides(ctx.plan.config.train, overrides)


def run_train(stage: Stage, ctx: Context) -> dict[str, Any]:
    config = train_config(ctx, stage.output)
    run_dir = Path(stage.output)
    with TrainingProgress(ctx.tracking_uri, ctx.experiment, run_dir.name, config.train.steps, echo=ctx.echo):
        try:
            recorded = read_run_file(str(run_dir))
        except ValueError:  # a run file cut short by the kill: as if there were none
            recorded = None
        if recorded is not None:
            # An interrupted run of this very stage: continue it from its latest checkpoint (same MLflow run).
            # Only settings that a resumed run may change are passed on (e.g. scaling.*).
            before = cfg.flatten(recorded.get("config", {}))
            after = cfg.flatten(cfg.to_dict(config))
            changed = {k: v for k, v in after.items() if resumable(k) and before.get(k) != v}
            ctx.echo(f"  resuming the interrupted training run {run_dir} from its latest checkpoint")
            result = trainer.resume(str(run_dir), changed, tracking_uri=ctx.tracking_uri)
        else:
            if run_dir.exists():
                shutil.rmtree(run_dir)  # killed before its run file was written: nothing in it to keep
            result = trainer.run(config, config_name=ctx.plan.name)
    if result.checkpoint is None:
        raise RuntimeError(f"training finished without a checkpoint in {result.run_dir}")
    return {
        "outputs": {
            "run_dir": result.run_dir,
            "checkpoint": result.checkpoint,
            "best_checkpoint": result.best_checkpoint,
        },
        "metrics": {k: float(v) for k, v in result.metrics.items() if k.startswith("val/")},
        "mlflow_run_id": result.mlflow_run_id,
        "step": result.step,
    }


# --------------------------------------------------------------------------- evaluation


def run_nll_untrained(stage: Stage, ctx: Context) -> dict[str, Any]:
    """The NLL of the network as initialised (same architecture and seed as the train stage): the figure to beat."""
    config, shape = trainer.resolve(train_config(ctx, stage.output))
    torch.manual_seed(config.train.seed)  # as the train stage's workers do before building the network
    model = build_network(config, *shape[:2])  # (C, H, W) images or (D,) vectors
    checkpoint = Path(stage.output) / "untrained" / CHECKPOINT_FILENAME
    save_checkpoint(checkpoint, model=model, step=0, config=cfg.to_dict(config), ema=EMA(model, config.ema.decay))
    result = nll.run(
        cfg.nest(
            NllConfig,
            **ctx.pool_settings(ctx.plan.config.nll),
            checkpoint=str(checkpoint),
            dataset=ctx.plan.dataset_uri,
            out=stage.output,
            tracking=ctx.tracking,
        )
    )
    _label_run(ctx, result.run_id, "nll-untrained", {"cdm.model": "untrained (initial weights)"})
    return {
        "outputs": {"checkpoint": str(checkpoint), "scores": result.scores_uri},
        "metrics": {"eval/nll_bpd_untrained": result.nll_bpd},
        "mlflow_run_id": result.run_id,
        "summary": result.summary,
    }


def run_sample(stage: Stage, ctx: Context) -> dict[str, Any]:
    result = sample.run(
        cfg.nest(
            SampleConfig,
            **ctx.pool_settings(ctx.plan.config.sampling_protocols()[stage.protocol]),
            checkpoint=ctx.output("train", "checkpoint"),
            out=stage.output,
            train_run_id=ctx.records["train"].get("mlflow_run_id"),
            tracking=ctx.tracking,
        )
    )
    if stage.protocol:
        _label_run(ctx, result.run_id, f"sample-{stage.protocol}", {"cdm.protocol": stage.protocol})
    metrics = {"sample/count": float(result.count), "sample/images_per_s": result.images_per_s}
    return {
        "outputs": {"samples": result.uri, "grid": result.grid},
        "metrics": _of_protocol(metrics, stage.protocol),
        "mlflow_run_id": result.run_id,
    }


def run_nll(stage: Stage, ctx: Context) -> dict[str, Any]:
    result = nll.run(
        cfg.nest(
            NllConfig,
            **ctx.pool_settings(ctx.plan.config.nll),
            checkpoint=ctx.output("train", "checkpoint"),
            dataset=ctx.plan.dataset_uri,
            out=stage.output,
            train_run_id=ctx.records["train"].get("mlflow_run_id"),
            tracking=ctx.tracking,
        )
    )
    return {
        "outputs": {"scores": result.scores_uri},
        "metrics": {
            "eval/nll_bpd": result.nll_bpd,
            "eval/nll_bpd_ci95": result.ci95,
            **{f"eval/nll_bpd_{c}": v for c, v in result.summary.get("nll_bpd_by_convention", {}).items()},
            **nll.consistency_metrics(result.summary),
        },
        "mlflow_run_id": result.run_id,
        "summary": result.summary,
    }


def run_features(stage: Stage, ctx: Context) -> dict[str, Any]:
    result = feature_classifier.run(
        cfg.nest(
            TrainFeaturesConfig,
            **stage_settings(ctx.plan.config.features),
            dataset=ctx.plan.dataset_uri,
            out=str(Path(stage.output) / "classifier.pt"),
            tracking=ctx.tracking,
        )
    )
    return {
        "outputs": {"classifier": result.path},
        "metrics": {"features/test_accuracy": result.test_accuracy},
        "mlflow_run_id": result.run_id,
    }


def run_fid(stage: Stage, ctx: Context) -> dict[str, Any]:
    settings = ctx.pool_settings(ctx.plan.config.fid)
    if ctx.plan.config.uses_feature_classifier:
        settings["features"] = f"classifier:{ctx.output('features', 'classifier')}"
    result = fid.run(
        cfg.nest(
            FidConfig,
            **settings,
            samples=ctx.output(protocol_stage("sample", stage.protocol), "samples"),
            reference=ctx.plan.dataset_uri,
            tracking=ctx.tracking,
        )
    )
    summary = {**dataclasses.asdict(result), "protocol": stage.protocol or None}
    storage.write_json(str(Path(stage.output) / "result.json"), summary)
    if stage.protocol:
        _label_run(ctx, result.run_id, f"fid-{stage.protocol}", {"cdm.protocol": stage.protocol})
    return {
        "outputs": {"result": str(Path(stage.output) / "result.json")},
        "metrics": _of_protocol({result.metric: result.value}, stage.protocol),
        "mlflow_run_id": result.run_id,
        "summary": summary,
    }


RUNNERS: dict[str, Callable[[Stage, Context], dict[str, Any]]] = {
    "prepare": run_prepare,
    "tune": run_tune,
    "nll_untrained": run_nll_untrained,
    "train": run_train,
    "sample": run_sample,
    "nll": run_nll,
    "features": run_features,
    "fid": run_fid,
}


# --------------------------------------------------------------------------- helpers


def _of_protocol(metrics: dict[str, float], protocol: str) -> dict[str, float]:
    """A protocol's figures under names of their own (eval/fid_ddim50): the parent run holds every protocol's."""
    return {f"{k}_{protocol}": v for k, v in metrics.items()} if protocol else metrics


def _label_run(ctx: Context, run_id: str | None, name: str, tags: dict[str, str]) -> None:
    """Rename a stage's MLflow run and tag it (the untrained NLL run would otherwise look like the trained one's)."""
    if not run_id:
        return
    client = MlflowClient(tracking_uri=ctx.tracking_uri)
    client.update_run(run_id, name=name)
    for key, value in tags.items():
        client.set_tag(run_id, key, value)
