"""The `cdm` command line: the only package that imports typer.

One module per command group (data, train, tune, evaluate, workflow, cluster);
this one registers them, so `cdm --help` lists everything in one place. Each
command is thin: it parses its flags, builds the stage's config, calls the
stage's `run(config)` and prints the result. The stages are imported inside the
commands (they load torch, Ray and MLflow), so `cdm --help` answers at once.
"""

from __future__ import annotations

import os
import sys
import warnings
from importlib.metadata import version as dist_version

import typer

from pipelines.cli import classify, cluster, data, evaluate, train, tune, workflow
from pipelines.common.errors import UserError

app = typer.Typer(
    name="cdm",
    help="Train, tune and evaluate classification diffusion models on Ray, tracked in MLflow.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _main(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks for errors."),
) -> None:
    if debug:
        os.environ["CDM_DEBUG"] = "1"


@app.command()
def version() -> None:
    """Print the cdm version.

    Example: cdm version
    """
    typer.echo(dist_version("cdm"))


@app.command()
def info() -> None:
    """Print library versions and the devices this machine can use.

    Example: cdm info
    """
    from pipelines.common.info import collect_info  # deferred: it imports torch

    for key, value in collect_info().items():
        typer.echo(f"{key:>14}: {value}")


@app.command()
def demo(
    out: str = typer.Option("outputs/demo-toy", help="Folder for the scatter plot and results."),
    steps: int = typer.Option(3000, min=1, help="Training steps."),
    seed: int = typer.Option(0, help="Random seed."),
) -> None:
    """Train a small CDM on a 2-D Gaussian mixture; print its NLL next to the true entropy.

    Example: cdm demo --out outputs/demo-toy --steps 3000
    """
    from pipelines.train.toy_demo import run_toy_demo  # deferred: it imports torch

    run_toy_demo(out_dir=out, steps=steps, seed=seed)


# The data stage, training and sweeps.
app.command("prepare")(data.prepare)
app.command("verify")(data.verify)
app.command("train")(train.train)
app.command("tune")(tune.tune)

# The batch stages.
app.command("sample")(evaluate.sample)
app.command("nll")(evaluate.nll)
app.command("ood")(evaluate.ood)
app.command("fid")(evaluate.fid)
app.command("train-features")(evaluate.train_features)
app.command("classify")(classify.classify)

# The workflow that chains the stages.
app.command("run")(workflow.run)

# Clusters and the UI. Everything after the first word of a job's command belongs to that command, not to `cdm submit`.
app.command("submit", context_settings={"allow_interspersed_args": False, "ignore_unknown_options": True})(
    cluster.submit
)
app.add_typer(cluster.jobs_app, name="jobs")
app.command("ui")(cluster.ui)


_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_show_warning = warnings.showwarning


def _warning_line(message, category, filename, lineno, file=None, line=None) -> None:
    """cdm's own warnings as one line, not Python's `file:line: UserWarning:` with a line of source."""
    if issubclass(category, UserWarning) and os.path.abspath(filename).startswith(_PACKAGE):
        typer.secho(f"warning: {message}", err=True, fg=typer.colors.YELLOW)
    else:
        _show_warning(message, category, filename, lineno, file, line)


def main() -> None:
    """Console entry point: user mistakes get a message and exit code, not a traceback."""
    warnings.showwarning = _warning_line
    try:
        app()
    except UserError as err:
        if os.environ.get("CDM_DEBUG"):
            raise
        typer.secho(f"error: {err}", err=True, fg=typer.colors.RED)
        sys.exit(err.exit_code)
    except (KeyboardInterrupt, SystemExit) as stop:
        # Typer turns a KeyboardInterrupt inside a command into a silent exit 130.
        if isinstance(stop, SystemExit) and stop.code != 130:
            raise
        if os.environ.get("CDM_DEBUG") and isinstance(stop, KeyboardInterrupt):
            raise
        typer.secho(
            "interrupted: what was finished is kept (a training run continues with `cdm train --resume RUN`, "
            "a workflow with the same `cdm run` command)",
            err=True,
            fg=typer.colors.YELLOW,
        )
        sys.exit(130)
