"""The tune stage of `cdm run`: a Ray Tune sweep before training; the train stage then trains the best trial's settings.

A workflow asks for it with a `[tune]` table (empty or absent: no sweep), e.g.

    [tune]
    space = "../space_default.toml"   # a sweep file of `cdm tune --space`, relative to the workflow file
    num_samples = 8                    # any [tune] setting of a sweep file overrides the file's

The sweep is `cdm tune` itself (pipelines/tune.py, issue 5), through its one
entry point for workflows,

    pipelines.tune.run_for_workflow(train_config: TrainConfig, options: dict, *, output: str,
                                    tracking_uri: str, experiment: str, parent_run_id: str)
        -> {"best_overrides": {dotted key: value}, "metric": str, "best_value": float,
            "mlflow_run_id": str | None, ...}

which runs (or, when `output` already holds it, resumes) the sweep in the stage's
output folder with its MLflow parent nested under the workflow's. A build
without it stops before any work with a message (`require_tune`) rather than
after training.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipelines.errors import UserError

ENTRY_POINT = "run_for_workflow"


def tune_settings(config: Any) -> dict[str, Any]:
    """What the tune stage's key hashes: the whole [tune] table and the sweep file's content (not just its name)."""
    from pipelines import config as cfg

    settings = dict(config.tune)
    space = settings.get("space")
    if isinstance(space, str):
        if not Path(space).is_file():
            raise UserError(f"tune.space: {space} does not exist (a sweep file, as for `cdm tune --space`)")
        settings["space_file"] = cfg.read_file(space)
    return settings


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
