"""MLflow for a sweep: one parent run, one nested child run per trial, each child's final status.

The child runs are the trials' own `cdm train` runs (params = the trial's whole
config, metrics over steps from the training loop). A trial that Tune stops
early or that fails is ended by Tune killing its actor, so the run cannot end
itself; `SweepTracker`, a Tune callback in the `cdm tune` driver, ends it once
the trial's actor is gone, and tags every child:

    cdm.sweep, cdm.trial_id
    cdm.trial_status   completed | stopped early | failed
    cdm.trial_step     the last step the trial reported
    cdm.error          why a failed trial failed (the last lines of its error)

Under PBT a trial may train several runs (segments, see pipelines.tune.trial):
the trial ends each earlier one when it starts the next (`end_earlier_segments`:
cdm.trial_status = exploited, cdm.pbt.continued_in = the next segment), and this
tracker ends the last one. Reports carry `run_name`, the segment they come from.

With the weighted objective, the tracker also logs `val/weighted` to the child
at every reported step.
"""

from __future__ import annotations

import math
import time
from typing import Any, Optional

import ray
from ray.tune import Callback

from pipelines.common.tracking import PatientClient, flatten_params
from pipelines.tune.resources import TrialActorWatch, ledger_name, release
from pipelines.tune.results import COMPLETED, EXPLOITED, FAILED, STOPPED_EARLY, child_run_id, trial_runs

__all__ = ["SweepTracker", "end_earlier_segments", "outcome", "COMPLETED", "EXPLOITED", "FAILED", "STOPPED_EARLY"]

ERROR_TAG_LENGTH = 4000


def outcome(error: Any, step: Optional[int], steps: int) -> str:
    if error is not None:
        return FAILED
    return COMPLETED if step is not None and step >= steps else STOPPED_EARLY


def _trial_error(trial: Any) -> str:
    """The trial's error trace as Tune wrote it (the local file first: the copy in storage is synced later)."""
    path = trial.error_file
    if path:
        try:
            with open(path) as f:
                return f.read()
        except OSError:
            pass
    return trial.get_error() or "the trial failed (Ray Tune recorded no error text)"


def _error_text(error: Any) -> str:
    text = str(error).strip()
    return text if len(text) <= ERROR_TAG_LENGTH else "…" + text[-ERROR_TAG_LENGTH:]


class SweepTracker(Callback):
    """Ends each trial's child run with its status, and frees an ended trial's Train resources.

    Tune pickles this object into the experiment (it comes back on `--resume`), so it
    holds only plain settings; the MLflow client and pending trials are made in setup().
    """

    def __init__(
        self,
        *,
        sweep: str,
        tracking_uri: str,
        experiment: str,
        parent_run_id: str,
        steps: int,
        metric: str,
        weighted: bool,
        trials_dir: str,
    ):
        self.sweep = sweep
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.parent_run_id = parent_run_id
        self.steps = steps
        self.metric = metric
        self.weighted = weighted
        self.trials_dir = trials_dir
        self._client: Any = None
        self._run_ids: dict[str, str] = {}
        self._ending: dict[str, tuple[Any, Any, list[Any]]] = {}

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.update(_client=None, _run_ids={}, _ending={})
        return state

    def setup(self, **info: Any) -> None:
        self._client = PatientClient(self.tracking_uri)

    # ----------------------------------------------------------------- Tune hooks

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        if not self.weighted or "step" not in result:
            return
        run_id = self._run_id(self._run_name(trial, result))
        value = result.get(self.metric)
        if run_id and value is not None and math.isfinite(value):
            self._client.log_metric(run_id, self.metric, float(value), step=int(result["step"]))

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._trial_ended(trial, None)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._trial_ended(trial, _trial_error(trial))

    def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
        self._settle(trials)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        deadline = time.monotonic() + 120
        while self._ending and time.monotonic() < deadline:
            self._settle(trials)
            time.sleep(0.2)
        for trial_id in list(self._ending):  # actors that would not go: end their runs anyway
            self._finish(trial_id, trials)

    # ----------------------------------------------------------------- bookkeeping

    def _run_name(self, trial_id_or_trial: Any, result: Optional[dict] = None) -> str:
        """The run the trial's latest report came from (its only run, unless PBT restarted it)."""
        trial_id = getattr(trial_id_or_trial, "trial_id", trial_id_or_trial)
        return (result or {}).get("run_name") or f"{self.sweep}-{trial_id}"

    def _run_id(self, run_name: str) -> Optional[str]:
        if run_name not in self._run_ids:
            run_id = child_run_id(self._client, self.experiment, self.parent_run_id, run_name)
            if run_id is None:
                return None
            self._run_ids[run_name] = run_id
        return self._run_ids[run_name]

    def _trial_ended(self, trial: Any, error: Any) -> None:
        try:
            actor, groups = ray.get(ray.get_actor(ledger_name(self.sweep)).take.remote(trial.trial_id))
        except ValueError:  # no ledger (not started by cdm tune): nothing to free
            actor, groups = None, []
        self._ending[trial.trial_id] = (error, TrialActorWatch(actor), groups)

    def _settle(self, trials: list) -> None:
        for trial_id, (_, watch, _) in list(self._ending.items()):
            if watch.is_gone():
                self._finish(trial_id, trials)

    def _finish(self, trial_id: str, trials: list) -> None:
        """The trial's actor has exited: free its placement groups, then end its child run for good."""
        error, _, groups = self._ending.pop(trial_id)
        release(groups)
        trial = next((t for t in trials if t.trial_id == trial_id), None)
        last = (trial.last_result or {}) if trial is not None else {}
        step = last.get("step")
        status = outcome(error, step, self.steps)
        # The trial's newest run (PBT may have restarted it in new runs; its last result may even be the
        # donor's, which PBT copies over).
        runs = trial_runs(self._client, self.experiment, self.parent_run_id, self.sweep, trial_id)
        run_name = runs[0].data.tags["cdm.run_name"] if runs else f"{self.sweep}-{trial_id}"
        run_id = runs[0].info.run_id if runs else self._record_unstarted(trial_id, trial)
        tags = {"cdm.sweep": self.sweep, "cdm.trial_id": trial_id, "cdm.trial_status": status}
        if step is not None:
            tags["cdm.trial_step"] = str(int(step))
        if error is not None:
            tags["cdm.error"] = _error_text(error)
        run = self._client.get_run(run_id)
        checkpoint = last.get("checkpoint_path") if self._run_name(trial_id, last) == run_name else None
        if checkpoint and "cdm.last_checkpoint" not in run.data.tags:
            # The run was stopped before it could say where its latest checkpoint is.
            tags["cdm.last_checkpoint"] = (
                f"{self.trials_dir.rstrip('/')}/{run_name}/{checkpoint.rstrip('/').rsplit('/', 1)[-1]}"
            )
        for key, value in tags.items():
            self._client.set_tag(run_id, key, value)
        final = "FAILED" if status == FAILED else "FINISHED"
        if run.info.status != final:
            self._client.set_terminated(run_id, status=final)

    def _record_unstarted(self, trial_id: str, trial: Any) -> str:
        """A trial that failed before its training run existed still gets a child run, with its sampled values."""
        exp = self._client.get_experiment_by_name(self.experiment)
        run = self._client.create_run(
            exp.experiment_id,
            run_name=f"{self.sweep}-{trial_id}",
            tags={
                "mlflow.parentRunId": self.parent_run_id,
                "cdm.run_name": f"{self.sweep}-{trial_id}",
                "cdm.stage": "train",
            },
        )
        for key, value in flatten_params(trial.config if trial is not None else {}).items():
            self._client.log_param(run.info.run_id, key, value)
        self._run_ids[f"{self.sweep}-{trial_id}"] = run.info.run_id
        return run.info.run_id


def end_earlier_segments(setup: Any, trial_id: str, new_run_name: str, start: dict[str, Any]) -> None:
    """PBT: end the trial's earlier runs (it was paused mid-run) as exploited by `new_run_name`.

    Such a run has no cdm.trial_status yet; it may be RUNNING, or FAILED if its training saw the
    pause as an error.

    `start` is where the new segment begins: {train_checkpoint, run_name (the donor's run), step}.
    """
    client = PatientClient(setup.tracking_uri)
    for run in trial_runs(client, setup.experiment, setup.parent_run_id, setup.sweep, trial_id):
        if "cdm.trial_status" in run.data.tags or run.data.tags["cdm.run_name"] == new_run_name:
            continue
        history = client.get_metric_history(run.info.run_id, "train/loss")
        tags = {
            "cdm.sweep": setup.sweep,
            "cdm.trial_id": trial_id,
            "cdm.trial_status": EXPLOITED,
            "cdm.pbt.continued_in": new_run_name,
            "cdm.pbt.donor_run": str(start.get("run_name")),
            "cdm.pbt.donor_checkpoint": start["train_checkpoint"],
        }
        if history:
            tags["cdm.trial_step"] = str(max(m.step for m in history))
        for key, value in tags.items():
            client.set_tag(run.info.run_id, key, value)
        if run.info.status != "FINISHED":
            client.set_terminated(run.info.run_id, status="FINISHED")
