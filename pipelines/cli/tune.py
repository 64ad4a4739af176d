"""`cdm tune`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from pipelines.common import config as cfg
from pipelines.common.errors import UserError
from pipelines.train.config import TrainConfig


def tune(
    config: Path = typer.Argument(..., help="Training config of every trial, TOML or YAML (see configs/)."),
    space: Path = typer.Option(
        ..., "--space", help="Sweep file: what to search and how (see configs/space_default.toml)."
    ),
    num_samples: Optional[int] = typer.Option(
        None, "--num-samples", min=1, help="Trials to draw (a grid is repeated this many times)."
    ),
    scheduler: Optional[str] = typer.Option(None, "--scheduler", help="asha (stop weak trials early), fifo or pbt."),
    max_concurrent: Optional[int] = typer.Option(
        None, "--max-concurrent", min=0, help="Trials at once, at most; 0 = as many as the cluster fits (never more)."
    ),
    metric: Optional[str] = typer.Option(
        None, "--metric", help="val/nll_bpd (default), val/mse or weighted (tune.weights)."
    ),
    name: Optional[str] = typer.Option(
        None, "--name", help="Sweep name (folder under run.storage_path); needed to --resume."
    ),
    set_: list[str] = typer.Option(
        [], "--set", help="Override a training setting for every trial, e.g. --set train.steps=2000."
    ),
    resume: bool = typer.Option(
        False, "--resume", help="Continue the sweep --name (same CONFIG, --set, --space) after it was interrupted."
    ),
) -> None:
    """Search noise schedules, loss weights, learning rates, … with Ray Tune; one MLflow child run per trial.

    Examples:
      cdm tune configs/train_tiny.toml --space configs/space_default.toml --num-samples 8
      cdm tune configs/mnist.toml --space configs/space_default.toml --scheduler asha --max-concurrent 2 --name mnist-s1
      cdm tune configs/mnist.toml --space configs/space_default.toml --name mnist-s1 --resume
      cdm train --from-best outputs/runs/mnist-s1 --set train.steps=100000
    """
    # Deferred: the sweep imports Ray Tune, torch and MLflow (seconds); `cdm --help` should not wait.
    from pipelines.tune import space as tune_space
    from pipelines.tune import sweep as stage

    train_config = cfg.load(TrainConfig, config, set_)
    overrides = {
        "num_samples": num_samples,
        "scheduler": scheduler,
        "max_concurrent": max_concurrent,
        "metric": metric,
        "name": name,
    }
    sweep = tune_space.load(space, train_config, overrides)
    if resume and not sweep.settings.name:
        raise UserError(
            "--resume needs the sweep's name: add --name NAME (the name `cdm tune` printed when it started)"
        )
    result = stage.run(train_config, sweep, config_name=config.stem, resume=resume)
    typer.echo(f"\nsweep {result.name}: {len(result.rows)} trials in {result.seconds:.0f} s, sorted by {result.metric}")
    typer.echo(result.table())
    typer.echo(f"\nfolder: {result.sweep_dir}  mlflow parent run: {result.mlflow_run_id}")
    if result.best is None:
        typer.echo("no trial finished without failing; nothing to train from")
        raise typer.Exit(1)
    typer.echo(f"best trial: {result.best.trial_id} ({result.metric} = {result.best.value:.4f}, {result.best.status})")
    typer.echo(f"best checkpoint: {result.best.checkpoint}")
    typer.echo(f"train it further: cdm train --from-best {result.sweep_dir} [--set train.steps=…]")
