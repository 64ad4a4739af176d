"""A sweep's folder: `<run.storage_path>/<sweep name>/` (a local folder or any pyarrow URI).

cdm_sweep.json    the base config, the sweep file, the MLflow parent run, and (when done) the best trial
tune/             Ray Tune's experiment (its state is what `cdm tune --resume` restores)
trials/<sweep>-<trial id>/   each trial's `cdm train` run folder (checkpoints, cdm_run.json)
"""

from __future__ import annotations

import re
from typing import Any, Optional

from pipelines.common import storage
from pipelines.common.errors import UserError
from pipelines.common.tracking import folder_recorded_by_run

SWEEP_FILE = "cdm_sweep.json"
SWEEP_FORMAT = "cdm-tune-sweep/1"
TUNE_DIR = "tune"
TRIALS_DIR = "trials"


def check_name(name: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9._-]+", name):
        raise UserError(f"tune.name: {name!r} may contain only letters, digits, '.', '_' and '-'")
    return name


def read_sweep(sweep_dir: str) -> Optional[dict[str, Any]]:
    info = storage.read_json(storage.join(sweep_dir, SWEEP_FILE))
    if info is not None and info.get("format") != SWEEP_FORMAT:
        raise UserError(f"{storage.join(sweep_dir, SWEEP_FILE)} is not a {SWEEP_FORMAT} file")
    return info


def write_sweep(sweep_dir: str, info: dict[str, Any]) -> None:
    storage.write_json(storage.join(sweep_dir, SWEEP_FILE), {"format": SWEEP_FORMAT, **info})


def find_sweep_dir(sweep: str, tracking_uri: str | None = None) -> str:
    """SWEEP as the user gives it: a sweep folder (path or URI) or the MLflow run id of its parent run."""
    if storage.exists(sweep) and read_sweep(storage.absolute(sweep)) is not None:
        return storage.absolute(sweep)
    folder = folder_recorded_by_run(
        sweep, "cdm.sweep_dir", tracking_uri=tracking_uri, label=sweep, kind="a cdm tune sweep"
    )
    if folder is not None:
        return folder
    raise UserError(
        f"{sweep}: not a sweep folder with {SWEEP_FILE} (give the folder `cdm tune` printed, "
        "or the MLflow run id of the sweep's parent run)"
    )


def trial_dir(sweep_dir: str, run_name: str) -> str:
    """The run folder of a trial's run (`<sweep>-<trial id>`, or a PBT segment `…-at<step>`)."""
    return storage.join(sweep_dir, TRIALS_DIR, run_name)
