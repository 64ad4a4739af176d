"""`cdm ui`: the MLflow UI on this project's tracking store.

It runs `mlflow server` on the same store every stage writes to
(`sqlite:///<workdir>/mlflow.db`, artifacts in `<workdir>/mlartifacts`, or
MLFLOW_TRACKING_URI when that names a database), bound to 127.0.0.1: the UI
has no login, so exposing it is a decision to make with --host.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Optional

from pipelines.common import storage
from pipelines.common.config import EXPERIMENT
from pipelines.common.console import echo, warn
from pipelines.common.errors import UserError
from pipelines.common.tracking import artifact_location_for, default_tracking_uri, open_store, ui_url

_LOOPBACK = ("127.0.0.1", "localhost", "::1")


def server_command(tracking_uri: str, artifacts_dir: Path | str, host: str, port: int) -> list[str]:
    """The `mlflow server` argv for a database-backed store (artifacts in a folder or at a URI such as s3://…)."""
    return [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", tracking_uri,
        "--artifacts-destination", str(artifacts_dir),
        "--host", host,
        "--port", str(port),
        # One worker: a personal UI on a laptop or a 2-core box doesn't need four.
        "--workers", "1",
    ]  # fmt: skip


def store_for(workdir: Path) -> tuple[str, Path]:
    """(tracking URI, artifacts folder) that `cdm ui` serves for this work directory."""
    uri = default_tracking_uri(workdir)
    if uri.startswith(("http://", "https://", "databricks")):
        raise UserError(
            f"MLFLOW_TRACKING_URI={uri} is a tracking server already; open it in a browser. "
            "`cdm ui` serves a local store (unset MLFLOW_TRACKING_URI to use <workdir>/mlflow.db)."
        )
    if uri.startswith("file:") or "://" not in uri:
        raise UserError(
            f"MLFLOW_TRACKING_URI={uri} is a file store, which MLflow 3 deprecates; "
            "`cdm ui` serves a database store such as sqlite:///path/mlflow.db"
        )
    location = artifact_location_for(uri)
    artifacts = Path(location.removeprefix("file://")) if location else workdir.resolve() / "mlartifacts"
    return uri, artifacts


def _check_port_free(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))
        except OSError as err:
            raise UserError(
                f"cannot listen on {host}:{port} ({err.strerror}); another `cdm ui` or MLflow server may be running there: "
                "pick another port with --port"
            ) from None


def _stop(process: subprocess.Popen) -> None:
    """End the server and the worker processes it started (they share its process group)."""
    for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def serve(
    port: int = 5000, host: str = "127.0.0.1", workdir: Path = Path("."), artifacts_destination: str | None = None
) -> int:
    """Run the MLflow UI on the store of `workdir` until Ctrl-C or SIGTERM; returns the server's exit code.

    `artifacts_destination` (e.g. s3://bucket/mlartifacts) is where the server keeps the artifacts clients
    send it; for s3:// MLflow's boto3 reads the AWS_* variables (and MLFLOW_S3_ENDPOINT_URL for MinIO, moto).
    """
    uri, artifacts = store_for(workdir)
    if artifacts_destination:
        storage.check_writable(artifacts_destination, "--artifacts-destination")
        artifacts = artifacts_destination
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).parent.is_dir():
        raise UserError(f"--workdir {workdir}: no such directory")
    open_store(uri)  # a damaged store is one line now, not a URL that works and two tracebacks from the server
    _check_port_free(host, port)
    if host not in _LOOPBACK:
        warn(
            f"warning: serving on {host}: anyone who can reach it can read and change your runs. MLflow answers only "
            "requests addressed to localhost unless MLFLOW_SERVER_ALLOWED_HOSTS lists the name you browse to (e.g. myhost:5000)."
        )
    shown_host = f"[{host}]" if ":" in host else host
    # MLflow 3 opens an experiment in its GenAI view unless the address asks for the model-training one.
    address = ui_url(uri, EXPERIMENT, base=f"http://{shown_host}:{port}")
    echo(f"MLflow UI: {address}", err=True)
    echo(f"  store: {uri}   artifacts: {artifacts}   (Ctrl-C stops it)", err=True)
    # Its own process group, so stopping reaches the web workers mlflow spawns too.
    env = dict(os.environ)
    # MLflow's background job executor (GenAI scorers, prompt optimisation) is unused here and
    # adds consumer processes and start-up time; a user who wants it sets the variable to true.
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    process = subprocess.Popen(server_command(uri, artifacts, host, port), start_new_session=True, env=env)

    def on_terminate(signum: int, frame: Optional[object]) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_terminate)
    try:
        return process.wait()
    except KeyboardInterrupt:
        _stop(process)
        return 0
    finally:
        signal.signal(signal.SIGTERM, previous)
        if process.poll() is None:
            _stop(process)
