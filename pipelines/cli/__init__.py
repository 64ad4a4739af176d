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
import time
import traceback
import warnings
from importlib.metadata import version as dist_version

import typer

from pipelines.cli import classify, cluster, data, env, evaluate, train, tune, workflow
from pipelines.common import console, signals
from pipelines.common.errors import UserError

app = typer.Typer(
    name="cdm",
    help="Train, tune and evaluate classification diffusion models on Ray, tracked in MLflow.",
    no_args_is_help=True,
    epilog=env.help_epilog(),
    pretty_exceptions_enable=False,
)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(dist_version("cdm"))
        raise typer.Exit()


@app.callback()
def _main(
    _version: bool = typer.Option(
        False, "--version", is_eager=True, callback=_print_version, help="Print the cdm version and exit."
    ),
    debug: bool = typer.Option(False, "--debug", envvar="CDM_DEBUG", help="Show full tracebacks for errors."),
    verbose: bool = typer.Option(
        False,
        "--verbose",
        envvar="CDM_VERBOSE",
        help="Show Ray's, MLflow's and the libraries' output live (by default it goes to cdm.log in the run's "
        "folder); also accepted after the command.",
    ),
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


def reference() -> list[dict]:
    """Every command, its help and its parameters as `--help` shows them: docs/generate.py writes the
    command-line reference from this (typer stays in this package)."""
    out = []

    def walk(command, ctx) -> None:
        params = []
        for param in command.params:
            if param.hidden or param.name == "help":
                continue
            names, help_text = param.get_help_record(ctx) or (param.name, param.help or "")
            envvar = param.envvar if isinstance(param.envvar, (str, type(None))) else ", ".join(param.envvar)
            default = None if callable(param.default) or param.default in ((), []) else param.default
            params.append(
                {
                    "name": names,
                    "kind": param.param_type_name,
                    "type": param.display_type(ctx).strip("<>"),
                    "required": bool(param.required),
                    "default": default,
                    "envvar": envvar,
                    "help": param.help or "",
                }
            )
        out.append({"path": ctx.command_path, "help": command.help or "", "params": params})
        for name, sub in getattr(command, "commands", {}).items():
            if not sub.hidden:
                walk(sub, typer.Context(sub, info_name=name, parent=ctx))

    root = typer.main.get_command(app)
    walk(root, typer.Context(root, info_name="cdm"))
    return out


_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_show_warning = warnings.showwarning


def _warning_line(message, category, filename, lineno, file=None, line=None) -> None:
    """cdm's own warnings as one line, not Python's `file:line: UserWarning:` with a line of source."""
    if issubclass(category, UserWarning) and os.path.abspath(filename).startswith(_PACKAGE):
        console.warn(f"warning: {message}")
    else:
        _show_warning(message, category, filename, lineno, file, line)


# The commands that start Ray or write to MLflow: their libraries' output goes to a log, not the console.
_QUIET_COMMANDS = {
    "prepare",
    "verify",
    "train",
    "tune",
    "sample",
    "nll",
    "ood",
    "fid",
    "train-features",
    "classify",
    "run",
}


def _capture_for(argv: list[str]) -> bool:
    """Take `--verbose` out of argv (wherever it is, before a `--`); start the log if the command is a quiet one.

    The log starts in the temporary folder and moves into the run's folder once a stage knows it
    (`console.place_log`).
    """
    head = argv.index("--") if "--" in argv else len(argv)
    verbose = "--verbose" in argv[:head] or env.is_on("CDM_VERBOSE")
    argv[:head] = [a for a in argv[:head] if a != "--verbose"]
    command = next((a for a in argv[1:head] if not a.startswith("-")), None)
    if verbose or command not in _QUIET_COMMANDS or {"--help", "-h"} & set(argv[:head]):
        return False
    stamp = time.strftime("%Y%m%d-%H%M%S")
    log = console.log_folder() / f"cdm-{command}-{stamp}-{os.getpid()}.log"
    return console.capture_library_output(log)


def _say(message: str, color: str) -> None:
    typer.secho(message, file=console.terminal_err(), fg=color)


def _log_hint() -> str:
    log = console.log_path()
    return f" (Ray's, MLflow's and the libraries' output: {log}; `--verbose` shows it live)" if log else ""


def main() -> None:
    """Console entry point: user mistakes get a message and exit code, not a traceback."""
    warnings.showwarning = _warning_line
    signals.install()  # SIGTERM (kill, Kubernetes, Slurm, `cdm jobs stop`) ends a command as Ctrl-C does
    captured = _capture_for(sys.argv)
    try:
        # A quiet command's stderr is the log, where typer would print a usage error: typer hands it back here
        # instead (standalone_mode=False), and so it returns exit codes rather than exiting with them.
        code = app(standalone_mode=not captured)
        if captured and isinstance(code, int) and code:
            sys.exit(code)
    except typer.TyperException as err:  # a usage error (typer's click), only while captured
        ctx = getattr(err, "ctx", None)
        where = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
        _say(f"error: {err.format_message()}{where}", typer.colors.RED)
        sys.exit(getattr(err, "exit_code", 2))
    except UserError as err:
        if env.is_on("CDM_DEBUG") and not captured:
            raise
        if env.is_on("CDM_DEBUG"):
            traceback.print_exc(file=console.terminal_err())
        _say(f"error: {err}", typer.colors.RED)
        sys.exit(err.exit_code)
    except (KeyboardInterrupt, SystemExit) as stop:
        # Typer turns a KeyboardInterrupt inside a command into a silent exit 130.
        if isinstance(stop, SystemExit) and stop.code != 130:
            raise
        if env.is_on("CDM_DEBUG") and isinstance(stop, KeyboardInterrupt):
            raise
        _say(
            "interrupted: what was finished is kept (a training run continues with `cdm train --resume RUN`, "
            "a workflow with the same `cdm run` command)",
            typer.colors.YELLOW,
        )
        sys.exit(130)
    except Exception as err:
        if not captured:
            raise
        # The traceback goes to the log with everything else; the console gets the cause in one line.
        traceback.print_exc()
        if env.is_on("CDM_DEBUG"):
            traceback.print_exc(file=console.terminal_err())
        _say(f"error: {type(err).__name__}: {_cause(err)}", typer.colors.RED)
        _say(f"the traceback is in the log{_log_hint()}", typer.colors.RED)
        sys.exit(1)


def _cause(err: BaseException, lines: int = 8) -> str:
    """The exception's message, cut to its first line and its last `lines`: a Ray error carries the worker's whole
    traceback in its message, and what went wrong is at its end."""
    text = [line for line in str(err).strip().splitlines() if line.strip()]
    if len(text) <= lines + 1:
        return "\n".join(text)
    return "\n".join([text[0], "  …", *text[-lines:]])
