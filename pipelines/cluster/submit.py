"""`cdm submit`: run any command (usually `cdm run CONFIG`) as a Ray job on a cluster.

The job goes through the Ray Jobs API with a runtime_env: the working
directory (uploaded; .gitignore'd files and the usual heavy folders are left
out), pip requirements, this checkout's packages if asked, and environment
variables. MLFLOW_TRACKING_URI travels with the job so its runs land in the
same tracking store as local ones.
"""

from __future__ import annotations

import os
import re
import shlex
import sys
from importlib.metadata import version
from pathlib import Path
from typing import Any

import yaml
from ray.runtime_env import RuntimeEnv

import cdm_core
import pipelines
from pipelines.cluster.jobs_api import (
    EXIT_INTERRUPTED,
    EXIT_JOB_FAILED,
    RECONNECT_S,
    Cluster,
    is_loopback,
    job_info,
    outcome_line,
    stream_logs,
    wait_until_done,
)
from pipelines.common.console import echo
from pipelines.common.errors import UserError
from pipelines.common.tracking import default_tracking_uri

# Never worth uploading: environments, VCS data, local tracking stores, run outputs.
DEFAULT_EXCLUDES = [
    ".git",
    ".venv",
    "venv",
    "__pycache__",
    ".pytest_cache",
    "outputs",
    "mlruns",
    "mlartifacts",
    "mlflow.db",
]
# Forwarded when set locally (no secrets: runtime_env values are visible in the dashboard).
# The object store's endpoint and region travel too (MinIO, a local S3); its credentials never do.
FORWARDED_ENV = (
    "MLFLOW_TRACKING_URI",
    "MLFLOW_EXPERIMENT_NAME",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "MLFLOW_S3_ENDPOINT_URL",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
)
# The token authenticates us to the cluster; copying it into the job would publish it.
_NEVER_FORWARD = ("RAY_AUTH_TOKEN",)

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def entrypoint_command(words: list[str]) -> str:
    """The shell command the cluster runs: words re-quoted, or one pre-quoted string as is."""
    if not words:
        raise UserError("give the command to run after `--`, e.g. cdm submit -- cdm run configs/demo.toml")
    return words[0] if len(words) == 1 else shlex.join(words)


def parse_env(pairs: list[str], environ: dict[str, str] | None = None) -> dict[str, str]:
    """KEY=VALUE pairs; a bare KEY takes this machine's value (like `docker run -e KEY`)."""
    env = os.environ if environ is None else environ
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not _ENV_NAME.fullmatch(key):
            raise UserError(f"--env {pair!r}: expected KEY=VALUE with KEY a variable name (letters, digits, _)")
        if not sep:
            if key not in env:
                raise UserError(f"--env {key}: {key} is not set here; give a value with --env {key}=VALUE")
            value = env[key]
        out[key] = value
    return out


def load_runtime_env_file(path: str | None) -> dict[str, Any]:
    """A runtime_env YAML (e.g. cluster/runtime_env.yaml), or {} when no file is given."""
    if not path:
        return {}
    try:
        loaded = yaml.safe_load(Path(path).read_text())
    except OSError as err:
        raise UserError(f"--runtime-env {path}: {err.strerror}") from None
    except yaml.YAMLError as err:
        raise UserError(f"--runtime-env {path}: not valid YAML ({err})") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise UserError(
            f"--runtime-env {path}: expected a mapping of runtime_env fields (working_dir, pip, env_vars, …)"
        )
    unknown = sorted(set(loaded) - RuntimeEnv.known_fields)
    if unknown:
        raise UserError(
            f"--runtime-env {path}: unknown field(s) {', '.join(unknown)}; Ray knows {', '.join(sorted(k for k in RuntimeEnv.known_fields if not k.startswith('_')))}"
        )
    return loaded


def build_runtime_env(
    working_dir: str | None,
    pip: list[str],
    env_vars: dict[str, str],
    with_package: bool = False,
    base: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The runtime_env Ray receives: `base` (a template file) with the command-line options on top.

    Paths are resolved and checked here, where the user can still fix them.
    `working_dir=None` keeps the template's (else "."); "" means none.
    """
    runtime_env: dict[str, Any] = dict(base or {})
    chosen_dir = runtime_env.pop("working_dir", ".") if working_dir is None else working_dir
    runtime_env.pop("working_dir", None)
    if chosen_dir:
        if "://" in chosen_dir:  # already packaged (s3://…/pkg.zip, https://…): Ray fetches it
            runtime_env["working_dir"] = chosen_dir
        else:
            path = Path(chosen_dir).expanduser().resolve()
            if not path.is_dir():
                raise UserError(f"working dir {chosen_dir}: no such directory")
            runtime_env["working_dir"] = str(path)
            runtime_env["excludes"] = list(dict.fromkeys(list(runtime_env.get("excludes") or []) + DEFAULT_EXCLUDES))
    if pip:
        template_pip = runtime_env.get("pip")
        if template_pip and not isinstance(template_pip, list):
            raise UserError(
                "--pip adds to a list of requirements, but the runtime_env file's `pip` is not a list; put them in one place"
            )
        # One existing requirements file is passed as a path (Ray reads it here); anything else is a list of specs.
        if not template_pip and len(pip) == 1 and pip[0].endswith(".txt") and Path(pip[0]).is_file():
            runtime_env["pip"] = str(Path(pip[0]).resolve())
        else:
            runtime_env["pip"] = list(template_pip or []) + list(pip)
    if with_package:
        # Ships this checkout's source, ahead of any cdm installed in the cluster's image.
        shipped = [str(Path(m.__file__).parent) for m in (cdm_core, pipelines)]
        runtime_env["py_modules"] = list(runtime_env.get("py_modules") or []) + shipped
    merged_env = {str(k): v for k, v in (runtime_env.get("env_vars") or {}).items()}
    merged_env.update(env_vars)
    for key in _NEVER_FORWARD:
        if key in merged_env:
            raise UserError(
                f"the job's env_vars hold {key}: the cluster token must not travel with a job (anyone who can list jobs would see it)"
            )
    if merged_env:
        runtime_env["env_vars"] = merged_env
    _validate(runtime_env)
    return runtime_env


def _validate(runtime_env: dict[str, Any]) -> None:
    """Ray's own type checks, run before anything is uploaded."""
    try:
        RuntimeEnv(**runtime_env)
    except (TypeError, ValueError) as err:
        raise UserError(f"invalid runtime_env: {err}") from None


def job_env_vars(
    address: str, explicit: dict[str, str], workdir: Path, environ: dict[str, str] | None = None
) -> tuple[dict[str, str], list[str]]:
    """Explicit --env values, plus forwarded ones; returns (vars, notes for the user).

    On a cluster on this machine with no MLFLOW_TRACKING_URI, the job gets this
    directory's SQLite store, so `cdm ui` here shows the job's runs (the job
    itself runs in an uploaded copy of the working directory, whose own
    mlflow.db would vanish with it).
    """
    env = os.environ if environ is None else environ
    out = dict(explicit)
    notes = []
    for key in FORWARDED_ENV:
        if key in env and key not in out:
            out[key] = env[key]
            notes.append(f"forwarding {key} from this shell")
    if "MLFLOW_TRACKING_URI" not in out and is_loopback(address):
        out["MLFLOW_TRACKING_URI"] = default_tracking_uri(workdir)
        notes.append(f"MLflow runs go to {out['MLFLOW_TRACKING_URI']} (`cdm ui` shows them)")
    return out, notes


def submit_job(
    cluster: Cluster,
    entrypoint: str,
    runtime_env: dict[str, Any],
    submission_id: str | None = None,
) -> str:
    metadata = {"job_name": entrypoint[:100], "submitted_by": "cdm submit", "cdm_version": version("cdm")}
    with cluster.errors():
        try:
            return cluster.client.submit_job(
                entrypoint=entrypoint, runtime_env=runtime_env, submission_id=submission_id, metadata=metadata
            )
        except (ValueError, FileNotFoundError) as err:
            # Ray validates the runtime_env here: an oversized working dir, a bad pip spec, a missing file.
            raise UserError(f"the job's runtime_env was refused: {err}") from None
        except RuntimeError as err:
            if "status code 400" in str(err) or "already exists" in str(err):
                raise UserError(f"the cluster refused the job: {err}") from None
            raise


def follow_to_end(cluster: Cluster, job_id: str, reconnect_s: float = RECONNECT_S) -> int:
    """Stream the logs until the job ends; print the outcome; return the exit code for it."""
    try:
        stream_logs(
            cluster, job_id, write=lambda text: (sys.stdout.write(text), sys.stdout.flush()), reconnect_s=reconnect_s
        )
        wait_until_done(cluster, job_id)
    except KeyboardInterrupt:
        echo(
            f"\nstopped following; job {job_id} keeps running. "
            f"Follow: cdm jobs logs --follow {job_id}   Stop: cdm jobs stop {job_id}",
            err=True,
        )
        return EXIT_INTERRUPTED
    info = job_info(cluster, job_id)
    echo(outcome_line(info), err=True)
    return 0 if str(info.status.value) == "SUCCEEDED" else EXIT_JOB_FAILED
