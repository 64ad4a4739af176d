"""A training run's folder: `<run.storage_path>/<run.name>/` (a local folder or any pyarrow URI).

cdm_run.json            the resolved config, the data shape and the MLflow run
checkpoint_00005000/    Ray Train checkpoints, each holding checkpoint.pt
…                       (the cdm_core format; see pipelines.common.checkpoints)
checkpoint_manager_snapshot.json   Ray's list of checkpoints (used to resume)
"""

from __future__ import annotations

from typing import Any

from pipelines.common import storage
from pipelines.common.errors import UserError
from pipelines.common.tracking import folder_recorded_by_run

RUN_FILE = "cdm_run.json"
RUN_FORMAT = "cdm-train-run/1"


def read_run_file(run_dir: str) -> dict[str, Any] | None:
    """The run's `cdm_run.json`, or None if the run never started (or `run_dir` is no run)."""
    return storage.read_json(storage.join(run_dir, RUN_FILE))


def write_run_file(run_dir: str, info: dict[str, Any]) -> None:
    storage.write_json(storage.join(run_dir, RUN_FILE), info)


def find_run_dir(run: str, tracking_uri: str | None = None) -> str:
    """RUN as given to --resume: a run folder (path or URI) or an MLflow run id of a train run."""
    if storage.exists(run) and read_run_file(storage.absolute(run)) is not None:
        return storage.absolute(run)
    folder = folder_recorded_by_run(
        run, "cdm.checkpoint_dir", tracking_uri=tracking_uri, label=f"--resume {run}", kind="a cdm train run"
    )
    if folder is not None:
        return folder
    raise UserError(
        f"--resume {run}: not a run folder with {RUN_FILE} (give the folder printed at the start of the run, "
        "or its MLflow run id)"
    )
