"""One trial of `cdm tune`: the driver function Ray Tune runs, which trains with `pipelines.train`.

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
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

from ray.tune.integration.ray_train import TuneReportCallback

from pipelines import config as cfg
from pipelines.train_config import TrainConfig


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

    def run_name(self, trial_id: str) -> str:
        return f"{self.sweep}-{trial_id}"

    def trial_config(self, params: dict[str, Any], trial_id: str) -> TrainConfig:
        """The base config with the trial's sampled values, its run folder and its MLflow parent."""
        config = cfg.apply_overrides(TrainConfig, params, base=self.base_config)
        return cfg.apply_overrides(config, {
            "run.name": self.run_name(trial_id),
            "run.storage_path": self.trials_dir,
            "tracking.tracking_uri": self.tracking_uri,
            "tracking.experiment": self.experiment,
            "tracking.parent_run_id": self.parent_run_id,
        })


def objective(metrics: dict[str, Any], metric: str, weights: dict[str, float]) -> float:
    """The value Tune minimises; +inf when it is missing or not finite (the validation drops NaNs)."""
    from pipelines.tune_space import WEIGHTED_METRIC

    if metric == WEIGHTED_METRIC:
        parts = [w * float(metrics.get(k, math.inf)) for k, w in weights.items() if w]
        value = sum(parts) if parts else math.inf
    else:
        value = float(metrics.get(metric, math.inf))
    return value if math.isfinite(value) else math.inf


class ReportToTune(TuneReportCallback):
    """Forwards rank 0's report to the Tune trial, with the sweep's objective always present.

    Tune refuses results without the optimised metric, and a diverged model's
    validation has no finite NLL/MSE; +inf keeps such a trial comparable (and last).
    """

    def __init__(self, metric: str, weights: dict[str, float]):
        super().__init__()
        self.metric = metric
        self.weights = dict(weights)

    def after_report(self, run_context, metrics, checkpoint):
        first = dict(metrics[0])
        first[self.metric] = objective(first, self.metric, self.weights)
        super().after_report(run_context, [first, *metrics[1:]], checkpoint)


def finished_result(run_dir: str, config: TrainConfig, metric: str, weights: dict[str, float]) -> Optional[dict[str, Any]]:
    """The final report of a trial whose run completed all its steps earlier (None if it did not)."""
    from mlflow.tracking import MlflowClient

    from pipelines.tune_sweep import run_info

    info = run_info(run_dir)
    if info is None:
        return None
    run = MlflowClient(info["mlflow"]["tracking_uri"]).get_run(info["mlflow"]["run_id"])
    if run.info.status != "FINISHED" or run.data.tags.get("cdm.final_step") != str(config.train.steps):
        return None
    report = {k: v for k, v in run.data.metrics.items() if k.startswith("val/")}
    report["step"] = config.train.steps
    report[metric] = objective(report, metric, weights)
    checkpoint = run.data.tags.get("cdm.last_checkpoint")
    if checkpoint:
        report["checkpoint_path"] = checkpoint
    return report


def cdm_trial(params: dict[str, Any], setup: TrialSetup) -> None:
    """Ray Tune's trainable: train (or continue, or just report) this trial's run."""
    import ray
    from ray import tune

    from pipelines import train
    from pipelines.tune_resources import RecordPlacementGroup, ledger_name
    from pipelines.tune_sweep import join, run_info

    trial_id = tune.get_context().get_trial_id()
    ledger = ray.get_actor(ledger_name(setup.sweep))
    ray.get(ledger.add_actor.remote(trial_id, ray.get_runtime_context().get_actor_id()))
    callbacks = [ReportToTune(setup.metric, setup.weights), RecordPlacementGroup(setup.sweep, trial_id)]

    config = setup.trial_config(params, trial_id)
    run_dir = join(setup.trials_dir, config.run.name)
    if run_info(run_dir) is None:
        train.run(config, config_name=config.run.name, callbacks=callbacks)
        return
    # The sweep was interrupted after this trial had started (`cdm tune --resume`).
    done = finished_result(run_dir, config, setup.metric, setup.weights)
    if done is not None:
        tune.report(done)
        return
    train.resume(run_dir, callbacks=callbacks)
