"""A training run's folder: `<run.storage_path>/<run.name>/` (a local folder or any pyarrow URI).

cdm_run.json            the resolved config, the data shape, the MLflow run, and the run's branches
checkpoint_00005000/    Ray Train checkpoints, each holding checkpoint.pt
…                       (the cdm_core format; see pipelines.common.checkpoints)
checkpoint_00003000-b20261201130812/   a branch's: a continuation from an older checkpoint
checkpoint_manager_snapshot.json   Ray's list of checkpoints (used to resume)

In Ray Train's local mode (scaling.num_workers=0) Ray keeps only the last reported checkpoint, in
memory; `LocalCheckpoints` then does what Ray's checkpoint manager does, and the run file's
`local_checkpoints` is its record.
"""

from __future__ import annotations

import math
import re
import time
from typing import Any

import pyarrow.fs as pafs
from ray.train import Result  # Ray Train V2's (trainer.check_ray_train_v2 insists on it)

from cdm_core.checkpoint import load_checkpoint
from pipelines.common import storage
from pipelines.common.checkpoints import CHECKPOINT_FILENAME
from pipelines.common.errors import UserError
from pipelines.common.tracking import folder_recorded_by_run

RUN_FILE = "cdm_run.json"
RUN_FORMAT = "cdm-train-run/1"
LOCAL_RECORD = "local_checkpoints"  # in the run file: {checkpoint name: its score}, written in local mode
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


def recorded_checkpoints(run_dir: str, info: dict[str, Any]) -> set[str] | None:
    """The checkpoints recorded for the run: Ray's, and those a local-mode fit recorded in the run file."""
    ray_record, local = registered_checkpoints(run_dir), set(info.get(LOCAL_RECORD, {}))
    if ray_record is None and not local:
        return None
    return (ray_record or set()) | local


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
    known = recorded_checkpoints(run_dir, info) if registered else None
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


class LocalCheckpoints:
    """Ray Train's checkpoint manager for a local-mode fit, which has none: each reported checkpoint is copied
    into the run folder and recorded in the run file, and those past `keep` are deleted, the worst by
    `score` (lower is better; unscored ones rank worst) first, never the latest, as Ray does.
    """

    def __init__(self, run_dir: str, keep: int | None, score: str):
        self.run_dir, self.keep, self.score = run_dir, keep, score

    def save(self, folder: str, name: str, metrics: dict[str, Any]) -> str:
        """Copy the local checkpoint `folder` to the run folder as `name`; returns its URI."""
        target = storage.resolve(storage.join(self.run_dir, name))
        target.makedirs()
        pafs.copy_files(folder, target.root, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=target.fs)
        info = read_run_file(self.run_dir) or {}
        record = {**info.get(LOCAL_RECORD, {}), name: metrics.get(self.score)}  # recorded once it is whole
        if self.keep is not None:
            for old in sorted(record, key=lambda n: _rank(record[n]))[self.keep :]:
                if old == name:
                    continue
                gone = storage.resolve(storage.join(self.run_dir, old))
                if gone.kind() == "dir":
                    gone.fs.delete_dir(gone.root)
                del record[old]
        write_run_file(self.run_dir, {**info, LOCAL_RECORD: record})
        return target.uri

    def best(self) -> str | None:
        """The best scored checkpoint recorded, or None if none has a score."""
        record = (read_run_file(self.run_dir) or {}).get(LOCAL_RECORD, {})
        scored = [n for n, v in record.items() if v is not None and math.isfinite(v)]
        return storage.join(self.run_dir, min(scored, key=lambda n: record[n])) if scored else None


def _rank(score: float | None) -> float:
    return score if score is not None and math.isfinite(score) else math.inf
