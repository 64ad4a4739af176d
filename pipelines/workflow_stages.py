"""What each stage of `cdm run` does: call the stage's own `run(config)` with the workflow's wiring.

A runner gets its `Stage` (key, output folder) and the `Context` (the plan,
MLflow, the records of the stages already done) and returns the stage's
record: its outputs (absolute paths), its headline metrics and its MLflow run.
The stage modules do the work and log their own MLflow runs, nested under the
workflow's parent run through `parent_run_id`.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import typer

from pipelines import config as cfg
from pipelines.errors import UserError
from pipelines.workflow_plan import Plan, Stage


@dataclass
class Context:
    plan: Plan
    tracking_uri: str
    experiment: str
    parent_run_id: str
    records: dict[str, dict[str, Any]] = field(default_factory=dict)  # finished stages by name
    echo: Callable[[str], Any] = typer.echo

    def wiring(self) -> dict[str, Any]:
        """The MLflow settings every stage config shares."""
        return {"tracking_uri": self.tracking_uri, "experiment": self.experiment, "parent_run_id": self.parent_run_id,
                "workdir": str(self.plan.workdir)}

    def output(self, stage: str, name: str) -> Any:
        return self.records[stage]["outputs"][name]


def _section(section: Any, drop: tuple[str, ...] = ("enabled", "untrained")) -> dict[str, Any]:
    return {k: v for k, v in dataclasses.asdict(section).items() if k not in drop}


# --------------------------------------------------------------------------- prepare


def run_prepare(stage: Stage, ctx: Context) -> dict[str, Any]:
    from pipelines.prepare import PrepareConfig, run

    result = run(PrepareConfig(**_section(ctx.plan.config.prepare), out=stage.output, **ctx.wiring()))
    return {"outputs": {"dataset": result.uri}, "metrics": {f"data/{s}_count": float(n) for s, n in result.counts.items()},
            "mlflow_run_id": result.run_id}


def check_dataset_fits(ctx: Context) -> None:
    """The splits and labels the later stages read exist: fail now, not after training."""
    from pipelines import shards as sh

    c = ctx.plan.config
    ds = sh.open_dataset(ctx.plan.dataset_uri)
    wanted = {"nll.split": c.nll.split if c.nll.enabled else None,
              "fid.reference_split": c.fid.reference_split if c.fid.enabled else None,
              "features.train_split": c.features.train_split if c.uses_feature_classifier else None,
              "features.test_split": c.features.test_split if c.uses_feature_classifier else None}
    for key, split in wanted.items():
        if split is not None and split not in ds.splits:
            raise UserError(f"{key}: {split!r} is not a split of {ds.loc.uri}; it has {', '.join(ds.splits)}")
    if c.uses_feature_classifier and not (ds.spec.labeled and ds.spec.num_classes):
        raise UserError(f"fid.features: 'classifier' trains a classifier on the data, but {ds.loc.uri} has no labels; "
                        "use fid.features = 'inception' or 'raw', or fid.enabled = false")


# --------------------------------------------------------------------------- tune (hook) and train


def run_tune(stage: Stage, ctx: Context) -> dict[str, Any]:
    from pipelines.workflow_tune import run_tune as tune

    config = cfg.apply_overrides(ctx.plan.config.train, {"data.uri": ctx.plan.dataset_uri})
    result = tune(config, ctx.plan.config.tune, output=stage.output, tracking_uri=ctx.tracking_uri,
                  experiment=ctx.experiment, parent_run_id=ctx.parent_run_id)
    Path(stage.output).mkdir(parents=True, exist_ok=True)
    (Path(stage.output) / "best.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    metrics = {f"tune/best_{result['metric'].replace('/', '_')}": float(result["best_value"])} if "metric" in result else {}
    return {"outputs": {"best_overrides": result["best_overrides"]}, "metrics": metrics,
            "mlflow_run_id": result.get("mlflow_run_id")}


def train_config(ctx: Context, stage_output: str) -> Any:
    """The training config this workflow trains: its data, the best tuned settings, and a run folder named by the key."""
    overrides: dict[str, Any] = {}
    if "tune" in ctx.records:
        overrides.update(ctx.output("tune", "best_overrides"))
    overrides.update({
        "data.uri": ctx.plan.dataset_uri,
        "run.name": Path(stage_output).name,
        "run.storage_path": str(Path(stage_output).parent),
        **{f"tracking.{k}": v for k, v in ctx.wiring().items()},
    })
    return cfg.apply_overrides(ctx.plan.config.train, overrides)


def run_train(stage: Stage, ctx: Context) -> dict[str, Any]:
    from pipelines import train
    from pipelines.train_config import resumable
    from pipelines.workflow_progress import TrainingProgress

    config = train_config(ctx, stage.output)
    run_dir = Path(stage.output)
    with TrainingProgress(ctx.tracking_uri, ctx.experiment, run_dir.name, config.train.steps, echo=ctx.echo):
        recorded = _read_json(run_dir / train.RUN_FILE)
        if recorded is not None:
            # An interrupted run of this very stage: continue it from its latest checkpoint (same MLflow run).
            # Only settings that a resumed run may change are passed on (e.g. scaling.*).
            before = cfg.flatten(recorded.get("config", {}))
            after = cfg.flatten(cfg.to_dict(config))
            changed = {k: v for k, v in after.items() if resumable(k) and before.get(k) != v}
            ctx.echo(f"  resuming the interrupted training run {run_dir} from its latest checkpoint")
            result = train.resume(str(run_dir), changed, tracking_uri=ctx.tracking_uri)
        else:
            if run_dir.exists():
                shutil.rmtree(run_dir)  # killed before its run file was written: nothing in it to keep
            result = train.run(config, config_name=ctx.plan.name)
    if result.checkpoint is None:
        raise RuntimeError(f"training finished without a checkpoint in {result.run_dir}")
    return {"outputs": {"run_dir": result.run_dir, "checkpoint": result.checkpoint,
                        "best_checkpoint": result.best_checkpoint},
            "metrics": {k: float(v) for k, v in result.metrics.items() if k.startswith("val/")},
            "mlflow_run_id": result.mlflow_run_id, "step": result.step}


# --------------------------------------------------------------------------- evaluation


def run_nll_untrained(stage: Stage, ctx: Context) -> dict[str, Any]:
    """The NLL of the network as initialised (same architecture and seed as the train stage): the figure to beat."""
    import torch

    from cdm_core.checkpoint import save_checkpoint
    from cdm_core.ema import EMA
    from pipelines.models import CHECKPOINT_FILENAME
    from pipelines.nll import NllConfig, run
    from pipelines.train import resolve
    from pipelines.train_step import build_network

    config, (channels, size, _) = resolve(train_config(ctx, stage.output))
    torch.manual_seed(config.train.seed)  # as the train stage's workers do before building the network
    model = build_network(config, channels, size)
    checkpoint = Path(stage.output) / "untrained" / CHECKPOINT_FILENAME
    save_checkpoint(checkpoint, model=model, step=0, config=cfg.to_dict(config), ema=EMA(model, config.ema.decay))
    nll = ctx.plan.config.nll
    result = run(NllConfig(**_section(nll), checkpoint=str(checkpoint), dataset=ctx.plan.dataset_uri, out=stage.output,
                           **ctx.wiring()))
    _label_run(ctx, result.run_id, "nll-untrained", {"cdm.model": "untrained (initial weights)"})
    return {"outputs": {"checkpoint": str(checkpoint), "scores": result.scores_uri},
            "metrics": {"eval/nll_bpd_untrained": result.nll_bpd}, "mlflow_run_id": result.run_id,
            "summary": result.summary}


def run_sample(stage: Stage, ctx: Context) -> dict[str, Any]:
    from pipelines.sample import SampleConfig, run

    result = run(SampleConfig(**_section(ctx.plan.config.sample), checkpoint=ctx.output("train", "checkpoint"),
                              out=stage.output, train_run_id=ctx.records["train"].get("mlflow_run_id"), **ctx.wiring()))
    return {"outputs": {"samples": result.uri, "grid": result.grid},
            "metrics": {"sample/count": float(result.count), "sample/images_per_s": result.images_per_s},
            "mlflow_run_id": result.run_id}


def run_nll(stage: Stage, ctx: Context) -> dict[str, Any]:
    from pipelines.nll import NllConfig, run

    result = run(NllConfig(**_section(ctx.plan.config.nll), checkpoint=ctx.output("train", "checkpoint"),
                           dataset=ctx.plan.dataset_uri, out=stage.output,
                           train_run_id=ctx.records["train"].get("mlflow_run_id"), **ctx.wiring()))
    return {"outputs": {"scores": result.scores_uri},
            "metrics": {"eval/nll_bpd": result.nll_bpd, "eval/nll_bpd_ci95": result.ci95},
            "mlflow_run_id": result.run_id, "summary": result.summary}


def run_features(stage: Stage, ctx: Context) -> dict[str, Any]:
    from pipelines.features import TrainFeaturesConfig, train_features

    result = train_features(TrainFeaturesConfig(**_section(ctx.plan.config.features), dataset=ctx.plan.dataset_uri,
                                                out=str(Path(stage.output) / "classifier.pt"), **ctx.wiring()))
    return {"outputs": {"classifier": result.path}, "metrics": {"features/test_accuracy": result.test_accuracy},
            "mlflow_run_id": result.run_id}


def run_fid(stage: Stage, ctx: Context) -> dict[str, Any]:
    from pipelines.fid import FidConfig, run

    section = _section(ctx.plan.config.fid)
    if ctx.plan.config.uses_feature_classifier:
        section["features"] = f"classifier:{ctx.output('features', 'classifier')}"
    result = run(FidConfig(**section, samples=ctx.output("sample", "samples"), reference=ctx.plan.dataset_uri,
                           **ctx.wiring()))
    summary = dataclasses.asdict(result)
    Path(stage.output).mkdir(parents=True, exist_ok=True)
    (Path(stage.output) / "result.json").write_text(json.dumps(summary, indent=2) + "\n")
    return {"outputs": {"result": str(Path(stage.output) / "result.json")}, "metrics": {result.metric: result.value},
            "mlflow_run_id": result.run_id, "summary": summary}


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


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _label_run(ctx: Context, run_id: str | None, name: str, tags: dict[str, str]) -> None:
    """Rename a stage's MLflow run and tag it (the untrained NLL run would otherwise look like the trained one's)."""
    if not run_id:
        return
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=ctx.tracking_uri)
    client.update_run(run_id, name=name)
    for key, value in tags.items():
        client.set_tag(run_id, key, value)
