"""Progress of the train stage on the console, read from its MLflow run.

The training loop runs in Ray workers and reports to MLflow only (rank 0),
so the workflow's driver learns how far it is the same way a user would: it
reads the run's latest `train/loss` step every few seconds and prints a line
when the step has moved. This works the same for a local Ray and a cluster.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any, Optional

from mlflow.tracking import MlflowClient

from pipelines.common import console


class TrainingProgress:
    """Context manager: while open, print `step s/N, loss, val/nll_bpd, steps/s, time left` every `every` seconds."""

    def __init__(
        self,
        tracking_uri: str,
        experiment: str,
        run_name: str,
        total_steps: int,
        every: float = 20.0,
        echo: Callable[[str], Any] = console.echo,
    ):
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.run_name = run_name
        self.total = total_steps
        self.every = every
        self.echo = echo
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._run_id: Optional[str] = None
        self._last_step = -1
        self._first: Optional[tuple[float, int]] = None  # (time, step) when steps were first seen moving

    def __enter__(self) -> TrainingProgress:
        self._thread = threading.Thread(target=self._loop, name="cdm-train-progress", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            try:
                line = self.poll()
            except Exception:  # progress is a courtesy: a busy or locked store must never break training
                line = None
            if line:
                self.echo(line)

    def _find_run(self, client) -> Optional[str]:
        experiment = client.get_experiment_by_name(self.experiment)
        if experiment is None:
            return None
        runs = client.search_runs(
            [experiment.experiment_id], filter_string=f"tags.`cdm.run_name` = '{self.run_name}'", max_results=1
        )
        return runs[0].info.run_id if runs else None

    def poll(self) -> Optional[str]:
        """One progress line if training moved since the last one, else None."""
        client = MlflowClient(tracking_uri=self.tracking_uri)
        if self._run_id is None:
            self._run_id = self._find_run(client)
            if self._run_id is None:
                return None
        history = client.get_metric_history(self._run_id, "train/loss")
        if not history:
            return None
        last = max(history, key=lambda m: m.step)
        if last.step <= self._last_step:
            return None
        now = time.time()
        if self._first is None:
            self._first = (now, last.step)
        self._last_step = last.step
        parts = [
            f"  train: step {last.step}/{self.total} ({100 * last.step / self.total:.0f}%)",
            f"loss {last.value:.4f}",
        ]
        val = client.get_run(self._run_id).data.metrics.get("val/nll_bpd")
        if val is not None:
            parts.append(f"val/nll_bpd {val:.3f}")
        start_time, start_step = self._first
        if last.step > start_step and now > start_time:
            rate = (last.step - start_step) / (now - start_time)
            left = (self.total - last.step) / rate
            parts.append(f"{rate:.2f} steps/s, ~{duration(left)} left")
        return ", ".join(parts)


def duration(seconds: float) -> str:
    """Seconds as `42 s`, `3 min 05 s` or `2 h 07 min`."""
    seconds = max(0, int(round(seconds)))
    if seconds < 90:
        return f"{seconds} s"
    if seconds < 5400:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"
