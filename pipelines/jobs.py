"""`cdm jobs list|status|logs|stop`: the jobs on a Ray cluster, through the same client as `cdm submit`."""

from __future__ import annotations

import sys
from datetime import datetime
from typing import Any, Optional

import typer

from pipelines.jobs_api import TERMINAL_STATUSES, connect, job_info, outcome_line, stream_logs, wait_until_done
from pipelines.submit import EXIT_INTERRUPTED, EXIT_JOB_FAILED

jobs_app = typer.Typer(
    help="List, inspect, follow and stop jobs on a Ray cluster (the Jobs API at --address or $RAY_ADDRESS).",
    no_args_is_help=True,
)

_ADDRESS = typer.Option(None, "--address", help="Jobs API of the head (default: $RAY_ADDRESS or http://127.0.0.1:8265).")


def _when(ms: Optional[int]) -> str:
    return datetime.fromtimestamp(ms / 1000).strftime("%Y-%m-%d %H:%M:%S") if ms else "-"


def _duration(info: Any) -> str:
    if not info.start_time:
        return "-"
    end = info.end_time or datetime.now().timestamp() * 1000
    seconds = int((end - info.start_time) / 1000)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


@jobs_app.command("list")
def list_command(address: Optional[str] = _ADDRESS) -> None:
    """The cluster's jobs, oldest first: id, status, start, duration, entrypoint.

    Example: cdm jobs list --address http://127.0.0.1:8265
    """
    cluster = connect(address)
    with cluster.errors():
        jobs = [j for j in cluster.client.list_jobs() if j.submission_id]  # drivers not submitted as jobs have none
    if not jobs:
        typer.echo(f"no jobs on {cluster.address}")
        return
    jobs.sort(key=lambda j: j.start_time or 0)
    typer.echo(f"{'JOB':<28} {'STATUS':<10} {'STARTED':<19} {'DURATION':>9}  ENTRYPOINT")
    for job in jobs:
        entry = job.entrypoint if len(job.entrypoint) <= 60 else job.entrypoint[:57] + "..."
        typer.echo(f"{job.submission_id:<28} {job.status.value:<10} {_when(job.start_time):<19} {_duration(job):>9}  {entry}")


@jobs_app.command("status")
def status_command(job_id: str = typer.Argument(..., help="The job id `cdm submit` printed."), address: Optional[str] = _ADDRESS) -> None:
    """A job's status, times, entrypoint and Ray's message about it.

    Example: cdm jobs status raysubmit_XYZ
    """
    cluster = connect(address)
    info = job_info(cluster, job_id)
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
def logs_command(
    job_id: str = typer.Argument(..., help="The job id `cdm submit` printed."),
    follow: bool = typer.Option(False, "--follow", "-f", help="Keep streaming until the job ends; exit 1 if it fails."),
    address: Optional[str] = _ADDRESS,
) -> None:
    """Print a job's output (driver stdout and stderr) so far, or follow it to the end.

    Examples:
      cdm jobs logs raysubmit_XYZ
      cdm jobs logs --follow raysubmit_XYZ
    """
    cluster = connect(address)
    if not follow:
        with cluster.errors(job_id):
            sys.stdout.write(cluster.client.get_job_logs(job_id))
        return
    try:
        stream_logs(cluster, job_id, write=lambda text: (sys.stdout.write(text), sys.stdout.flush()))
        wait_until_done(cluster, job_id)
    except KeyboardInterrupt:
        typer.echo(f"\nstopped following; job {job_id} keeps running", err=True)
        raise typer.Exit(EXIT_INTERRUPTED) from None
    info = job_info(cluster, job_id)
    typer.echo(outcome_line(info), err=True)
    if str(info.status.value) != "SUCCEEDED":
        raise typer.Exit(EXIT_JOB_FAILED)


@jobs_app.command("stop")
def stop_command(
    job_id: str = typer.Argument(..., help="The job id `cdm submit` printed."),
    wait: bool = typer.Option(True, "--wait/--no-wait", help="Wait until the job has stopped."),
    address: Optional[str] = _ADDRESS,
) -> None:
    """Stop a running job (Ray sends its driver SIGTERM, then SIGKILL).

    Example: cdm jobs stop raysubmit_XYZ
    """
    cluster = connect(address)
    status = str(job_info(cluster, job_id).status.value)
    if status in TERMINAL_STATUSES:
        typer.echo(f"job {job_id} already ended: {status}")
        return
    with cluster.errors(job_id):
        cluster.client.stop_job(job_id)
    if wait:
        status = wait_until_done(cluster, job_id)
        typer.echo(f"job {job_id} {status}")
    else:
        typer.echo(f"stopping job {job_id}")
