"""`cdm train`."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Optional

import typer

from pipelines.common import config as cfg
from pipelines.common import console
from pipelines.common.errors import UserError
from pipelines.train.config import TrainConfig

# The final validation's consistency metrics (pipelines.train.validation): one reading on the console.
CONSISTENCY_METRICS = ("val/link01", "val/consistency_", "val/nll_bpd_elbo")


def train(
    config: Optional[Path] = typer.Argument(None, help="Training config, TOML or YAML (see configs/)."),
    set_: list[str] = typer.Option([], "--set", help="Override a setting, e.g. --set optim.lr=1e-4 (repeatable)."),
    resume_run: Optional[str] = typer.Option(
        None, "--resume", help="Continue RUN (its folder, or its MLflow run id) from its latest checkpoint."
    ),
    from_checkpoint: Optional[str] = typer.Option(
        None,
        "--from-checkpoint",
        help="With --resume: continue from this checkpoint of the run (e.g. checkpoint_00005000) instead of the latest.",
    ),
    print_config: bool = typer.Option(
        False, "--print-config", help="Print the config with overrides applied, as JSON, and exit."
    ),
    list_settings: bool = typer.Option(
        False, "--list-settings", help="List every setting with its type, default and meaning."
    ),
    from_best: Optional[str] = typer.Option(
        None,
        "--from-best",
        help="Train the best trial of SWEEP (a `cdm tune` folder or its MLflow parent run id) as a new run; --set changes it.",
    ),
    continue_best: bool = typer.Option(
        False,
        "--continue-best",
        help="With --from-best: continue the best trial's own run from its latest checkpoint instead.",
    ),
    register: Optional[str] = typer.Option(
        None,
        "--register",
        metavar="NAME",
        help="Register the trained EMA model in the MLflow model registry as NAME (a new version each run).",
    ),
) -> None:
    """Train a CDM (or the DDM baseline) with Ray Train, tracked in MLflow.

    Examples:
      cdm train configs/mnist.toml
      cdm train configs/cifar10.toml --set scaling.num_workers=4 --set scaling.use_gpu=true
      cdm train configs/train_tiny.toml --set optim.lr=1e-3 --set train.steps=200
      cdm train --resume outputs/runs/mnist-20250101-120000 --set train.steps=20000
      cdm train --from-best outputs/runs/mnist-sweep-20250101-120000 --set train.steps=100000

    Local mode: `--set scaling.num_workers=0` runs the training loop in this process (Ray Train's local mode: no worker actors; the same checkpoints, run folder and MLflow run). Use it to debug the loop with pdb or breakpoint(), or for a short run where starting workers costs more than it saves. It does not restart after a failure (run.max_failures=0). In `cdm tune`, it trains each trial in its Tune actor.
    """
    if list_settings:
        for key, kind, default, doc in cfg.describe(TrainConfig):
            typer.echo(f"{key:28} {kind:44} {default!s:13} {doc}")
        return
    if register is not None:
        set_ = [*set_, "run.log_model=true", f"run.register_model={register}"]
    if continue_best and from_best is None:
        raise UserError("--continue-best needs --from-best SWEEP")
    if from_checkpoint is not None and resume_run is None:
        raise UserError("--from-checkpoint needs --resume RUN (the run whose checkpoint it names)")
    if from_best is not None and (config is not None or resume_run is not None):
        raise UserError("give --from-best SWEEP alone (the sweep's best trial brings its config); change it with --set")
    if resume_run is not None and config is not None:
        raise UserError(
            "give either CONFIG or --resume RUN, not both (a resumed run keeps its own config; change it with --set)"
        )
    if from_best is None and resume_run is None:
        if config is None:
            raise UserError(
                "cdm train needs a CONFIG file (e.g. configs/mnist.toml) or --resume RUN; see `cdm train --help`"
            )
        train_config = cfg.load(TrainConfig, config, set_)
        if print_config:
            typer.echo(json.dumps(cfg.to_dict(train_config), indent=2))
            c = train_config
            console.echo(
                f"batch: {c.train.batch_size} images per optimizer step = {max(c.scaling.num_workers, 1)} worker(s) "
                f"× {c.train.grad_accum} micro-batch(es) of {c.micro_batch}",
                err=True,
            )
            return
    # Deferred: the trainer imports torch, Ray Train and MLflow (seconds); `cdm --help` should not wait.
    from pipelines.common.tracking import store_uri, ui_url
    from pipelines.train import trainer
    from pipelines.tune.best import train_from_best
    from pipelines.workflow.progress import TrainingProgress

    if from_best is not None:
        result = train_from_best(from_best, set_, continue_run=continue_best)
    elif resume_run is not None:
        result = trainer.resume(resume_run, set_, from_checkpoint=from_checkpoint)
    else:
        # The run's name now, not in the trainer, so the console can follow its steps in MLflow meanwhile.
        name = train_config.run.name or f"{config.stem}-{time.strftime('%Y%m%d-%H%M%S')}"
        train_config = dataclasses.replace(train_config, run=dataclasses.replace(train_config.run, name=name))
        tracking = train_config.tracking
        with TrainingProgress(store_uri(tracking), tracking.experiment, name, train_config.train.steps, every=15):
            result = trainer.run(train_config, config_name=config.stem)
    typer.echo(f"run: {result.run_name}  folder: {result.run_dir}  mlflow run: {result.mlflow_run_id}")
    typer.echo(f"finished at step {result.step} in {result.seconds:.0f} s")
    for key, value in sorted(result.metrics.items()):
        if not key.startswith(CONSISTENCY_METRICS):  # in MLflow; the console gets their one-line reading
            typer.echo(f"  {key} = {value:.4f}")
    if "val/link01_nats" in result.metrics:
        typer.echo(f"  {_consistency_reading(result.metrics)}")
    typer.echo(f"latest checkpoint: {result.checkpoint}")
    if result.best_checkpoint:
        typer.echo(f"best checkpoint:   {result.best_checkpoint}")
    tracking = train_config.tracking if from_best is None and resume_run is None else cfg.TrackingSection()
    typer.echo(f"open the UI: cdm ui, then {ui_url(store_uri(tracking), tracking.experiment)}")


def _consistency_reading(metrics: dict[str, float]) -> str:
    """The final validation's consistency metrics read as `cdm nll` reads its own."""
    from pipelines.evaluate.nll import consistency_reading  # deferred with the trainer: it imports torch

    c: dict = {"link01_nats": metrics["val/link01_nats"]}
    if "val/link01_expected_nats" in metrics:
        c["link01_expected_nats"] = metrics["val/link01_expected_nats"]
    if "val/consistency_gap_bpd" in metrics:
        c |= {
            "gap_bpd": metrics["val/consistency_gap_bpd"],
            "samples": int(metrics["val/consistency_samples"]),
            "elbo_classes": int(metrics["val/consistency_elbo_classes"]),
        }
    return consistency_reading(c)
