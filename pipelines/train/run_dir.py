"""A training run's folder: `<run.storage_path>/<run.name>/` (a local folder or any pyarrow URI).

cdm_run.json            the resolved config, the data shape and the MLflow run
checkpoint_00005000/    Ray Train checkpoints, each holding checkpoint.pt
…                       (the cdm_core format; see pipelines.common.checkpoints)
checkpoint_manager_snapshot.json   Ray's list of checkpoints (used to resume)
"""

from __future__ import annotations

import re
from typing import Any

from cdm_core.checkpoint import load_checkpoint
from pipelines.common import storage
from pipelines.common.checkpoints import CHECKPOINT_FILENAME
from pipelines.common.errors import UserError
from pipelines.common.tracking import folder_recorded_by_run

RUN_FILE = "cdm_run.json"
RUN_FORMAT = "cdm-train-run/1"
# checkpoint_00005000, or checkpoint_00005000-b20261201130812 for a continuation from an older checkpoint.
_CHECKPOINT_DIR = re.compile(r"checkpoint_(\d+)(-b\d{14})?")


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


def checkpoint_names(run_dir: str, latest: str | None = None) -> list[str]:
    """The run's checkpoint folders, newest first: `latest` (the run's own record of its last one), then by step.

    After a continuation from an older checkpoint, the line it left keeps higher steps than the new
    line's first checkpoints, so the run's record, not the step, says which is its latest.
    """
    names = [n for n in storage.resolve(run_dir).list_folders() if _CHECKPOINT_DIR.fullmatch(n)]
    names.sort(key=lambda n: (checkpoint_step(n), _CHECKPOINT_DIR.fullmatch(n).group(2) or ""), reverse=True)
    if latest in names:
        names.remove(latest)
        names.insert(0, latest)
    return names


def checkpoint_step(name: str) -> int:
    return int(_CHECKPOINT_DIR.fullmatch(name).group(1))


def load_run_checkpoint(run_dir: str, name: str) -> dict[str, Any]:
    """Checkpoint `name` of the run, on the CPU; ValueError if it is missing, truncated or not a cdm checkpoint."""
    folder = storage.resolve(storage.join(run_dir, name))
    if not folder.exists(CHECKPOINT_FILENAME):
        raise ValueError(f"{folder.where(CHECKPOINT_FILENAME)} is missing")
    try:
        with folder.open_seekable(CHECKPOINT_FILENAME) as f:
            return load_checkpoint(f, map_location="cpu", name=folder.where(CHECKPOINT_FILENAME))
    except OSError as err:
        raise ValueError(f"{folder.where(CHECKPOINT_FILENAME)} cannot be read ({err})") from None


def first_loadable(run_dir: str, names: list[str]) -> tuple[str | None, dict[str, Any] | None, list[str]]:
    """(name, checkpoint) of the first of `names` that loads, and why each one before it did not."""
    skipped = []
    for name in names:
        try:
            return name, load_run_checkpoint(run_dir, name), skipped
        except ValueError as err:
            skipped.append(f"{name}: {str(err).split('; expected')[0]}")
    return None, None, skipped
