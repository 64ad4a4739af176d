"""MLflow tracking shared by every stage: where the store is, and one run per stage.

MLflow 3.x deprecates the file store, so the default is a SQLite database in the
work directory with artifacts in `mlartifacts/` beside it (the same layout
`mlflow server` uses). `MLFLOW_TRACKING_URI` or an explicit URI points the
stages at a tracking server instead.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Param
from mlflow.tracking import MlflowClient

from pipelines.common.config import TrackingSection
from pipelines.common.errors import UserError

# MLflow rejects longer parameter values (mlflow.utils.validation.MAX_PARAM_VAL_LENGTH).
_MAX_PARAM_LENGTH = 6000
# and more than this many params/tags in one log_batch call.
_BATCH = 100


# A SQLite store makes a writer wait up to 20 s for another's lock (MLflow's setting), then fails the write.
# Writers that must not lose a write (the training loop, a sweep's tracker) keep trying, backing off, this long.
LOCKED_RETRY_S = 300.0


def _locked(err: BaseException) -> bool:
    return "database is locked" in str(err)


class PatientClient:
    """An `MlflowClient` whose calls are tried again while a SQLite store says it is locked.

    Many processes write to one SQLite file when `cdm tune` runs trials side by side; a lock held
    longer than SQLite's wait (a long query from the UI, a copy of the file, a slow shared disk)
    would otherwise fail a training step's metrics and with them the run.
    """

    def __init__(self, tracking_uri: str, retry_s: float = LOCKED_RETRY_S):
        self._client = MlflowClient(tracking_uri=tracking_uri)
        self._retry_s = retry_s

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._client, name)
        if not callable(method):
            return method

        def patient(*args: Any, **kwargs: Any) -> Any:
            deadline, delay = time.monotonic() + self._retry_s, 0.5
            while True:
                try:
                    return method(*args, **kwargs)
                except Exception as err:  # MLflow wraps sqlite3.OperationalError in MlflowException
                    if not _locked(err) or time.monotonic() > deadline:
                        raise
                    time.sleep(delay)
                    delay = min(2 * delay, 10.0)

        return patient


def default_tracking_uri(workdir: str | os.PathLike = ".") -> str:
    """`MLFLOW_TRACKING_URI` if set, else `sqlite:///<absolute workdir>/mlflow.db`."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{Path(workdir).resolve() / 'mlflow.db'}"


def store_uri(tracking: TrackingSection) -> str:
    """The MLflow store a stage with these settings logs to."""
    return tracking.tracking_uri or default_tracking_uri(tracking.workdir)


def folder_recorded_by_run(value: str, tag: str, *, tracking_uri: str | None, label: str, kind: str) -> str | None:
    """If `value` looks like an MLflow run id: the folder that run recorded in tag `tag`; else None.

    For commands that take a stage's folder or its MLflow run id (`cdm train --resume`, `--from-best`).
    A run id that is not in the store, or whose run is not `kind`, is a UserError starting with `label`.
    """
    if not re.fullmatch(r"[0-9a-f]{32}", value):
        return None
    try:
        tags = MlflowClient(tracking_uri or default_tracking_uri()).get_run(value).data.tags
    except Exception as err:
        raise UserError(f"{label}: no such MLflow run ({type(err).__name__})") from None
    if tag not in tags:
        raise UserError(f"{label}: that MLflow run is not {kind} (no {tag} tag)")
    return tags[tag]


def artifact_location_for(tracking_uri: str) -> str | None:
    """`<dir of the db>/mlartifacts` for a local SQLite store; None (server default) otherwise."""
    prefix = "sqlite:///"
    if tracking_uri.startswith(prefix):
        db = Path(tracking_uri[len(prefix) :])
        if db.is_absolute():  # sqlite:////abs/path → "/abs/path"; sqlite:///rel → "rel"
            return (db.parent / "mlartifacts").as_uri()
        return (Path.cwd() / db).parent.joinpath("mlartifacts").resolve().as_uri()
    return None


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested dicts become dotted keys (`model.channels`); values become strings MLflow accepts."""
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_params(value, prefix=f"{name}."))
            continue
        text = "None" if value is None else str(value)
        if len(text) > _MAX_PARAM_LENGTH:
            text = text[: _MAX_PARAM_LENGTH - 3] + "..."
        flat[name] = text
    return flat


def log_params(client: Any, run_id: str, params: Mapping[str, Any]) -> None:
    """`params` (flattened) on run `run_id`, in batches of the size MLflow accepts."""
    flat = [Param(k, v) for k, v in flatten_params(params).items()]
    for start in range(0, len(flat), _BATCH):
        client.log_batch(run_id, params=flat[start : start + _BATCH])


def _ensure_experiment(client: Any, name: str, tracking_uri: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        if experiment.lifecycle_stage == "deleted":
            client.restore_experiment(experiment.experiment_id)
        return experiment.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location_for(tracking_uri))
    except Exception:
        # Another process created it between our lookup and create.
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


def experiment_id(name: str, tracking_uri: str) -> str:
    """The id of MLflow experiment `name` in the store, created (artifacts as `artifact_location_for` says) if missing."""
    return _ensure_experiment(MlflowClient(tracking_uri=tracking_uri), name, tracking_uri)


@contextlib.contextmanager
def using_tracking_uri(tracking_uri: str) -> Iterator[None]:
    """MLflow's fluent API (`mlflow.log_*`) on `tracking_uri` for the block, and as before after it.

    `mlflow.set_tracking_uri` also writes MLFLOW_TRACKING_URI into os.environ, which
    `default_tracking_uri` honours: left there, one stage's store would become the next
    stage's default in a long-lived process (a notebook calling stages with different
    workdirs, a test session).
    """
    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(tracking_uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before)  # None unsets the variable


@contextlib.contextmanager
def mlflow_run(
    experiment: str,
    run_name: str,
    tracking_uri: str,
    params: Mapping[str, Any] | None = None,
    tags: Mapping[str, Any] | None = None,
    parent_run_id: str | None = None,
) -> Iterator[Any]:
    """Start an MLflow run, log `params` (flattened), yield the active run.

    The run is nested under `parent_run_id` when given (or under a run already
    active in this process). It always ends: FAILED if an exception escapes the
    block, FINISHED otherwise — never left RUNNING.
    """
    client = MlflowClient(tracking_uri=tracking_uri)
    with using_tracking_uri(tracking_uri):
        experiment_id = _ensure_experiment(client, experiment, tracking_uri)
        nested = parent_run_id is not None or mlflow.active_run() is not None
        run = mlflow.start_run(
            experiment_id=experiment_id,
            run_name=run_name,
            nested=nested,
            parent_run_id=parent_run_id,
            tags={str(k): str(v) for k, v in (tags or {}).items()},
        )
        run_id = run.info.run_id
        status = "FAILED"
        try:
            log_params(client, run_id, params or {})
            yield run
            status = "FINISHED"
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM (`cdm jobs stop`): the run was stopped, it did not fail
            status = "KILLED"
            raise
        finally:
            active = mlflow.active_run()
            if active is not None and active.info.run_id == run_id:
                mlflow.end_run(status=status)
            else:  # the block ended our run itself, or left a child run active on top of it
                client.set_terminated(run_id, status=status)


@contextlib.contextmanager
def reopened_run(tracking_uri: str, run_id: str) -> Iterator[Any]:
    """Continue an existing MLflow run (a resumed stage); it ends FAILED if an exception escapes, FINISHED otherwise."""
    with using_tracking_uri(tracking_uri):
        run = mlflow.start_run(run_id=run_id)
        status = "FAILED"
        try:
            yield run
            status = "FINISHED"
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM (`cdm jobs stop`): the run was stopped, it did not fail
            status = "KILLED"
            raise
        finally:
            mlflow.end_run(status=status)
