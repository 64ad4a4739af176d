"""A training run's folder: `<run.storage_path>/<run.name>/` (a local folder or any pyarrow URI).

cdm_run.json            the resolved config, the data shape, the MLflow run, and the run's branches
checkpoint_00005000/    Ray Train checkpoints, each holding checkpoint.pt
…                       (the cdm_core format; see pipelines.common.checkpoints)
checkpoint_00003000-b20261201130812/   a branch's: a continuation from an older checkpoint
checkpoint_manager_snapshot.json   Ray's list of checkpoints (used to resume)
"""

from __future__ import annotations

import re
import time
from typing import Any

from ray.train import Result  # Ray Train V2's (trainer.check_ray_train_v2 insists on it)

from cdm_core.checkpoint import load_checkpoint
from pipelines.common import storage
from pipelines.common.checkpoints import CHECKPOINT_FILENAME
from pipelines.common.errors import UserError
from pipelines.common.tracking import folder_recorded_by_run

RUN_FILE = "cdm_run.json"
RUN_FORMAT = "cdm-train-run/1"
# checkpoint_00005000, or checkpoint_00005000-b20261201130812 on a branch (a continuation from an older checkpoint).
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


def checkpoint_names(run_dir: str) -> list[str]:
    """All the run's checkpoint folders, highest step first (the lines a continuation left included)."""
    names = [n for n in storage.resolve(run_dir).list_folders() if _CHECKPOINT_DIR.fullmatch(n)]
    names.sort(key=lambda n: (checkpoint_step(n), branch_of(n)), reverse=True)
    return names


def branch_of(name: str) -> str:
    """The line of training a checkpoint belongs to: "" for the run's first, "-bYYYYmmddHHMMSS" for a continuation's."""
    return _CHECKPOINT_DIR.fullmatch(name).group(2) or ""


def registered_checkpoints(run_dir: str) -> set[str] | None:
    """The checkpoints Ray Train recorded for the run (None if it has no record of them yet).

    A worker writes a checkpoint's folder before Ray records it; one stopped in between (a kill, a
    paused Tune trial) leaves a complete folder that Ray never reported. Going on from such a
    checkpoint would skip its report, so a continuation goes on from the ones Ray recorded.
    """
    try:
        result = Result.from_path(run_dir)
    except (RuntimeError, OSError, ValueError):
        return None
    return {c.path.rstrip("/").rsplit("/", 1)[-1] for c, _ in result.best_checkpoints or []}


def checkpoint_line(run_dir: str, info: dict[str, Any] | None = None, *, registered: bool = True) -> list[str]:
    """The checkpoints the run's current line of training passed through, newest first.

    A continuation from an older checkpoint starts a branch (its checkpoints get the branch's suffix), and
    the run file records where each branch left its parent (`branches`) and which one is current
    (`branch`). The line is the current branch's checkpoints, then its parent's up to the one it
    started from, and so on: never those of a line that was left (a diverged stretch, say). With
    `registered`, only those Ray recorded (see registered_checkpoints), once it has recorded any.
    """
    info = read_run_file(run_dir) if info is None else info
    info = info or {}
    names, parents = checkpoint_names(run_dir), info.get("branches", {})
    known = registered_checkpoints(run_dir) if registered else None
    if known:
        names = [n for n in names if n in known]
    branch, limit, line, seen = info.get("branch", ""), None, [], set()
    while branch not in seen:
        seen.add(branch)
        line += [n for n in names if branch_of(n) == branch and (limit is None or checkpoint_step(n) <= limit)]
        parent = parents.get(branch)
        if parent is None or not _CHECKPOINT_DIR.fullmatch(parent):
            break
        branch, limit = branch_of(parent), checkpoint_step(parent)
    return line


def new_branch(info: dict[str, Any]) -> str:
    """A branch name not used in this run yet."""
    taken, moment = set(info.get("branches", {})), time.time()
    while (name := "-b" + time.strftime("%Y%m%d%H%M%S", time.localtime(moment))) in taken:
        moment += 1
    return name


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
