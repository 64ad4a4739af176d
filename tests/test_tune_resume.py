"""A `cdm tune` sweep whose driver is killed resumes with `--resume` and does not redo finished trials.

The sweep runs as the real CLI in a subprocess (its own local Ray): two trials, one at a time, each training in
its Tune actor (`scaling.num_workers=0`; a killed run on workers resumes in tests/test_workflow.py and, from a
bucket, in tests/test_s3.py). As soon as the second trial has recorded its first checkpoint, that whole local Ray
gets SIGKILL (driver, GCS, raylet, every actor). `cdm tune --resume` then continues in a second `cdm` process
(forked: `cdm_forks`): the first trial is not trained again, the second continues from its checkpoint, and MLflow
keeps one parent with two children.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import new_store

pytest.importorskip("ray")
mlflow = pytest.importorskip("mlflow")

from pipelines.train.run_dir import LOCAL_RECORD, RUN_FILE  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CDM = Path(sys.executable).with_name("cdm")
STEPS = 30
NAME = "resumable"


def recorded_checkpoints(run_dir: Path) -> list[str]:
    """Checkpoints recorded for the run, what a continuation resumes from: a trial without workers records each
    in its run file once the checkpoint's folder is whole (pipelines.train.run_dir.LocalCheckpoints)."""
    try:
        record = json.loads((run_dir / RUN_FILE).read_text()).get(LOCAL_RECORD, {})
    except (OSError, ValueError):  # not written yet, or read while it is rewritten
        return []
    return sorted(name for name in ("checkpoint_00000010", "checkpoint_00000020") if name in record)


@pytest.fixture(scope="module")
def killed_and_resumed(digits_dataset, tmp_path_factory, cdm_forks):
    root = tmp_path_factory.mktemp("tune-resume")
    (root / "space.toml").write_text('[space]\n"loss.w_ce" = { grid = [1e-3, 1e-2] }\n\n[tune]\nmax_concurrent = 1\n')
    uri = new_store(root / "mlflow.db")
    args = [
        str(CDM),
        "tune",
        str(ROOT / "configs" / "train_tiny.toml"),
        "--space",
        "space.toml",
        "--name",
        NAME,
        "--scheduler",
        "fifo",
        "--set",
        f"data.uri={digits_dataset}",
        "--set",
        f"run.storage_path={root / 'sweeps'}",
        "--set",
        f"tracking.tracking_uri={uri}",
        "--set",
        f"train.steps={STEPS}",
        "--set",
        "validation.every=10",
        "--set",
        "checkpoint.every=10",
        "--set",
        "scaling.num_workers=0",
    ]
    env = {**os.environ, "CDM_TUNE_VERBOSE": "0"}
    env.pop("RAY_ADDRESS", None)
    trials = root / "sweeps" / NAME / "trials"

    with open(root / "first.log", "w") as log:
        first = subprocess.Popen(args, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 600
        second = None
        while time.monotonic() < deadline and first.poll() is None:
            runs = sorted(trials.glob(f"{NAME}-*")) if trials.exists() else []
            if len(runs) == 2 and recorded_checkpoints(runs[1]):
                second = runs[1]
                break
            time.sleep(0.3)
        # The whole local Ray dies at once, as with a lost machine: the process group (driver, GCS, raylet) and
        # every actor below it (each leads its own process group, so killpg alone would leave the trial's actor
        # to record another checkpoint before it noticed its raylet was gone).
        session = psutil.Process(first.pid).children(recursive=True)
        os.killpg(first.pid, signal.SIGKILL)
        for process in session:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
        first.wait(timeout=60)
        psutil.wait_procs(session, timeout=60)
    assert second is not None, (root / "first.log").read_text()[-3000:]
    first_run = sorted(trials.glob(f"{NAME}-*"))[0]
    before = {
        "first_checkpoints": {p.name: p.stat().st_mtime_ns for p in first_run.glob("checkpoint_0*")},
        "second_recorded": recorded_checkpoints(second),
        "second_checkpoints": sorted(p.name for p in second.glob("checkpoint_0*")),
    }

    # The resumed sweep: the real `cdm tune`, forked from a process that has imported it (its own local Ray too).
    resumed = cdm_forks.run([*args[1:], "--resume"], root, env, timeout=600)
    return root, uri, first_run, second, before, resumed, args


def client(uri):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def test_resume_finishes_the_sweep_without_redoing_the_finished_trial(killed_and_resumed):
    root, uri, first_run, second, before, resumed, _ = killed_and_resumed
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert f"best checkpoint: {root / 'sweeps' / NAME / 'trials'}" in resumed.stdout
    # The first trial had finished before the kill; nothing of it was trained again.
    assert "checkpoint_00000030" in before["first_checkpoints"]
    assert {p.name: p.stat().st_mtime_ns for p in first_run.glob("checkpoint_0*")} == before["first_checkpoints"]
    # The second was interrupted after a checkpoint it had recorded, before its end.
    assert before["second_recorded"] and "checkpoint_00000030" not in before["second_checkpoints"]

    c = client(uri)
    sweep_info = json.loads((root / "sweeps" / NAME / "cdm_sweep.json").read_text())
    parent = c.get_run(sweep_info["mlflow"]["run_id"])
    assert parent.info.status == "FINISHED"
    exp = c.get_experiment_by_name("cdm")
    kids = c.search_runs([exp.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert sorted(k.data.tags["cdm.run_name"] for k in kids) == [first_run.name, second.name]
    for kid in kids:
        assert kid.info.status == "FINISHED" and kid.data.tags["cdm.trial_status"] == "completed"
        steps = sorted(m.step for m in c.get_metric_history(kid.info.run_id, "train/loss"))
        assert steps == list(range(1, STEPS + 1))  # every step logged once, across the kill
    by_name = {k.data.tags["cdm.run_name"]: k for k in kids}
    assert not [t for t in by_name[first_run.name].data.tags if t.startswith("cdm.restarted_from_step.")]
    restarted = [t for t in by_name[second.name].data.tags if t.startswith("cdm.restarted_from_step.")]
    assert restarted == [f"cdm.restarted_from_step.{int(before['second_recorded'][-1][-8:])}"]
    assert (second / "checkpoint_00000030" / "checkpoint.pt").is_file()


def test_resume_refuses_a_changed_sweep(killed_and_resumed, cdm_forks):
    root, *_, args = killed_and_resumed
    out = cdm_forks.run([*args[1:], "--resume", "--set", "train.steps=99"], root)
    assert out.returncode == 2
    assert "--resume: the sweep was started with different settings" in out.stderr and "train.steps" in out.stderr
