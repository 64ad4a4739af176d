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
    if exists(sweep) and read_sweep(absolute(sweep)) is not None:
        return absolute(sweep)
    if re.fullmatch(r"[0-9a-f]{32}", sweep):
        from mlflow.tracking import MlflowClient

        from pipelines.tracking import default_tracking_uri

        try:
            tags = MlflowClient(tracking_uri or default_tracking_uri()).get_run(sweep).data.tags
        except Exception as err:
            raise UserError(f"{sweep}: no such MLflow run ({type(err).__name__})") from None
        if "cdm.sweep_dir" in tags:
            return tags["cdm.sweep_dir"]
        raise UserError(f"{sweep}: that MLflow run is not a cdm tune sweep (no cdm.sweep_dir tag)")
    raise UserError(f"{sweep}: not a sweep folder with {SWEEP_FILE} (give the folder `cdm tune` printed, "
                    "or the MLflow run id of the sweep's parent run)")


def run_info(run_dir: str) -> Optional[dict[str, Any]]:
    """A trial's `cdm_run.json` (see pipelines.train), or None if its run never started."""
    from pipelines.train import RUN_FILE

    return read_json(join(run_dir, RUN_FILE))
