"""The `cdm` command line.

Each stage lives in its own module with a typer command; this file only
registers them, so `cdm --help` lists everything in one place. Entry points
stay thin: the work happens in `run(config)` functions the tests call too.
"""

from __future__ import annotations

import os
import sys

import typer

from pipelines.errors import UserError

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
    from importlib.metadata import version as dist_version

    typer.echo(dist_version("cdm"))


@app.command()
def info() -> None:
    """Print library versions and the devices this machine can use.

    Example: cdm info
    """
    from pipelines.info import collect_info

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
    from pipelines.toy_demo import run_toy_demo

    run_toy_demo(out_dir=out, steps=steps, seed=seed)


# The data stage (prepare, verify): command functions live in their own modules.
from pipelines.prepare import prepare_command  # noqa: E402
from pipelines.shards import verify_command  # noqa: E402
from pipelines.train import train_command  # noqa: E402

app.command("prepare")(prepare_command)
app.command("verify")(verify_command)
app.command("train")(train_command)

# The tune stage: a Ray Tune sweep of training runs.
from pipelines.tune import tune_command  # noqa: E402

app.command("tune")(tune_command)

# The batch stages (sample, nll, ood, fid, train-features).
from pipelines.features import train_features_command  # noqa: E402
from pipelines.fid import fid_command  # noqa: E402
from pipelines.nll import nll_command  # noqa: E402
from pipelines.ood import ood_command  # noqa: E402
from pipelines.sample import sample_command  # noqa: E402

app.command("sample")(sample_command)
app.command("nll")(nll_command)
app.command("ood")(ood_command)
app.command("fid")(fid_command)
app.command("train-features")(train_features_command)

# The workflow that chains the stages (run).
from pipelines.workflow import run_command  # noqa: E402

app.command("run")(run_command)

# Clusters and the UI (submit, jobs, ui).
from pipelines.jobs import jobs_app  # noqa: E402
from pipelines.submit import submit_command  # noqa: E402
from pipelines.ui import ui_command  # noqa: E402

# Everything after the first word of the job's command belongs to that command, not to `cdm submit`.
app.command("submit", context_settings={"allow_interspersed_args": False, "ignore_unknown_options": True})(submit_command)
app.add_typer(jobs_app, name="jobs")
app.command("ui")(ui_command)


def main() -> None:
    """Console entry point: user mistakes get a message and exit code, not a traceback."""
    try:
        app()
    except UserError as err:
        if os.environ.get("CDM_DEBUG"):
            raise
        typer.secho(f"error: {err}", err=True, fg=typer.colors.RED)
        sys.exit(err.exit_code)


if __name__ == "__main__":
    main()
