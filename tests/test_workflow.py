"""`cdm run` end to end on a tiny workflow, with a real local Ray and a real MLflow SQLite store.

The suite's Ray session serves the module; the `cdm run` subprocesses join it through
RAY_ADDRESS instead of starting their own. The tests build on each other in
one work directory (module-scoped fixtures, in this order):

1. `first_run`: every stage runs (sklearn's 8×8 digits, T=20, 30 steps).
2. A rerun skips every stage and reuses the MLflow parent run.
3. `killed_and_resumed`: a variant with another data seed and 60 training steps
   runs as `cdm run` in a subprocess that is SIGKILLed once training has written
   a checkpoint; the rerun skips the prepare stage it finished and continues the
   training run from its checkpoint (same MLflow run), then runs the rest.
4. `--dry-run` prints the plan: every stage, its key and output, run or skip.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import new_store

ray = pytest.importorskip("ray")
mlflow = pytest.importorskip("mlflow")

from pipelines.workflow.progress import TrainingProgress  # noqa: E402
from pipelines.workflow.runner import prepare_plan, run_workflow  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CDM = str(Path(sys.executable).with_name("cdm"))
ALL_STAGES = ["prepare", "nll_untrained", "train", "sample", "nll", "features", "fid"]

# The killed variant: its own data (another split seed) so that it runs a stage before training,
# on a worker, 60 steps with a checkpoint every 10, and only the NLL after training (to keep the test short).
KILLED = [
    "prepare.seed=1",
    "train.scaling.num_workers=1",
    "train.train.steps=60",
    "nll.untrained=false",
    "sample.enabled=false",
    "fid.enabled=false",
]

TINY = f"""
name = "tiny"

[prepare]
source = "digits"
samples_per_shard = 500

[train]
extends = "{ROOT / "configs" / "train_tiny.toml"}"

[train.train]
steps = 30
log_every = 5

[train.validation]
every = 30
max_samples = 64

[train.checkpoint]
every = 10

# Local mode (the loop in the workflow's process): the first run tests the stages, not Ray Train's workers;
# the killed variant trains on workers; the sweep's trials each train in their own Tune actor.
[train.scaling]
num_workers = 0

# Sampling and the NLL run in the workflow's process (workers = 0; their pools are tested in test_sample.py and
# test_nll.py); the FD stage keeps a pool of Ray actors, joined to the suite's Ray.
[sample]
n = 32
steps = 5
batch_size = 16
workers = 0

[nll]
workers = 0

[features]
epochs = 1

[fid]
workers = 1
"""


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("workflow")
    (root / "tiny.toml").write_text(TINY)
    new_store(root / "mlflow.db")  # the store `cdm run` opens by default in its work folder
    return root


def uri_of(workdir: Path) -> str:
    return f"sqlite:///{workdir / 'mlflow.db'}"


def client(workdir: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri_of(workdir))


def children(workdir: Path, parent_id: str) -> list:
    c = client(workdir)
    experiment = c.get_run(parent_id).info.experiment_id
    return c.search_runs([experiment], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'")


def cli(forks, workdir: Path, *args: str) -> subprocess.CompletedProcess:
    """`cdm run` of the module's workflow through `cdm_forks` (the real command, without its import time): the
    dry runs and the mistakes, which end before any work."""
    return forks.run(["run", str(workdir / "tiny.toml"), "--workdir", str(workdir), *args], cwd=Path.cwd())


@pytest.fixture(scope="module")
def first_run(ray_session, workdir):
    lines: list[str] = []
    result = run_workflow(workdir / "tiny.toml", workdir=workdir, echo=lines.append)
    return result, lines


def test_every_stage_runs_and_the_parent_run_holds_the_headline_figures(first_run, workdir):
    result, lines = first_run
    assert result.ran == ALL_STAGES
    for name, record in result.records.items():
        assert record["key"] in record["output"] and Path(record["output"]).is_absolute()
        assert Path(f"{record['output']}.json").is_file(), name
    assert (Path(result.records["sample"]["output"]) / "grid.png").is_file()

    c = client(workdir)
    parent = c.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.info.run_name == "tiny"
    kids = children(workdir, result.parent_run_id)
    assert sorted(r.data.tags["cdm.workflow_stage"] for r in kids) == sorted(ALL_STAGES)
    assert all(r.info.status == "FINISHED" for r in kids)
    by_stage = {r.data.tags["cdm.workflow_stage"]: r for r in kids}
    assert by_stage["train"].info.run_id == result.records["train"]["mlflow_run_id"]
    assert by_stage["nll_untrained"].info.run_name == "nll-untrained"

    metrics = parent.data.metrics
    assert metrics["eval/nll_bpd"] == pytest.approx(by_stage["nll"].data.metrics["eval/nll_bpd"])
    assert metrics["eval/nll_bpd_untrained"] == pytest.approx(by_stage["nll_untrained"].data.metrics["eval/nll_bpd"])
    assert metrics["eval/fd_digits"] == pytest.approx(by_stage["fid"].data.metrics["eval/fd_digits"])
    assert "eval/fid" not in metrics  # a classifier's feature space is never reported as FID
    # 30 steps already beat the untrained network.
    assert metrics["eval/nll_bpd"] < metrics["eval/nll_bpd_untrained"]
    # The model's self-consistency: the NLL stage's gap and ℓ₀ − ℓ₁ (64 test digits), training's own at its
    # final validation (4 of its 64 images: 10% of 3 validations × 64 images × 5 grid points / 20 classes),
    # and the summary's one-line reading of them.
    for key in ("eval/consistency_gap_bpd", "eval/link01_nats", "eval/link01_expected_nats"):
        assert metrics[key] == pytest.approx(by_stage["nll"].data.metrics[key]) and math.isfinite(metrics[key])
    assert metrics["eval/consistency_samples"] == 64 and metrics["val/consistency_samples"] == 4
    assert math.isfinite(metrics["val/consistency_gap_bpd"])
    reading = [line for line in lines if line.strip().startswith("consistency: one-pass figure")]
    assert len(reading) == 1 and "ℓ₀−ℓ₁" in reading[0], lines
    artifacts = {a.path for a in c.list_artifacts(result.parent_run_id)}
    assert {"grid.png", "summary.json"} <= artifacts
    assert parent.data.params["train.train.steps"] == "30"
    # what ran, not the file's placeholders: the prepare stage's output, the train stage's run folder
    assert parent.data.params["train.data.uri"] == result.records["prepare"]["outputs"]["dataset"]
    assert parent.data.params["train.run.storage_path"] == str(Path(result.records["train"]["output"]).parent)

    summary = json.loads((workdir / "outputs" / "workflows" / "tiny" / "summary.json").read_text())
    assert summary["metrics"]["eval/nll_bpd"] == pytest.approx(metrics["eval/nll_bpd"])
    assert Path(summary["grid"]).is_file()
    # The console progress of training is read from the train stage's MLflow run.
    progress = TrainingProgress(uri_of(workdir), "cdm", Path(result.records["train"]["output"]).name, 30)
    assert "step 30/30 (100%)" in progress.poll()


def test_a_rerun_skips_every_stage_and_reuses_the_parent(first_run, workdir):
    result, _ = first_run
    before = {n: Path(f"{r['output']}.json").stat().st_mtime_ns for n, r in result.records.items()}
    lines: list[str] = []
    started = time.perf_counter()
    again = run_workflow(workdir / "tiny.toml", workdir=workdir, echo=lines.append)
    assert again.ran == []
    assert time.perf_counter() - started < 60  # nothing but bookkeeping
    assert again.parent_run_id == result.parent_run_id
    assert sum(line.startswith("[") and line.endswith("skipped") for line in lines) == len(ALL_STAGES)
    assert {n: Path(f"{r['output']}.json").stat().st_mtime_ns for n, r in again.records.items()} == before
    assert len(children(workdir, result.parent_run_id)) == len(ALL_STAGES)
    assert again.summary["metrics"]["eval/nll_bpd"] == pytest.approx(result.summary["metrics"]["eval/nll_bpd"])


def registered_checkpoints(train_dir: Path) -> list[str]:
    """The checkpoints Ray Train has recorded for the run (what a resumed run can start from)."""
    try:
        return sorted(
            set(re.findall(r"checkpoint_\d{8}", (train_dir / "checkpoint_manager_snapshot.json").read_text()))
        )
    except OSError:
        return []


@pytest.fixture(scope="module")
def killed_and_resumed(first_run, ray_session, workdir, cdm_forks):
    overrides = [a for kv in KILLED for a in ("--set", kv)]
    plan, _ = prepare_plan(workdir / "tiny.toml", KILLED, workdir=workdir)
    train_dir = Path(plan.stage("train").output)
    env = {**os.environ, "RAY_ADDRESS": ray_session}
    log = workdir / "killed.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [CDM, "run", str(workdir / "tiny.toml"), "--workdir", str(workdir), *overrides],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        deadline = time.time() + 420
        try:
            while not registered_checkpoints(train_dir):
                assert proc.poll() is None, f"cdm run ended before it was killed:\n{log.read_text()[-3000:]}"
                assert time.time() < deadline, f"no checkpoint in {train_dir}:\n{log.read_text()[-3000:]}"
                time.sleep(0.5)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)  # the whole `cdm run` process group, mid-training
            proc.wait(timeout=60)
    killed_checkpoints = registered_checkpoints(train_dir)
    train_run_id = json.loads((train_dir / "cdm_run.json").read_text())["mlflow"]["run_id"]
    prepare_record = Path(f"{plan.stage('prepare').output}.json")
    assert prepare_record.is_file(), "the prepare stage finished before training started"
    prepare_mtime = prepare_record.stat().st_mtime_ns
    dry = cli(cdm_forks, workdir, "--dry-run", *overrides)

    lines: list[str] = []
    result = run_workflow(workdir / "tiny.toml", KILLED, workdir=workdir, echo=lines.append)
    return {
        "result": result,
        "lines": lines,
        "killed_checkpoints": killed_checkpoints,
        "train_run_id": train_run_id,
        "prepare_record": prepare_record,
        "prepare_mtime": prepare_mtime,
        "dry": dry,
    }


def test_a_killed_run_resumes_training_from_its_checkpoint_without_redoing_earlier_stages(killed_and_resumed, workdir):
    k = killed_and_resumed
    result = k["result"]
    assert k["killed_checkpoints"], "the run was killed after its first checkpoint"
    assert "resume" in k["dry"].stdout  # the plan says the train stage will resume
    assert result.ran == ["train", "nll"]
    assert k["prepare_record"].stat().st_mtime_ns == k["prepare_mtime"]
    assert any("resuming the interrupted training run" in line for line in k["lines"])

    train = result.records["train"]
    assert train["mlflow_run_id"] == k["train_run_id"]  # the interrupted MLflow run, continued
    assert train["step"] == 60
    run = client(workdir).get_run(k["train_run_id"])
    assert run.info.status == "FINISHED"
    restarts = [t for t in run.data.tags if t.startswith("cdm.restarted_from_step.")]
    first_kept = int(k["killed_checkpoints"][0].rsplit("_", 1)[1])
    assert restarts and int(restarts[0].rsplit(".", 1)[1]) >= first_kept
    # No step was trained twice into MLflow: the loss history has each step once.
    steps = [m.step for m in client(workdir).get_metric_history(k["train_run_id"], "train/loss")]
    assert len(steps) == len(set(steps)) and max(steps) == 60

    parent = client(workdir).get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert sorted(r.data.tags["cdm.workflow_stage"] for r in children(workdir, result.parent_run_id)) == [
        "nll",
        "prepare",
        "train",
    ]


def test_dry_run_prints_each_stage_its_key_output_and_whether_it_runs(first_run, workdir, cdm_forks):
    result, _ = first_run
    done = cli(cdm_forks, workdir, "--dry-run")
    assert done.returncode == 0, done.stderr
    for name in ALL_STAGES:
        record = result.records[name]
        line = next(line for line in done.stdout.splitlines() if f" {name} " in f" {line} " and record["key"] in line)
        assert "skip" in line
        assert record["output"] in done.stdout
    changed = cli(cdm_forks, workdir, "--dry-run", "--set", "sample.steps=4")
    assert changed.returncode == 0, changed.stderr
    status = {
        line.split()[1]: line.split()[3]
        for line in changed.stdout.splitlines()
        if line.strip()[:2].rstrip(".").isdigit()
    }
    assert status == {
        "prepare": "skip",
        "nll_untrained": "skip",
        "train": "skip",
        "sample": "run",
        "nll": "skip",
        "features": "skip",
        "fid": "run",
    }


def test_user_mistakes_name_the_setting_and_exit_without_a_traceback(workdir, cdm_forks):
    bad = cli(cdm_forks, workdir, "--dry-run", "--set", "train.optim.lrr=1e-3")
    assert bad.returncode == 2 and "train.optim.lrr" in bad.stderr and "'lr'" in bad.stderr
    assert "Traceback" not in bad.stderr
    bad = cli(cdm_forks, workdir, "--dry-run", "--set", "prepare.source=cifar10")
    assert bad.returncode == 2 and "prepare.path" in bad.stderr and "Traceback" not in bad.stderr
    bad = cli(
        cdm_forks,
        workdir,
        "--dry-run",
        "--set",
        "fid.features=inception",
        "--set",
        "fid.inception_weights=/nonexistent.pth",
    )
    assert bad.returncode == 0 and "cannot run as it is: fid.features" in bad.stdout  # a dry run lists it
    bad = cli(cdm_forks, workdir, "--set", "fid.features=inception", "--set", "fid.inception_weights=/nonexistent.pth")
    assert bad.returncode == 2 and "fid.features" in bad.stderr and "Traceback" not in bad.stderr


SWEEP = """
[space]
"schedule.name" = { grid = ["linear", "ot"] }

[tune]
metric = "val/nll_bpd"
scheduler = "fifo"
max_concurrent = 2
"""


def test_a_tune_stage_sweeps_then_trains_the_best_trial(first_run, workdir):
    (workdir / "sweep.toml").write_text(SWEEP)
    overrides = [
        f"tune.space={workdir / 'sweep.toml'}",
        "train.train.steps=10",
        "train.validation.every=10",
        "nll.enabled=false",
        "sample.enabled=false",
        "fid.enabled=false",
    ]
    lines: list[str] = []
    result = run_workflow(workdir / "tiny.toml", overrides, workdir=workdir, echo=lines.append)
    assert result.ran == ["tune", "train"]  # the data is the first run's (same prepare key)
    best = result.records["tune"]["outputs"]["best_overrides"]
    assert best["schedule.name"] in ("linear", "ot")
    trained = client(workdir).get_run(result.records["train"]["mlflow_run_id"])
    assert trained.data.params["schedule.name"] == best["schedule.name"]

    sweep_run = result.records["tune"]["mlflow_run_id"]
    kids = {r.data.tags["cdm.workflow_stage"]: r.info.run_id for r in children(workdir, result.parent_run_id)}
    assert kids == {"prepare": kids["prepare"], "tune": sweep_run, "train": trained.info.run_id}
    trials = children(workdir, sweep_run)
    assert sorted(r.data.params["schedule.name"] for r in trials) == ["linear", "ot"]
    assert run_workflow(workdir / "tiny.toml", overrides, workdir=workdir, echo=lines.append).ran == []
