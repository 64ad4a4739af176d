"""The sweep file of `cdm tune`: parsing, checks against TrainConfig before Ray starts, CLI errors. No Ray here."""

from __future__ import annotations

import math
import subprocess
from pathlib import Path

import pytest

from pipelines.common import config as cfg
from pipelines.common.config import ConfigError
from pipelines.train.config import TrainConfig
from pipelines.tune import space as tune_space
from pipelines.tune.results import FAILED, TrialRow, best_row, format_table
from pipelines.tune.trial import objective

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def base() -> TrainConfig:
    return cfg.load(TrainConfig, ROOT / "configs" / "train_tiny.toml")


def parse(base, space, tune=None):
    return tune_space.parse({"space": space, **({"tune": tune} if tune is not None else {})}, base)


def test_every_sampler_becomes_the_ray_domain(base):
    from ray import tune

    sweep = parse(
        base,
        {
            "schedule.name": {"grid": ["linear", "ot"]},
            "loss": {"w_ce": {"loguniform": [1e-4, 1e-1]}},  # nested tables work too
            "loss.w_mse": {"uniform": [0.5, 2]},
            "optim.lr": {"choice": [1e-3, 5e-3]},
            "train.seed": {"randint": [0, 100]},
            "train.steps": 20,  # fixed for every trial
        },
    )
    space = sweep.param_space()
    assert space["schedule"]["name"] == {"grid_search": ["linear", "ot"]}
    assert isinstance(space["loss"]["w_ce"], tune.search.sample.Float)
    assert space["loss"]["w_ce"].lower == 1e-4 and space["loss"]["w_ce"].upper == 1e-1
    assert isinstance(space["loss"]["w_ce"].sampler, tune.search.sample.LogUniform)
    assert isinstance(space["loss"]["w_mse"].sampler, tune.search.sample.Uniform)
    assert space["optim"]["lr"].categories == [1e-3, 5e-3]
    assert isinstance(space["train"]["seed"], tune.search.sample.Integer) and space["train"]["seed"].upper == 100
    assert space["train"]["steps"] == 20
    assert [d.key for d in sweep.searched] == ["schedule.name", "loss.w_ce", "loss.w_mse", "optim.lr", "train.seed"]
    assert sweep.grid_size() == 2
    # A sample is a valid TrainConfig through the config system's Tune path.
    trial = cfg.apply_overrides(
        base, {"schedule": {"name": "ot"}, "loss": {"w_ce": 0.01}, "train": {"seed": 7, "steps": 20}}
    )
    assert (trial.schedule.name, trial.loss.w_ce, trial.train.seed, trial.train.steps) == ("ot", 0.01, 7, 20)


@pytest.mark.parametrize(
    "space, message",
    [
        ({"loss.w_cee": {"choice": [1e-3]}}, "space: loss.w_cee: unknown setting (did you mean 'w_ce'?)"),
        ({"lose": {"w_ce": {"choice": [1e-3]}}}, "space: lose: unknown setting (did you mean 'loss'?)"),
        (
            {"loss.w_ce": {"choice": [1e-3, -1]}},
            "space: loss.w_ce: choice value -1 does not fit the config: loss.w_ce: -1.0 must be >= 0",
        ),
        (
            {"schedule.name": {"grid": ["linear", "quadratic"]}},
            "schedule.name: 'quadratic' is not one of linear, cosine, uniform, ot",
        ),
        ({"schedule.name": {"uniform": [0, 1]}}, "space: schedule.name: uniform needs a numeric setting"),
        (
            {"train.steps": {"loguniform": [10, 100]}},
            "space: train.steps: loguniform draws real numbers but train.steps is an integer",
        ),
        ({"optim.lr": {"randint": [1, 3]}}, "space: optim.lr: randint draws integers but optim.lr is a number"),
        ({"optim.lr": {"loguniform": [0, 1e-3]}}, "space: optim.lr: loguniform needs 0 < low"),
        ({"optim.lr": {"uniform": [1e-3, 1e-4]}}, "space: optim.lr: uniform needs low < high"),
        ({"optim.lr": {"uniform": [1e-3]}}, "space: optim.lr: uniform needs [low, high] numbers"),
        ({"optim.lr": {"choice": []}}, "space: optim.lr: choice needs a non-empty list"),
        ({"optim.lr": {"sample": [1e-4, 1e-3]}}, "space: optim.lr: { sample = … } is not a sampler"),
        (
            {"schedule.T": {"randint": [2, 40]}},
            "space: schedule.T: randint bound 2 does not fit the config: sampling.steps: 5 exceeds schedule.T=2",
        ),
        ({"loss": {"choice": [1]}}, "space: loss: is a section; search its settings, e.g. loss.w_ce"),
        ({"run.name": {"choice": ["a", "b"]}}, "space: run.name: is set by cdm tune for every trial"),
        ({"tracking.experiment": {"choice": ["a", "b"]}}, "space: tracking.experiment: is set by cdm tune"),
        ({"optim.lr": 1e-3}, "every setting is fixed"),
        ({}, "needs a [space] table"),
    ],
)
def test_bad_spaces_are_refused_naming_the_setting(base, space, message):
    with pytest.raises(ConfigError) as err:
        parse(base, space)
    assert message in str(err.value)


@pytest.mark.parametrize(
    "tune, message",
    [
        ({"metric": "val/nll"}, "tune.metric: 'val/nll' is not one of val/nll_bpd, val/mse, weighted"),
        ({"metric": "weighted", "weights": {"val/fid": 1.0}}, "tune.weights: 'val/fid' is not a validation metric"),
        ({"metric": "weighted", "weights": {"val/mse": 0.0}}, "tune.weights: needs at least one positive weight"),
        ({"scheduler": "hyperband"}, "tune.scheduler: 'hyperband' is not one of asha, fifo, pbt"),
        ({"num_samples": 0}, "tune.num_samples: 0 must be >= 1"),
        ({"reduction_factor": 1}, "tune.reduction_factor: 1.0 must be > 1"),
        ({"schedular": "fifo"}, "tune.schedular: unknown setting (did you mean 'scheduler'?)"),
    ],
)
def test_bad_tune_settings_are_refused(base, tune, message):
    with pytest.raises(ConfigError) as err:
        parse(base, {"optim.lr": {"choice": [1e-3]}}, tune)
    assert message in str(err.value)


def test_nll_is_not_a_metric_of_a_ddm(base):
    ddm = cfg.apply_overrides(base, {"model.kind": "ddm"})
    with pytest.raises(ConfigError, match="val/nll_bpd.*does not exist for a DDM"):
        parse(ddm, {"optim.lr": {"choice": [1e-3]}})
    assert parse(ddm, {"optim.lr": {"choice": [1e-3]}}, {"metric": "val/mse"}).settings.tune_metric == "val/mse"


def test_the_shipped_sweep_files_fit_their_configs():
    default = tune_space.load(
        ROOT / "configs" / "space_default.toml", cfg.load(TrainConfig, ROOT / "configs" / "mnist.toml")
    )
    assert {d.key: d.sampler for d in default.dimensions} == {
        "schedule.name": "grid",
        "loss.w_ce": "loguniform",
        "loss.w_mse": "loguniform",
        "optim.lr": "loguniform",
    }
    assert dict(zip(*[default.dimensions[0].values] * 2)).keys() == {"linear", "cosine", "uniform", "ot"}
    assert default.dimensions[1].values == (1e-4, 1e-1)
    tiny = tune_space.load(
        ROOT / "configs" / "space_tiny.toml",
        cfg.load(TrainConfig, ROOT / "configs" / "train_tiny.toml"),
        {"num_samples": 2, "scheduler": "fifo"},
    )  # CLI flags override [tune]
    assert tiny.grid_size() == 4 and tiny.settings.num_samples == 2 and tiny.settings.scheduler == "fifo"


def test_objective_is_the_metric_or_the_weighted_sum_and_inf_when_missing():
    m = {"val/nll_bpd": 3.0, "val/mse": 0.5}
    assert objective(m, "val/nll_bpd", {}) == 3.0
    assert objective(m, "val/weighted", {"val/nll_bpd": 1.0, "val/mse": 2.0}) == 4.0
    assert objective({"val/mse": 0.5}, "val/nll_bpd", {}) == math.inf  # validation drops a NaN NLL
    assert objective({"val/nll_bpd": float("nan")}, "val/nll_bpd", {}) == math.inf


def test_table_is_sorted_best_first_with_failures_last():
    rows = [
        TrialRow(
            "t2",
            "r2",
            FAILED,
            3,
            math.inf,
            {"optim.lr": "10000.0"},
            None,
            error="Traceback …\nNonFiniteLossError: the loss is nan",
        ),
        TrialRow("t0", "r0", "completed", 20, 2.5, {"optim.lr": "0.005"}, "/x/checkpoint_00000020"),
        TrialRow("t1", "r1", "stopped early", 10, 4.0, {"optim.lr": "1e-07"}, "/x/checkpoint_00000010"),
    ]
    rows.sort(key=lambda r: (r.status == FAILED, r.value, r.trial_id))
    assert best_row(rows).trial_id == "t0"
    lines = format_table(rows, "val/nll_bpd", ["optim.lr"]).splitlines()
    assert lines[0].split() == ["#", "trial", "status", "step", "val/nll_bpd", "optim.lr"]
    assert [line.split()[1] for line in lines[2:5]] == ["t0", "t1", "t2"]
    assert "stopped early" in lines[3] and lines[4].split()[2] == "failed"
    assert lines[-1] == "#3 t2 failed: NonFiniteLossError: the loss is nan"
    assert best_row([rows[-1]]) is None


def test_cli_refuses_a_bad_space_file_before_ray_starts(tmp_path, cdm_forks):
    def _cdm(*args: str, cwd: Path) -> subprocess.CompletedProcess:
        return cdm_forks.run(list(args), cwd=cwd)

    (tmp_path / "space.toml").write_text('[space]\n"loss.w_cee" = { loguniform = [1e-4, 1e-1] }\n')
    out = _cdm("tune", str(ROOT / "configs" / "train_tiny.toml"), "--space", "space.toml", cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    assert "space.toml: space: loss.w_cee: unknown setting (did you mean 'w_ce'?)" in out.stderr
    assert "Traceback" not in out.stderr and "Started a local Ray" not in out.stderr
    out = _cdm(
        "tune",
        str(ROOT / "configs" / "train_tiny.toml"),
        "--space",
        str(ROOT / "configs" / "space_tiny.toml"),
        "--resume",
        cwd=tmp_path,
    )
    assert out.returncode == 2 and "--resume needs the sweep's name: add --name NAME" in out.stderr
    out = _cdm("train", "--from-best", str(tmp_path), cwd=tmp_path)
    assert out.returncode == 2 and "not a sweep folder with cdm_sweep.json" in out.stderr
    out = _cdm("train", "--continue-best", cwd=tmp_path)
    assert out.returncode == 2 and "--continue-best needs --from-best SWEEP" in out.stderr


@pytest.mark.parametrize(
    "settings, overrides, message",
    [
        (
            {"scheduler": "pbt", "perturbation_interval": 15},
            ["train.steps=40", "checkpoint.every=10"],
            "tune.perturbation_interval: 15 steps must be a multiple of checkpoint.every (10",
        ),
        ({"scheduler": "pbt"}, ["train.steps=40", "checkpoint.every=40"], "and below train.steps (40)"),
        (
            {"scheduler": "asha", "grace_period": 40},
            ["train.steps=40"],
            "tune.grace_period: 40 steps is not before the end",
        ),
        (
            {"scheduler": "asha"},
            ["train.steps=40", "checkpoint.every=40"],
            "set checkpoint.every lower (e.g. --set checkpoint.every=4)",
        ),
    ],
)
def test_scheduler_settings_that_cannot_work_are_refused(base, settings, overrides, message):
    from pipelines.common.errors import UserError
    from pipelines.tune.sweep import _scheduler

    config = cfg.apply_overrides(base, overrides)
    with pytest.raises(UserError) as err:
        _scheduler(parse(config, {"optim.lr": {"choice": [1e-3]}}, settings), config)
    assert message in str(err.value)


def test_asha_rungs_end_before_the_last_step_so_finishing_trials_are_not_cut(base):
    from pipelines.tune.sweep import _scheduler

    config = cfg.apply_overrides(base, ["train.steps=40", "checkpoint.every=10"])
    asha = _scheduler(parse(config, {"optim.lr": {"choice": [1e-3]}}, {"reduction_factor": 2}), config)
    assert asha._time_attr == "step" and asha._stop_last_trials is False
    assert [milestone for milestone, _ in asha._brackets[0]._rungs] == [20, 10]


def test_pbt_mutates_only_what_a_checkpoint_survives_and_copies_the_rest(base):
    from ray import tune as ray_tune

    from pipelines.tune.sweep import _scheduler

    config = cfg.apply_overrides(base, ["train.steps=40", "checkpoint.every=10"])
    sweep = parse(
        config,
        {
            "optim.lr": {"loguniform": [1e-4, 1e-2]},
            "loss.w_ce": {"grid": [1e-3, 1e-2]},
            "schedule.name": {"grid": ["linear", "ot"]},
        },
        {"scheduler": "pbt", "perturbation_interval": 20, "quantile_fraction": 0.5},
    )
    mutations = sweep.pbt_mutations()
    assert set(mutations) == {"optim", "loss"}  # the schedule is drawn per trial, then inherited from the donor
    assert isinstance(mutations["optim"]["lr"], ray_tune.search.sample.Float)
    assert mutations["loss"]["w_ce"] == [1e-3, 1e-2]
    pbt = _scheduler(sweep, config)
    assert pbt._time_attr == "step" and pbt._perturbation_interval == 20 and pbt._quantile_fraction == 0.5


def test_pbt_refuses_a_space_it_could_not_mutate(base):
    with pytest.raises(ConfigError) as err:
        parse(base, {"schedule.name": {"grid": ["linear", "ot"]}}, {"scheduler": "pbt"})
    assert "may change only optim.*, loss.w_ce, loss.w_mse; the [space] searches none" in str(err.value)
