"""A sweep's folder: `<run.storage_path>/<sweep name>/` (a local folder or any pyarrow URI).

    cdm_sweep.json    the base config, the sweep file, the MLflow parent run, and (when done) the best trial
    tune/             Ray Tune's experiment (its state is what `cdm tune --resume` restores)
    trials/<sweep>-<trial id>/   each trial's `cdm train` run folder (checkpoints, cdm_run.json)
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Optional

from pipelines.errors import UserError

SWEEP_FILE = "cdm_sweep.json"
SWEEP_FORMAT = "cdm-tune-sweep/1"
TUNE_DIR = "tune"
TRIALS_DIR = "trials"


def absolute(uri: str) -> str:
    return uri if "://" in uri else str(Path(uri).expanduser().resolve())


def join(uri: str, *names: str) -> str:
    return "/".join([uri.rstrip("/"), *names])


def _fs(uri: str):
    import pyarrow.fs as pafs

    return pafs.FileSystem.from_uri(absolute(uri))


def exists(uri: str) -> bool:
    import pyarrow.fs as pafs

    fs, path = _fs(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_json(uri: str) -> Optional[dict[str, Any]]:
    import pyarrow.fs as pafs

    fs, path = _fs(uri)
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path) as f:
        return json.loads(f.read().decode())


def write_json(uri: str, data: dict[str, Any]) -> None:
    fs, path = _fs(uri)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as f:
        f.write((json.dumps(data, indent=2, default=str) + "\n").encode())


def check_name(name: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9._-]+", name):
        raise UserError(f"tune.name: {name!r} may contain only letters, digits, '.', '_' and '-'")
    return name


def read_sweep(sweep_dir: str) -> Optional[dict[str, Any]]:
    info = read_json(join(sweep_dir, SWEEP_FILE))
    if info is not None and info.get("format") != SWEEP_FORMAT:
        raise UserError(f"{join(sweep_dir, SWEEP_FILE)} is not a {SWEEP_FORMAT} file")
    return info


def write_sweep(sweep_dir: str, info: dict[str, Any]) -> None:
    write_json(join(sweep_dir, SWEEP_FILE), {"format": SWEEP_FORMAT, **info})


def find_sweep_dir(sweep: str, tracking_uri: str | None = None) -> str:
    """SWEEP as the user gives it: a sweep folder (path or URI) or the MLflow run id of its parent run."""
    from pipelines.tracking import folder_recorded_by_run

    if exists(sweep) and read_sweep(absolute(sweep)) is not None:
        return absolute(sweep)
    folder = folder_recorded_by_run(sweep, "cdm.sweep_dir", tracking_uri=tracking_uri, label=sweep,
                                    kind="a cdm tune sweep")
    if folder is not None:
        return folder
    raise UserError(f"{sweep}: not a sweep folder with {SWEEP_FILE} (give the folder `cdm tune` printed, "
                    "or the MLflow run id of the sweep's parent run)")


def run_info(run_dir: str) -> Optional[dict[str, Any]]:
    """A trial's `cdm_run.json` (see pipelines.train), or None if its run never started."""
    from pipelines.train import RUN_FILE

    return read_json(join(run_dir, RUN_FILE))
