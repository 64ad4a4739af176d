"""`cdm submit`, `cdm jobs list|status|logs|stop` and `cdm ui`: a Ray cluster's Jobs API and the MLflow UI.

The client modules are imported inside the commands: Ray's job client and
MLflow take about a second to load, which `cdm --help` should not wait for.
"""

from __future__ import annotations

import sys
from datetime import datetime
from pathlib import Path
from typing import Any, Optional

import typer

_RECONNECT_S = typer.Option(
    120.0,
    "--reconnect-s",
    min=0,
    help="When the Jobs API is lost while following (a restarted dashboard), keep trying this many seconds; "
    "nothing is printed twice.",
)

jobs_app = typer.Typer(
    help="List, inspect, follow and stop jobs on a Ray cluster (the Jobs API at --address or $RAY_ADDRESS).",
    no_args_is_help=True,
)

# RAY_API_SERVER_ADDRESS first, as Ray's own job CLI reads them.
_ADDRESS_ENV = ["RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"]
_ADDRESS = typer.Option(
    None,
    "--address",
    envvar=_ADDRESS_ENV,
    help="Jobs API of the head (default: $RAY_API_SERVER_ADDRESS, $RAY_ADDRESS or http://127.0.0.1:8265).",
)


def _when(ms: Optional[int]) -> str:
    return datetime.fromtimestamp(ms / 1000).strftime("%Y-%m-%d %H:%M:%S") if ms else "-"


def _duration(info: Any) -> str:
    if not info.start_time:
        return "-"
    end = info.end_time or datetime.now().timestamp() * 1000
    seconds = int((end - info.start_time) / 1000)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


@jobs_app.command("list")
def list_jobs(address: Optional[str] = _ADDRESS) -> None:
    """The cluster's jobs, oldest first: id, status, start, duration, entrypoint.

    Example: cdm jobs list --address http://127.0.0.1:8265
    """
    from pipelines.cluster import jobs_api as api  # deferred: see the module docstring

    cluster = api.connect(address)
    with cluster.errors():
        jobs = [j for j in cluster.client.list_jobs() if j.submission_id]  # drivers not submitted as jobs have none
    if not jobs:
        typer.echo(f"no jobs on {cluster.address}")
        return
    jobs.sort(key=lambda j: j.start_time or 0)
    typer.echo(f"{'JOB':<28} {'STATUS':<10} {'STARTED':<19} {'DURATION':>9}  ENTRYPOINT")
    for job in jobs:
        entry = job.entrypoint if len(job.entrypoint) <= 60 else job.entrypoint[:57] + "..."
        typer.echo(
            f"{job.submission_id:<28} {job.status.value:<10} {_when(job.start_time):<19} {_duration(job):>9}  {entry}"
        )


@jobs_app.command("status")
def status(
    job_id: str = typer.Argument(..., help="The job id `cdm submit` printed."), address: Optional[str] = _ADDRESS
) -> None:
    """A job's status, times, entrypoint and Ray's message about it.

    Example: cdm jobs status raysubmit_XYZ
    """
    from pipelines.cluster import jobs_api as api  # deferred: see the module docstring

    cluster = api.connect(address)
    info = api.job_info(cluster, job_id)
    typer.echo(f"job:        {info.submission_id}")
    typer.echo(f"status:     {info.status.value}")
    typer.echo(f"entrypoint: {info.entrypoint}")
    typer.echo(f"started:    {_when(info.start_time)}")
    typer.echo(f"ended:      {_when(info.end_time)}")
    typer.echo(f"duration:   {_duration(info)}")
    env_names = sorted(((info.runtime_env or {}).get("env_vars") or {}).keys())
    if env_names:  # names only: values may hold credentials (a database URI, say)
        typer.echo(f"env vars:   {', '.join(env_names)}")
    if info.message:
        typer.echo(f"message:    {info.message.strip().splitlines()[0]}")


@jobs_app.command("logs")
def logs(
    job_id: str = typer.Argument(..., help="The job id `cdm submit` printed."),
    follow: bool = typer.Option(False, "--follow", "-f", help="Keep streaming until the job ends; exit 1 if it fails."),
    reconnect_s: float = _RECONNECT_S,
    address: Optional[str] = _ADDRESS,
) -> None:
    """Print a job's output (driver stdout and stderr) so far, or follow it to the end.

    Examples:
      cdm jobs logs raysubmit_XYZ
      cdm jobs logs --follow raysubmit_XYZ
      cdm jobs logs --follow --reconnect-s 600 raysubmit_XYZ
    """
    from pipelines.cluster import jobs_api as api  # deferred: see the module docstring

    cluster = api.connect(address)
    if not follow:
        with cluster.errors(job_id):
            sys.stdout.write(cluster.client.get_job_logs(job_id))
        return
    try:
        api.stream_logs(
            cluster, job_id, write=lambda text: (sys.stdout.write(text), sys.stdout.flush()), reconnect_s=reconnect_s
        )
        api.wait_until_done(cluster, job_id)
    except KeyboardInterrupt:
        typer.echo(f"\nstopped following; job {job_id} keeps running", err=True)
        raise typer.Exit(api.EXIT_INTERRUPTED) from None
    info = api.job_info(cluster, job_id)
    typer.echo(api.outcome_line(info), err=True)
    if str(info.status.value) != "SUCCEEDED":
        raise typer.Exit(api.EXIT_JOB_FAILED)


@jobs_app.command("stop")
def stop(
    job_id: str = typer.Argument(..., help="The job id `cdm submit` printed."),
    wait: bool = typer.Option(True, "--wait/--no-wait", help="Wait until the job has stopped."),
    address: Optional[str] = _ADDRESS,
) -> None:
    """Stop a running job (Ray sends its driver SIGTERM, then SIGKILL).

    Example: cdm jobs stop raysubmit_XYZ
    """
    from pipelines.cluster import jobs_api as api  # deferred: see the module docstring

    cluster = api.connect(address)
    status = api.job_info(cluster, job_id).status
    if status.is_terminal():
        typer.echo(f"job {job_id} already ended: {status.value}")
        return
    with cluster.errors(job_id):
        cluster.client.stop_job(job_id)
    if wait:
        status = api.wait_until_done(cluster, job_id)
        typer.echo(f"job {job_id} {status}")
    else:
        typer.echo(f"stopping job {job_id}")


def submit(
    entrypoint: list[str] = typer.Argument(None, metavar="COMMAND", help="The command the job runs, after `--`."),
    address: Optional[str] = _ADDRESS,
    working_dir: Optional[str] = typer.Option(
        None,
        "--working-dir",
        help="Folder uploaded as the job's working directory (default: the --runtime-env file's, else '.'; '' for none).",
    ),
    runtime_env_file: Optional[str] = typer.Option(
        None,
        "--runtime-env",
        help="runtime_env YAML to start from (see cluster/runtime_env.yaml); the other options add to it.",
    ),
    pip: list[str] = typer.Option(
        [], "--pip", help="Pip requirement for the job (repeatable), or one requirements.txt."
    ),
    env: list[str] = typer.Option(
        [], "--env", help="KEY=VALUE for the job's environment (repeatable; bare KEY copies it from here)."
    ),
    with_package: bool = typer.Option(
        False, "--with-package", help="Ship this checkout's cdm_core and pipelines source with the job (py_modules)."
    ),
    submission_id: Optional[str] = typer.Option(
        None, "--submission-id", help="Job id to use instead of a generated one."
    ),
    no_wait: bool = typer.Option(False, "--no-wait", help="Print the job id and return; don't stream the logs."),
    reconnect_s: float = _RECONNECT_S,
) -> None:
    """Submit a command as a Ray job, stream its logs, exit non-zero if it fails.

    Exit codes: 0 the job succeeded; 1 it failed or was stopped; 2 a usage or
    connection problem (cluster unreachable, token missing or wrong); 130 you
    stopped following (the job keeps running).

    Examples:
      cdm submit -- cdm run configs/cifar10.toml
      cdm submit --address http://10.0.0.5:8265 --env WANDB_MODE=offline -- cdm run configs/celeba64.toml
      cdm submit --runtime-env cluster/runtime_env.yaml --no-wait -- cdm run configs/cifar10.toml
    """
    from pipelines.cluster import jobs_api as api  # deferred: see the module docstring
    from pipelines.cluster import submit as submission

    command = submission.entrypoint_command(entrypoint or [])
    url = api.resolve_address(address)
    # Everything checkable here is checked before the cluster is contacted.
    env_vars, notes = submission.job_env_vars(url, submission.parse_env(env), Path.cwd())
    runtime_env = submission.build_runtime_env(
        working_dir, pip, env_vars, with_package=with_package, base=submission.load_runtime_env_file(runtime_env_file)
    )
    cluster = api.connect(url)
    for note in notes:
        typer.echo(note, err=True)
    job_id = submission.submit_job(cluster, command, runtime_env, submission_id)
    typer.echo(job_id)
    typer.echo(
        f"submitted to {cluster.address} (Ray {cluster.ray_version}); dashboard: {cluster.address}/#/jobs/{job_id}",
        err=True,
    )
    if no_wait:
        typer.echo(f"follow with: cdm jobs logs --follow {job_id}", err=True)
        return
    code = submission.follow_to_end(cluster, job_id, reconnect_s)
    if code:
        raise typer.Exit(code)


def ui(
    port: int = typer.Option(5000, "--port", min=1, max=65535, help="Port to serve on."),
    host: str = typer.Option(
        "127.0.0.1", "--host", help="Interface to bind; anything but 127.0.0.1 exposes the UI (it has no login)."
    ),
    workdir: Path = typer.Option(
        Path("."), "--workdir", help="The project folder whose mlflow.db and mlartifacts/ to show."
    ),
    artifacts_destination: str = typer.Option(
        None,
        "--artifacts-destination",
        help="Keep the artifacts clients send at this URI (s3://bucket/mlartifacts) instead of <workdir>/mlartifacts.",
    ),
) -> None:
    """Start the MLflow UI on the project's tracking store; Ctrl-C stops it.

    Examples:
      cdm ui                      # http://127.0.0.1:5000 on ./mlflow.db
      cdm ui --port 5001 --workdir ~/experiments/cdm
      cdm ui --artifacts-destination s3://bucket/mlartifacts
    """
    from pipelines.cluster.ui import serve  # deferred: see the module docstring

    code = serve(port, host, workdir, artifacts_destination)
    if code:
        raise typer.Exit(code)
