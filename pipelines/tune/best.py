"""`cdm train --from-best SWEEP`: train the best trial of a finished sweep further.

Two ways, both starting from what the sweep recorded in its `cdm_sweep.json`:

* retrain (default): a new top-level run with the best trial's whole config,
  plus any `--set` (typically a longer `train.steps`), in the sweep's storage path;
* continue (`--continue-best`): the best trial's own run resumes from its latest
  checkpoint in the same MLflow child run, e.g. a trial ASHA stopped early, or
  one to train past its steps with `--set train.steps=…`.

After a PBT sweep the best "trial" is the best run of a trial (`<id>-at<step>`
when the trial had continued from another's checkpoint): retraining trains its
final settings from scratch, continuing goes on from that run's checkpoint.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from mlflow.tracking import MlflowClient

from pipelines.common import config as cfg
from pipelines.common.errors import UserError
from pipelines.train import trainer
from pipelines.train.config import TrainConfig
from pipelines.train.trainer import TrainResult
from pipelines.tune.sweep_dir import find_sweep_dir, read_sweep, trial_dir


def best_trial(sweep: str) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """(sweep folder, its cdm_sweep.json, its best trial) for SWEEP (a folder or the parent run's MLflow id)."""
    sweep_dir = find_sweep_dir(sweep)
    info = read_sweep(sweep_dir) or {}
    best = info.get("best")
    if not best or not best.get("config"):
        raise UserError(
            f"--from-best {sweep}: the sweep has no best trial yet: it is still running or was interrupted "
            "(continue it with `cdm tune … --resume`), or every trial failed"
        )
    return sweep_dir, info, best


def train_from_best(sweep: str, overrides: Sequence[str] = (), *, continue_run: bool = False) -> TrainResult:
    """Retrain the best trial's config as a new run, or continue the best trial's run."""
    sweep_dir, info, best = best_trial(sweep)
    if continue_run:
        result = trainer.resume(trial_dir(sweep_dir, f"{info['name']}-{best['trial_id']}"), list(overrides))
    else:
        config = cfg.from_dict(TrainConfig, best["config"])
        config = cfg.apply_overrides(
            config,
            {
                "run.name": None,  # a fresh name: <sweep>-best-<time>
                "run.storage_path": sweep_dir.rstrip("/").rsplit("/", 1)[0],  # beside the sweep
                "tracking.parent_run_id": None,  # a run of its own, not one more trial of the sweep
                "run.init_from": None,  # from scratch, also after PBT (whose best run continued another's)
            },
        )
        config = cfg.apply_overrides(config, list(overrides))
        result = trainer.run(config, config_name=f"{info['name']}-best")
    client = MlflowClient(info["mlflow"]["tracking_uri"])
    for key, value in {
        "cdm.from_sweep": sweep_dir,
        "cdm.from_sweep_run_id": info["mlflow"]["run_id"],
        "cdm.from_trial": best["trial_id"],
    }.items():
        client.set_tag(result.mlflow_run_id, key, value)
    return result
