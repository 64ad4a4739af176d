"""The tune stage of `cdm run`: a Ray Tune sweep before training; the train stage then trains the best trial's settings.

A workflow asks for it with a `[tune]` table (empty or absent: no sweep), e.g.

    [tune]
    space = "../spaces/schedules.toml"   # the search space file of `cdm tune --space`
    num_samples = 8
    scheduler = "asha"

HOOK (issue 5): the sweep itself is `cdm tune` (pipelines/tune.py), built
alongside this workflow. The workflow calls one function of it,

    pipelines.tune.run_for_workflow(train_config: TrainConfig, options: dict, *, output: str,
                                    tracking_uri: str, experiment: str, parent_run_id: str)
        -> {"best_overrides": {dotted key: value}, "metric": str, "best_value": float,
            "mlflow_run_id": str | None}

and until that exists a workflow with a `[tune]` table stops before any work
with a message saying so (`require_tune`), instead of failing after training.
"""

from __future__ import annotations

from typing import Any

from pipelines.errors import UserError

ENTRY_POINT = "run_for_workflow"


def tune_settings(config: Any) -> dict[str, Any]:
    """What the tune stage's key hashes: the whole [tune] table (every option can change the best trial)."""
    return dict(config.tune)


def require_tune() -> Any:
    """The `pipelines.tune` module with the workflow's entry point, or a UserError that says what is missing."""
    try:
        from pipelines import tune
    except ImportError:
        tune = None
    if tune is None or not hasattr(tune, ENTRY_POINT):
        raise UserError("[tune]: this installation has no `cdm tune` workflow entry point yet "
                        f"(pipelines.tune.{ENTRY_POINT}); remove the [tune] table to train the config as it is, "
                        "or run `cdm tune` yourself and put the best settings in [train]")
    return tune


def run_tune(train_config: Any, options: dict[str, Any], *, output: str, tracking_uri: str, experiment: str,
             parent_run_id: str) -> dict[str, Any]:
    tune = require_tune()
    result = getattr(tune, ENTRY_POINT)(train_config, dict(options), output=output, tracking_uri=tracking_uri,
                                        experiment=experiment, parent_run_id=parent_run_id)
    if not isinstance(result, dict) or not isinstance(result.get("best_overrides"), dict):
        raise RuntimeError(f"pipelines.tune.{ENTRY_POINT} returned {result!r}; expected a dict with best_overrides")
    return result
