"""The population based training scheduler of `cdm tune --scheduler pbt`."""

from __future__ import annotations

from typing import Any

from ray.tune.schedulers import PopulationBasedTraining, TrialScheduler


class PBTBeforeTheEnd(PopulationBasedTraining):
    """Ray Tune's PBT, except that a trial's report at its final step is left alone.

    There is nothing left to train then: copying another trial's checkpoint into
    it would only start a new run with no steps (Tune's PBT has no max_t).
    """

    def __init__(self, *, final_step: int, **kwargs: Any):
        super().__init__(**kwargs)
        self.final_step = final_step

    def on_trial_result(self, tune_controller, trial, result):
        if result.get(self._time_attr, 0) >= self.final_step:
            return TrialScheduler.CONTINUE
        return super().on_trial_result(tune_controller, trial, result)
