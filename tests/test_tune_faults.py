"""`cdm tune` when a trial's training worker dies mid-run: the sweep finishes, the trial is retried or recorded failed.

Every trial's Ray Train worker dies once at step 3 (the training stage's fault hook,
CDM_FAIL_AT_STEP, set before Ray starts so that the trials' processes see it). The sweep
searches `run.max_failures` over {0, 1}: with 1 the trial's run restarts from its step-2
checkpoint and completes; with 0 the trial fails, is recorded as failed with why, and the
sweep goes on to its summary.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import leave_suite_ray, new_store

ray = pytest.importorskip("ray")

from pipelines.common import config as cfg  # noqa: E402
from pipelines.train.config import TrainConfig  # noqa: E402
from pipelines.tune import space as tune_space  # noqa: E402
from pipelines.tune import sweep as tune  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dying_workers():
    # Its own Ray: the trials' processes must start with CDM_FAIL_AT_STEP in their environment.
    leave_suite_ray()
    with pytest.MonkeyPatch.context() as env:
        env.setenv("CDM_FAIL_AT_STEP", "3")
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        yield
        ray.shutdown()


def test_a_sweep_survives_a_dead_worker_retrying_or_recording_the_trial(dying_workers, digits_dataset, tmp_path):
    config = cfg.load(
        TrainConfig,
        ROOT / "configs" / "train_tiny.toml",
        [
            f"data.uri={digits_dataset}",
            f"run.storage_path={tmp_path / 'sweeps'}",
            f"tracking.tracking_uri={new_store(tmp_path / 'mlflow.db')}",
            "train.steps=6",
            "validation.every=2",
            "checkpoint.every=2",
            "run.log_model=false",
            "sampling.every=0",
        ],
    )
    space = {
        "space": {"run.max_failures": {"grid": [0, 1]}},
        "tune": {"name": "faults", "scheduler": "fifo", "max_concurrent": 2},  # each run has its own marker
    }
    result = tune.run(config, tune_space.parse(space, config), config_name="tiny")
    by_retries = {row.params["run.max_failures"]: row for row in result.rows}
    assert set(by_retries) == {"0", "1"}, result.table()
    assert by_retries["1"].status == "completed" and by_retries["1"].step == 6, result.table()
    assert by_retries["0"].status == "failed" and by_retries["0"].error, result.table()
    assert result.best is not None and result.best.trial_id == by_retries["1"].trial_id
