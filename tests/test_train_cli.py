"""`cdm train` user mistakes: a one-line message and exit code 2, never a traceback; nothing starts Ray.

Two cases go through the real console script in a subprocess; the rest call the
same entry point (`pipelines.cli.main`) in-process, which is much cheaper.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import cli_in_process

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "train_tiny.toml")
CDM = str(Path(sys.executable).parent / "cdm")


def _cdm(*args, cwd):
    env = {k: v for k, v in os.environ.items() if k not in ("CDM_DEBUG", "MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    return subprocess.run([CDM, *args], cwd=cwd, capture_output=True, text=True, timeout=180, env=env)


def test_bad_config_value_through_the_console_script(tmp_path):
    r = _cdm("train", TINY, "--set", "schedule.name=quadratic", "--set", f"data.uri={tmp_path}", cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert "schedule.name: 'quadratic' is not one of linear, cosine, uniform, ot" in r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    assert not (tmp_path / "mlflow.db").exists()  # failed before any run was opened


def test_missing_dataset_through_the_console_script(tmp_path):
    r = _cdm("train", TINY, "--set", f"data.uri={tmp_path / 'nowhere'}", cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert "nowhere: no such directory; run `cdm prepare" in r.stderr
    assert "Traceback" not in r.stderr + r.stdout


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--set", "optim.lrr=1e-4"], "optim.lrr: unknown setting (did you mean 'lr'?)"),
        (["--set", "train.steps=ten"], "train.steps: 'ten' is not an integer"),
        (["--set", "optim.lr=-1"], "optim.lr: -1.0 must be > 0"),
        (["--set", "scaling.num_workers=3"], "train.batch_size: 32 is not divisible by scaling.num_workers=3"),
        (["--set", "loss.prior=[0.5, 0.5]"], "loss.prior: has 2 entries; schedule.T=20 needs T+2 = 22"),
        (["--set", "model.attn_resolutions=[16]"], "attn_resolutions [16] do not occur in this U-Net"),
        (
            ["--set", "model.conditional=true", "--set", "train.batch_size=4096"],
            "each worker's share of split 'train' has only 1618",
        ),
        (["--set", "data.val_split=valid"], "data.val_split: 'valid' is not a split of"),
        (
            ["--set", "run.init_from=/nowhere/checkpoint_00000010"],
            "run.init_from: no checkpoint.pt in /nowhere/checkpoint_00000010",
        ),
        (["--set", "optim.lr"], "--set 'optim.lr': expected KEY=VALUE"),
        (["--set", "scaling.num_workers=-1"], "scaling.num_workers: -1 must be >= 0"),
        (
            ["--set", "scaling.num_workers=0", "--set", "run.max_failures=1"],
            "run.max_failures: 1 with scaling.num_workers=0: local mode trains in the cdm process itself",
        ),
    ],
)
def test_config_mistakes(argv, message, digits_dataset, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out = cli_in_process(["train", TINY, "--set", f"data.uri={digits_dataset}", *argv], capsys, monkeypatch)
    assert code == 2 and message in out, out
    assert "Traceback" not in out and not (tmp_path / "mlflow.db").exists()


def test_bad_files_and_resume_targets(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.toml").write_text("[optim\nlr = 1")
    (tmp_path / "typo.toml").write_text('[data]\nuri = "x"\n[shedule]\nname = "ot"\n')
    for argv, message in [
        (["train", "missing.toml"], "missing.toml: config file does not exist"),
        (["train", "bad.toml"], "bad.toml: not valid TOML"),
        (["train", "typo.toml"], "shedule: unknown setting (did you mean 'schedule'?)"),
        (["train"], "cdm train needs a CONFIG file"),
        (["train", "--resume", str(tmp_path)], "not a run folder with cdm_run.json"),
        (["train", TINY, "--resume", str(tmp_path)], "give either CONFIG or --resume RUN"),
    ]:
        code, out = cli_in_process(argv, capsys, monkeypatch)
        assert code == 2 and message in out, (argv, out)
        assert "Traceback" not in out


def test_print_config_applies_overrides(capsys, monkeypatch):
    import json

    code, out = cli_in_process(
        ["train", TINY, "--set", "optim.lr=1e-4", "--set", "schedule.name=ot", "--print-config"], capsys, monkeypatch
    )
    assert code == 0
    config, batch = out.rsplit("\nbatch: ", 1)  # the config on stdout, then the batch it makes on stderr
    assert batch.strip() == "32 images per optimizer step = 1 worker(s) × 1 micro-batch(es) of 32"
    printed = json.loads(config)
    assert (
        printed["optim"]["lr"] == 1e-4 and printed["schedule"]["name"] == "ot" and printed["model"]["preset"] == "tiny"
    )
