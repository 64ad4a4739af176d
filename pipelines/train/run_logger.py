"""MLflow logging from inside the training run (rank 0 only), safe across restarts.

The driver creates the MLflow run; the rank-0 worker writes metrics and
artifacts to it by run id. After a restart (worker failure or `--resume`) the
loop replays the steps between the last checkpoint and the failure; their
metrics are already in MLflow, so each key is only logged for steps beyond the
last step MLflow already holds for it — no step is ever logged twice.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from mlflow.entities import Metric

from pipelines.common.tracking import PatientClient


class RunLogger:
    """Metrics (with steps), params, tags and artifacts of one existing MLflow run."""

    def __init__(self, tracking_uri: str, run_id: str):
        self.client = PatientClient(tracking_uri)  # a locked SQLite store delays a write; it never loses one
        self.run_id = run_id
        self._last_step: dict[str, int] = {}
        for key in self.client.get_run(run_id).data.metrics:
            history = self.client.get_metric_history(run_id, key)
            self._last_step[key] = max((m.step for m in history), default=-1)

    def last_step(self, key: str) -> int:
        """Highest step already logged for `key` (−1 if none)."""
        return self._last_step.get(key, -1)

    def metrics(self, values: Mapping[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        fresh = [Metric(k, float(v), now, int(step)) for k, v in values.items() if step > self._last_step.get(k, -1)]
        if not fresh:
            return
        self.client.log_batch(self.run_id, metrics=fresh)
        for m in fresh:
            self._last_step[m.key] = m.step

    def tags(self, values: Mapping[str, Any]) -> None:
        for k, v in values.items():
            self.client.set_tag(self.run_id, k, str(v))

    def artifact(self, local_path: str, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, local_path, artifact_path)
