"""One trial of `cdm tune`: the driver function Ray Tune runs, which trains with `pipelines.train.trainer`.

The current Tune + Train pattern (Ray Train V2): the Tune trial is a small driver
that builds and fits a `TorchTrainer`; the Train workers' `ray.train.report`
calls reach Tune through a Train callback (`ReportToTune`, a
`ray.tune.integration.ray_train.TuneReportCallback`). The workers report at every
checkpoint, with that checkpoint's validation metrics, so ASHA compares trials on
the validation metric at training steps.

A trial is one `cdm train` run, nested in MLflow under the sweep's parent run,
in `<sweep>/trials/<sweep name>-<trial id>`. The run folder makes trials
idempotent, which `cdm tune --resume` relies on: a trial whose run already
finished reports its final metrics without training again, and a trial
interrupted mid-run continues from its latest checkpoint.

Population based training (`--scheduler pbt`) needs Tune checkpoints, which the
callback above does not pass on, so a PBT trial forwards each report itself
(`ForwardReports`, through a queue to the trial's function, which calls
`tune.report` with a small checkpoint naming the Train checkpoint). When PBT
replaces a trial's settings with a better trial's (mutated), Tune restarts the
trial from that trial's checkpoint: the trial then trains a new run, a
*segment* `<sweep name>-<trial id>-at<step>`, started from the donor's
checkpoint (`run.init_from`), and ends its previous segment's MLflow run as
"exploited".
"""

from __future__ import annotations

import json
import math
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import ray
from mlflow.tracking import MlflowClient
from ray import tune
from ray.train.v2.api.callback import UserCallback
from ray.tune.integration.ray_train import TuneReportCallback
from ray.util.queue import Queue

from pipelines.common import config as cfg
from pipelines.common import storage
from pipelines.train import trainer
from pipelines.train.config import TrainConfig
from pipelines.train.run_dir import read_run_file
from pipelines.tune.resources import RecordPlacementGroup, TrialActorWatch, ledger_name, release
from pipelines.tune.space import WEIGHTED_METRIC
from pipelines.tune.tracking import end_earlier_segments


@dataclass(frozen=True)
class TrialSetup:
    """What every trial of a sweep shares (pickled to the trials by Ray Tune)."""

    sweep: str  # the sweep's name
    trials_dir: str  # absolute folder or URI holding the trials' run folders
    base_config: dict[str, Any]  # TrainConfig as plain dicts, before the search space is applied
    tracking_uri: str
    experiment: str
    parent_run_id: str
    metric: str  # the key Tune optimises (SweepSettings.tune_metric)
    weights: dict[str, float] = field(default_factory=dict)  # for the weighted metric
    pbt: bool = False  # report Tune checkpoints; a restored trial trains a new segment

    def run_name(self, trial_id: str, start_step: Optional[int] = None) -> str:
        base = f"{self.sweep}-{trial_id}"
        return base if start_step is None else f"{base}-at{start_step}"

    def owns(self, trial_id: str, run_name: str) -> bool:
        """Whether `run_name` is one of this trial's runs (its first, or a later PBT segment)."""
        base = self.run_name(trial_id)
        return run_name == base or run_name.startswith(base + "-at")

    def trial_config(
        self, params: dict[str, Any], trial_id: str, start: Optional[dict[str, Any]] = None
    ) -> TrainConfig:
        """The base config with the trial's sampled values, its run folder and its MLflow parent.

        `start` (PBT): the checkpoint this segment continues from (see `pointer`).
        """
        config = cfg.apply_overrides(TrainConfig, params, base=self.base_config)
        if self.pbt:
            # Any checkpoint at a perturbation step may be copied into another trial later, when Train's
            # retention (the best K by score) would have removed it: under PBT trials keep them all.
            config = cfg.apply_overrides(config, {"checkpoint.keep_best": None})
        if start is not None:
            config = cfg.apply_overrides(config, {"run.init_from": start["train_checkpoint"]})
        return cfg.apply_overrides(
            config,
            {
                "run.name": self.run_name(trial_id, None if start is None else start["step"]),
                "run.storage_path": self.trials_dir,
                "tracking.tracking_uri": self.tracking_uri,
                "tracking.experiment": self.experiment,
                "tracking.parent_run_id": self.parent_run_id,
            },
        )


def objective(metrics: dict[str, Any], metric: str, weights: dict[str, float]) -> float:
    """The value Tune minimises; +inf when it is missing or not finite (the validation drops NaNs)."""
    if metric == WEIGHTED_METRIC:
        parts = [w * float(metrics.get(k, math.inf)) for k, w in weights.items() if w]
        value = sum(parts) if parts else math.inf
    else:
        value = float(metrics.get(metric, math.inf))
    return value if math.isfinite(value) else math.inf


def trial_report(metrics: dict[str, Any], metric: str, weights: dict[str, float], run_name: str) -> dict[str, Any]:
    """Rank 0's report as the sweep passes it to Tune: with the objective, and the run it came from."""
    report = dict(metrics)
    report[metric] = objective(report, metric, weights)
    report["run_name"] = run_name  # which MLflow run the sweep's tracker tags
    return report


class ReportToTune(TuneReportCallback):
    """Forwards rank 0's report to the Tune trial, with the sweep's objective always present.

    Tune refuses results without the optimised metric, and a diverged model's
    validation has no finite NLL/MSE; +inf keeps such a trial comparable (and last).
    """

    def __init__(self, metric: str, weights: dict[str, float], run_name: str):
        super().__init__()
        self.metric = metric
        self.weights = dict(weights)
        self.run_name = run_name

    def after_report(self, run_context, metrics, checkpoint):
        first = trial_report(metrics[0], self.metric, self.weights, self.run_name)
        super().after_report(run_context, [first, *metrics[1:]], checkpoint)


class ForwardReports(UserCallback):
    """PBT: rank 0's report, with the objective and its checkpoint's path, to the trial's function.

    The queue holds one item, so Train waits at its next report until the trial has passed
    this one to Tune, as with `ReportToTune`.
    """

    def __init__(self, queue: Any, metric: str, weights: dict[str, float], run_name: str):
        self.queue = queue
        self.metric = metric
        self.weights = dict(weights)
        self.run_name = run_name

    def after_report(self, run_context, metrics, checkpoint):
        first = trial_report(metrics[0], self.metric, self.weights, self.run_name)
        if checkpoint:
            first["checkpoint_path"] = checkpoint.path
        self.queue.put(first)


POINTER_FILE = "cdm_train_checkpoint.json"


def pointer(checkpoint: Any) -> Optional[dict[str, Any]]:
    """What a PBT trial's Tune checkpoint names: {train_checkpoint, run_name, step}, or None."""
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as folder:
        path = Path(folder) / POINTER_FILE
        return json.loads(path.read_text()) if path.is_file() else None


def _report_with_pointer(report: dict[str, Any]) -> None:
    path = report.get("checkpoint_path")
    if not path:
        tune.report(report)
        return
    with tempfile.TemporaryDirectory() as folder:
        Path(folder, POINTER_FILE).write_text(
            json.dumps({"train_checkpoint": path, "run_name": report.get("run_name"), "step": int(report["step"])})
        )
        tune.report(report, checkpoint=tune.Checkpoint.from_directory(folder))


def _train_reporting_checkpoints(start_training, run_name: str, setup: TrialSetup) -> None:
    """Run `start_training(callback)` in a thread and pass each of its reports to Tune from this one."""
    queue = Queue(maxsize=1, actor_options={"num_cpus": 0})
    failure: list[BaseException] = []

    def train() -> None:
        try:
            start_training(ForwardReports(queue, setup.metric, setup.weights, run_name))
        except BaseException as err:  # noqa: BLE001 -- raised again in the trial's thread below
            failure.append(err)
        finally:
            queue.put(None)

    thread = threading.Thread(target=train, name=f"cdm-train-{run_name}", daemon=True)
    thread.start()
    while (report := queue.get()) is not None:
        _report_with_pointer(report)
    thread.join()
    if failure:
        raise failure[0]


def finished_result(
    run_dir: str, config: TrainConfig, metric: str, weights: dict[str, float]
) -> Optional[dict[str, Any]]:
    """The final report of a trial whose run completed all its steps earlier (None if it did not)."""
    info = read_run_file(run_dir)
    if info is None:
        return None
    run = MlflowClient(info["mlflow"]["tracking_uri"]).get_run(info["mlflow"]["run_id"])
    if run.info.status != "FINISHED" or run.data.tags.get("cdm.final_step") != str(config.train.steps):
        return None
    report = trial_report(
        {k: v for k, v in run.data.metrics.items() if k.startswith("val/")}, metric, weights, config.run.name
    )
    report["step"] = config.train.steps
    checkpoint = run.data.tags.get("cdm.last_checkpoint")
    if checkpoint:
        report["checkpoint_path"] = checkpoint
    return report


def cdm_trial(params: dict[str, Any], setup: TrialSetup) -> None:
    """Ray Tune's trainable: train (or continue, or just report) this trial's run."""
    trial_id = tune.get_context().get_trial_id()
    ledger = ray.get_actor(ledger_name(setup.sweep))
    # A trial restarted in the same sweep (PBT, a retry) waits until its previous actor has exited (so that
    # nothing of it still writes to MLflow), then frees what that actor's Train run held.
    previous_actor, previous_groups = ray.get(
        ledger.add_actor.remote(trial_id, ray.get_runtime_context().get_actor_id())
    )
    if previous_actor is not None:
        TrialActorWatch(previous_actor).wait()
    release(previous_groups)

    start = pointer(tune.get_checkpoint()) if setup.pbt else None
    if start is not None and setup.owns(trial_id, start["run_name"]):
        # Restored from its own checkpoint (`cdm tune --resume`, a retry): that run continues.
        config = cfg.apply_overrides(setup.trial_config(params, trial_id), {"run.name": start["run_name"]})
        start = None
    else:  # PBT: continue from the donor's checkpoint in a new run
        config = setup.trial_config(params, trial_id, start)
    run_dir = storage.join(setup.trials_dir, config.run.name)
    if start is not None:
        end_earlier_segments(setup, trial_id, config.run.name, start)
    placement = RecordPlacementGroup(setup.sweep, trial_id)

    def start_training(report_callback) -> None:
        if read_run_file(run_dir) is None:
            trainer.run(config, config_name=config.run.name, callbacks=[report_callback, placement], in_trial=True)
        else:  # the sweep was interrupted after this run had started (`cdm tune --resume`)
            trainer.resume(run_dir, callbacks=[report_callback, placement], in_trial=True)

    done = finished_result(run_dir, config, setup.metric, setup.weights)
    if done is not None:  # `cdm tune --resume` after this run had finished
        if setup.pbt:
            _report_with_pointer(done)
        else:
            tune.report(done)
    elif setup.pbt:
        _train_reporting_checkpoints(start_training, config.run.name, setup)
    else:
        start_training(ReportToTune(setup.metric, setup.weights, config.run.name))
