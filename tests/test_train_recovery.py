"""Training that goes wrong, on a real local Ray and a real MLflow store, and the way back each time.

One run serves the module, in Ray Train's local mode: the recipe of issue 15 diverges for real (no
injected NaN): `optim.lr=1e6`, no warm-up, no clipping, a checkpoint every 2 steps. From there:

* the error names a checkpoint from which a step is finite, and the command it prints
  (with a sane learning rate filled in) really finishes the run;
* that run's newest checkpoint is then truncated and the run extended: `--resume` says
  which checkpoint it passes over and continues from the newest one that loads;
* Ctrl-C and SIGTERM on the real `cdm train`, on a worker and in local mode, end with cdm's message, exit 130,
  and the MLflow run KILLED.
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
import torch
from conftest import cli_in_process, new_store

ray = pytest.importorskip("ray")
mlflow = pytest.importorskip("mlflow")

from cdm_core.checkpoint import load_checkpoint  # noqa: E402
from cdm_core.objective import cdm_loss  # noqa: E402
from pipelines.common import config as cfg  # noqa: E402
from pipelines.data.readers import load_split, to_model_input  # noqa: E402
from pipelines.train.config import TrainConfig  # noqa: E402
from pipelines.train.step import build_network, build_schedule  # noqa: E402
from pipelines.train.trainer import NonFiniteLossError, run  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "train_tiny.toml")
CDM = str(Path(sys.executable).with_name("cdm"))
STEPS = 12
# The data in index order: with Ray Data's shuffles the step that diverges moved from run to run, and when
# no checkpoint came after the last good one the fix had no diverged line to branch from. In this order
# the loss turns non-finite at step 5, after checkpoint 4, from which no step is finite.
DIVERGES = (
    "optim.lr=1e6",
    "optim.warmup_steps=1000000",
    "optim.grad_clip=0",
    "checkpoint.every=2",
    "data.shuffle=none",
    "data.shuffle_buffer=0",
)
KEEP_ALL = "checkpoint.keep_best=100"  # the retention stays out of the way of the tests of fallback
# What goes wrong and the way back are the loop's and the run folder's logic: Ray Train's local mode runs them
# in this process, without a worker group to start for each of the three fits (Ctrl-C below runs both ways:
# on a worker, whose abort is Ray's, and in local mode).
LOCAL = "scaling.num_workers=0"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("recovery")
    return root, new_store(root / "mlflow.db")


def _settings(dataset, store, name: str, steps: int = STEPS) -> list[str]:
    root, uri = store
    return [
        f"data.uri={dataset}",
        f"run.storage_path={root / 'runs'}",
        f"run.name={name}",
        f"tracking.tracking_uri={uri}",
        f"train.steps={steps}",
        "validation.every=1000",
    ]


def _client(store):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=store[1])


def _run_of(store, name: str):
    client = _client(store)
    exp = client.get_experiment_by_name("cdm").experiment_id
    return client.search_runs([exp], filter_string=f"tags.`cdm.run_name` = '{name}'")[0]


@pytest.fixture(scope="module")
def diverged(ray_session, digits_dataset, store):
    config = cfg.load(TrainConfig, TINY, [*_settings(digits_dataset, store, "diverges"), *DIVERGES, KEEP_ALL, LOCAL])
    with pytest.raises(NonFiniteLossError) as failure:
        run(config)
    return config, str(failure.value), store[0] / "runs" / "diverges"


def _finite_step(config: TrainConfig, checkpoint: Path, x: torch.Tensor, seed: int) -> bool:
    """A training step's loss and gradients from `checkpoint`, computed here with cdm_core's loss alone."""
    model = build_network(config, 1, 8)
    model.load_state_dict(load_checkpoint(checkpoint / "checkpoint.pt")["model"])
    loss = cdm_loss(
        model,
        x,
        build_schedule(config),
        w_ce=config.loss.w_ce,
        w_mse=config.loss.w_mse,
        generator=torch.Generator().manual_seed(seed),
    ).total
    loss.backward()
    return bool(torch.isfinite(loss)) and all(bool(torch.isfinite(p.grad).all()) for p in model.parameters())


def test_the_named_checkpoint_takes_a_finite_step_and_the_newer_ones_do_not(diverged, digits_dataset):
    config, message, run_dir = diverged
    found = re.search(r"the last good checkpoint is (\S+), from which a step is finite", message)
    assert found, message
    good = Path(found.group(1))
    assert good.parent == run_dir
    stopped = int(re.search(r"training stopped at step (\d+)", message).group(1))
    assert int(good.name.split("_")[1]) < stopped
    newer = sorted(p.name for p in run_dir.glob("checkpoint_0*") if p.name > good.name)
    assert all(name in message for name in newer), (newer, message)

    images, _ = load_split(str(digits_dataset), "train")
    batches = [torch.as_tensor(to_model_input(images[i : i + 32])) for i in (0, 32, 64)]
    assert all(_finite_step(config, good, x, seed) for seed, x in enumerate(batches)), good.name
    for name in newer:  # said to give non-finite gradients: on other batches and noise, too
        assert not any(_finite_step(config, run_dir / name, x, seed) for seed, x in enumerate(batches)), name


def test_the_printed_fix_finishes_the_run(diverged, store, capsys, monkeypatch):
    _, message, run_dir = diverged
    command = re.search(r"`(cdm train [^`]+)`", message).group(1)
    argv = command.replace("optim.lr=…", "optim.lr=1e-3").split()[1:] + ["--set", "optim.grad_clip=1"]
    code, out = cli_in_process(argv, capsys, monkeypatch)
    assert code == 0, out[-3000:]
    info = _run_of(store, "diverges")
    assert info.info.status == "FINISHED"
    losses = _client(store).get_metric_history(info.info.run_id, "train/loss")
    assert sorted(m.step for m in losses) == list(range(1, STEPS + 1))  # each step once, the replayed ones too
    restarted = int(re.search(r"--from-checkpoint checkpoint_(\d+)", command).group(1))
    assert all(math.isfinite(m.value) for m in losses if m.step > restarted)


def test_resume_passes_over_damaged_checkpoints_along_the_run_s_own_line(diverged, store, capsys, monkeypatch):
    """After the fix, the run's line is G → (G+2)-b … 12-b, G the last good checkpoint the failure named;
    the diverged line's G+2 is no longer the run's.

    With every checkpoint of the branch damaged, the newest one that loads *by step* is the diverged
    line's checkpoint G+2; the run's own line goes back to checkpoint G.
    """
    _, message, run_dir = diverged
    good = re.search(r"the last good checkpoint is \S*?(checkpoint_\d+)", message).group(1)
    start = int(good.split("_")[1])
    info = json.loads((run_dir / "cdm_run.json").read_text())
    (branch,) = info["branches"]
    assert info["branch"] == branch and info["branches"][branch] == good
    damaged = sorted(p for p in run_dir.glob(f"checkpoint_0*{branch}") if p.is_dir())
    assert [p.name for p in damaged] == [f"checkpoint_{s:08d}{branch}" for s in range(start + 2, STEPS + 1, 2)]
    assert (run_dir / f"checkpoint_{start + 2:08d}" / "checkpoint.pt").is_file()  # the diverged line's, intact
    for folder in damaged:
        whole = (folder / "checkpoint.pt").read_bytes()
        (folder / "checkpoint.pt").write_bytes(whole[: len(whole) // 3])
    code, out = cli_in_process(
        ["train", "--resume", str(run_dir), "--set", f"train.steps={STEPS + 4}"], capsys, monkeypatch
    )
    assert code == 0, out[-3000:]
    warning = [line for line in out.splitlines() if line.startswith("warning:") and "continuing from" in line]
    assert len(warning) == 1 and warning[0].count("truncated or damaged") == len(damaged), out[-3000:]
    assert f"continuing from {good}, the newest checkpoint that loads" in warning[0]
    assert "Traceback" not in out
    info_after = json.loads((run_dir / "cdm_run.json").read_text())
    second = info_after["branch"]
    assert second != branch and info_after["branches"] == {branch: good, second: good}
    run = _run_of(store, "diverges")
    losses = _client(store).get_metric_history(run.info.run_id, "train/loss")
    assert sorted(m.step for m in losses) == list(range(1, STEPS + 5))
    assert all(math.isfinite(m.value) for m in losses if m.step > start)
    final = load_checkpoint(run_dir / f"checkpoint_{STEPS + 4:08d}{second}" / "checkpoint.pt")
    assert final["step"] == STEPS + 4


@pytest.mark.parametrize(
    "workers, stop", [(1, signal.SIGTERM), (0, signal.SIGINT)], ids=["worker-sigterm", "local-ctrl-c"]
)
def test_ctrl_c_and_sigterm_end_the_run_killed_with_a_message(ray_session, digits_dataset, store, workers, stop):
    """On a worker, Ray Train's own SIGINT handler aborts the run; in local mode the loop itself is interrupted.

    SIGTERM (kill, Kubernetes, Slurm) goes where Ctrl-C goes (pipelines.common.signals): it calls the SIGINT
    handler of the moment, here Ray Train's, so one run with workers covers both signals' way through Ray's
    abort; before the fix it ended in abseil's handler (exit 134, the run FAILED)."""
    env = {**os.environ, "RAY_ADDRESS": ray_session}
    env.pop("CDM_DEBUG", None)
    name = f"interrupted-{workers}"
    settings = [*_settings(digits_dataset, store, name, 100000), f"scaling.num_workers={workers}"]
    argv = [CDM, "train", TINY, *(a for s in settings for a in ("--set", s))]
    proc = subprocess.Popen(
        argv,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # SIGINT as a terminal's Ctrl-C finds it: a shell's background job (`pytest … &`) inherits it ignored
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    client, deadline = _client(store), time.monotonic() + 180
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            run_id = _run_of(store, name).info.run_id
            if client.get_metric_history(run_id, "train/loss"):
                break
        except (IndexError, AttributeError, mlflow.exceptions.MlflowException):
            pass
        time.sleep(0.5)
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    proc.send_signal(stop)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert "interrupted: what was finished is kept" in err and "Traceback" not in err, err[-3000:]
    assert _run_of(store, name).info.status == "KILLED"
