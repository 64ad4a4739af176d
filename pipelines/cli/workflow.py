"""`cdm run`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from pipelines.common import config as cfg
from pipelines.common.errors import UserError
from pipelines.workflow.config import describe, load


def run(
    config: Optional[Path] = typer.Argument(None, help="Workflow config: configs/demo.toml or configs/run/*.toml."),
    set_: list[str] = typer.Option(
        [],
        "--set",
        help="Override a setting, stage name first: --set train.train.steps=2000, "
        "--set sample.steps=25, --set prepare.path=~/cifar-10-python.tar.gz (repeatable).",
    ),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Print the plan (each stage, its key and output, run or skip) and exit."
    ),
    # Text, not a Path: a Path would turn `s3://bucket/x` into the local `s3:/bucket/x` before the plan could refuse it.
    workdir: str = typer.Option(
        ".",
        "--workdir",
        help="Project folder: DIR/mlflow.db is the default MLflow store, "
        "DIR/outputs/stages/ holds the stage outputs. On a cluster: shared storage.",
    ),
    tracking_uri: Optional[str] = typer.Option(
        None,
        "--tracking-uri",
        # No envvar=: the config's [tracking] tracking_uri beats $MLFLOW_TRACKING_URI, the flag beats both.
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///WORKDIR/mlflow.db).",
    ),
    rerun: list[str] = typer.Option(
        [],
        "--rerun",
        metavar="STAGE",
        help="Run this done stage again, and every stage that reads it (its output is moved aside, not deleted): "
        "a stage of the plan (train, sample-ddim50) or a kind (sample: every protocol's). Repeatable.",
    ),
    rerun_stale: bool = typer.Option(
        False,
        "--rerun-stale",
        help="Run again the done stages that ran on other code (the plan marks them stale), and every stage "
        "that reads them. Without it they are kept, with a warning.",
    ),
    print_config: bool = typer.Option(
        False, "--print-config", help="Print the workflow config with overrides, as JSON, and exit."
    ),
    list_settings: bool = typer.Option(False, "--list-settings", help="List every setting with its type and default."),
) -> None:
    """Run the whole pipeline: prepare → train → sample → NLL and FD/FID, resumable, one MLflow parent run.

    Every stage's output is addressed by a hash of its settings and inputs, so running the same
    command again skips finished stages and continues an interrupted one (training from its
    latest checkpoint). A finished stage whose code has changed since is stale: kept, with a
    warning, until --rerun-stale or --rerun STAGE asks for it again.

    Examples:
      cdm run configs/demo.toml
      cdm run configs/demo.toml --dry-run
      cdm run configs/demo.toml --rerun-stale --dry-run
      cdm run configs/demo.toml --rerun nll
      cdm run configs/run/cifar10.toml --set prepare.path=~/cifar-10-python.tar.gz --workdir /shared/cdm
      cdm run configs/run/mnist.toml --set train.train.steps=5000 --set sample.n=1000
    """
    if list_settings:
        for key, kind, default, doc in describe():
            typer.echo(f"{key:34} {kind:32} {default!s:14} {doc}")
        return
    if config is None:
        raise UserError("cdm run needs a workflow CONFIG (e.g. configs/demo.toml); see `cdm run --help`")
    if print_config:
        loaded, _ = load(config, set_)
        typer.echo(json.dumps(cfg.to_dict(loaded), indent=2))
        return
    # Deferred: the runner imports every stage, and with them torch, Ray and MLflow (seconds).
    from pipelines.workflow import runner

    if dry_run:
        plan, uri = runner.prepare_plan(config, set_, workdir=workdir, tracking_uri=tracking_uri, strict=False)
        runner.print_plan(plan, uri, runner.decide(plan, rerun, rerun_stale))
        return
    runner.run_workflow(config, set_, workdir=workdir, tracking_uri=tracking_uri, rerun=rerun, rerun_stale=rerun_stale)
