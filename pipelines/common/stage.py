"""A stage's anatomy, written once: check the inputs, compute, record.

    def run(config):
        inputs = check(config)        # every mistake of the user's is found here, before a run is opened
        with tracked(config, run_name, params, tags) as record:
            result = compute(inputs)
            record.metrics({...})
            record.artifact(path)
        return replace(result, run_id=record.run_id)

`tracked` is the stage's MLflow run (`tracking.mlflow_run`: nested under `tracking.parent_run_id`, ended
FINISHED, FAILED, or KILLED on Ctrl-C/SIGTERM); with the config's `track` off its `Record` does nothing,
so a stage's compute has no tracking branches.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import mlflow

from pipelines.common.connect import check_cluster
from pipelines.common.tracking import mlflow_run, store_uri


class Record:
    """What a stage records in its MLflow run; with tracking off, nothing (and `run_id` is None)."""

    def __init__(self, run: Any = None):
        self.run_id: str | None = run.info.run_id if run is not None else None

    def params(self, values: Mapping[str, Any]) -> None:
        if self.run_id:
            mlflow.log_params(dict(values))

    def metrics(self, values: Mapping[str, float], step: int | None = None) -> None:
        if self.run_id:
            mlflow.log_metrics({k: float(v) for k, v in values.items()}, step=step)

    def artifact(self, path: str | Path | None) -> None:
        """A local file as an artifact (None: nothing, for a file a stage may not have written)."""
        if self.run_id and path:
            mlflow.log_artifact(str(path))

    def json(self, name: str, data: Any) -> None:
        """`data` as the artifact `name` (a JSON file written for the purpose)."""
        if self.run_id:
            with tempfile.TemporaryDirectory() as tmp:
                (Path(tmp) / name).write_text(json.dumps(data, indent=2) + "\n")
                self.artifact(Path(tmp) / name)


@contextlib.contextmanager
def tracked(
    config: Any, run_name: str, params: Mapping[str, Any] | None = None, tags: Mapping[str, Any] | None = None
) -> Iterator[Record]:
    """The stage's MLflow run for the block, if `config.track`; open it only once the inputs are checked.

    A batch stage's Ray cluster is asked first whether it is there: an unreachable one is one line in seconds,
    not a FAILED run after minutes.
    """
    pool = getattr(config, "pool", None)
    if pool is not None and pool.workers != 0:
        check_cluster(pool.address, "--address")
    if not config.track:
        yield Record()
        return
    t = config.tracking
    with mlflow_run(t.experiment, run_name, store_uri(t), params, tags, t.parent_run_id) as active:
        yield Record(active)
