"""The tune stage: `cdm tune CONFIG --space SPACE.toml` searches the CDM design space with Ray Tune.

Each trial is a `cdm train` run of CONFIG with the trial's sampled settings
(pipelines.tune.trial); the sweep file says what to search and how
(pipelines.tune.space). The driver checks the config, the dataset and the
sweep file before Ray starts, opens one MLflow parent run for the sweep, runs
`tune.Tuner` over the trials, and ends with a table of trials sorted by the
metric and the best trial's config, metric and checkpoint on the parent run:

    params   the base config (minus the searched settings), space.<key> = the sampler, tune.<setting>
    metrics  <metric> = the best trial's value; tune/trials_<status> counts
    tags     cdm.stage = tune, cdm.sweep_dir, cdm.metric, cdm.best_trial, cdm.best_run_id,
             cdm.best_checkpoint, cdm.best.<key> = the best trial's value of each searched setting
    artifacts  best_config.json (the best trial's whole TrainConfig), trials.txt, trials.json

Trials that fail (e.g. NaN from an extreme learning rate) are recorded as failed
and the sweep goes on. A sweep whose driver was killed continues with
`--resume`: Tune restores its state, finished trials are not run again, and an
interrupted trial continues from its latest checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import mlflow
import ray
from mlflow.tracking import MlflowClient
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search.basic_variant import BasicVariantGenerator

from pipelines.common import config as cfg
from pipelines.common import storage
from pipelines.common.console import echo, warn
from pipelines.common.errors import UserError
from pipelines.common.ray_session import cluster_address, ensure_ray
from pipelines.common.tracking import mlflow_run, reopened_run, store_uri
from pipelines.train.config import TrainConfig
from pipelines.train.run_dir import read_run_file
from pipelines.train.trainer import check_ray_train_v2, resolve
from pipelines.tune import space as tune_space
from pipelines.tune.pbt import PBTBeforeTheEnd
from pipelines.tune.resources import open_ledger
from pipelines.tune.results import TrialRow, best_row, counts, format_table, trial_rows
from pipelines.tune.sweep_dir import SWEEP_FILE, TRIALS_DIR, TUNE_DIR, check_name, read_sweep, trial_dir, write_sweep
from pipelines.tune.tracking import SweepTracker
from pipelines.tune.trial import TrialSetup, cdm_trial

# What one trial's driver (the Tune trainable) reserves: it only waits on its TorchTrainer,
# whose workers reserve their own CPUs/GPUs. Tune needs a non-empty request, and a fraction
# of a CPU would leave Ray Data one short of a whole CPU for its read tasks; memory it is.
TRIAL_DRIVER_RESOURCES = {"CPU": 0, "memory": 256 * 1024**2}


def trial_resources(config: TrainConfig) -> dict[str, float]:
    """What a trial's actor reserves: in local mode (no workers) it trains itself, so one worker's share."""
    s = config.scaling
    if s.num_workers:
        return TRIAL_DRIVER_RESOURCES
    return {**TRIAL_DRIVER_RESOURCES, "CPU": s.cpus_per_worker, **({"GPU": s.gpus_per_worker} if s.use_gpu else {})}


def _trial_workers(config: TrainConfig) -> int:
    """How many workers' CPUs/GPUs a trial holds: in local mode its actor trains, with one worker's share."""
    return max(config.scaling.num_workers, 1)


def _cpus_per_trial(config: TrainConfig) -> float:
    """A trial's workers' CPUs plus one for Ray Data's read tasks."""
    return _trial_workers(config) * config.scaling.cpus_per_worker + 1


@dataclass
class TuneResult:
    name: str
    sweep_dir: str
    mlflow_run_id: str
    metric: str
    searched: list[str]
    rows: list[TrialRow]
    best: Optional[TrialRow]
    best_config: Optional[dict[str, Any]]  # the best trial's TrainConfig as plain dicts
    seconds: float

    def table(self) -> str:
        return format_table(self.rows, self.metric, self.searched)


# --------------------------------------------------------------------------- checks before Ray


def _local_paths_absolute(config: TrainConfig, tracking_uri: str) -> tuple[TrainConfig, str]:
    """Tune runs each trial in its own working directory: relative paths must not reach the trials."""
    data_uri = storage.absolute(config.data.uri)
    prefix = "sqlite:///"
    if tracking_uri.startswith(prefix) and not tracking_uri.startswith(prefix + "/"):
        tracking_uri = prefix + str(Path(tracking_uri[len(prefix) :]).resolve())
    return cfg.apply_overrides(config, {"data.uri": data_uri}), tracking_uri


def _check_against_saved(saved: dict[str, Any], config: TrainConfig, sweep: tune_space.SweepFile) -> None:
    before, after = cfg.flatten(saved["config"]), cfg.flatten(cfg.to_dict(config))
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    if saved.get("sweep_file", {}).get("space") != sweep.raw.get("space"):
        changed.insert(0, "the [space] of the sweep file")
    if changed:
        raise UserError(
            f"--resume: the sweep was started with different settings ({', '.join(changed[:6])}"
            f"{', …' if len(changed) > 6 else ''}); resume with the same CONFIG, --set and --space, "
            "or start a new sweep with another --name"
        )


def _max_concurrent(config: TrainConfig, wanted: int, *, can_grow: bool = False) -> int:
    """As many trials as the cluster's CPUs/GPUs fit (each trial's workers plus one CPU for Ray Data), at most `wanted`.

    More would not wait their turn: each trial's Train workers would take their CPUs and the Ray Data
    read tasks of every trial would find none left, so no trial would ever get its first batch.
    A cluster joined by address may be growing (an autoscaler adds nodes for the trials' pending
    workers): there an explicit `wanted` is kept, with a warning, instead of the moment's fit.
    """
    s = config.scaling
    total = ray.cluster_resources()
    per_trial_cpus = _cpus_per_trial(config)
    fits = [int(total.get("CPU", 0) // per_trial_cpus)]
    if s.use_gpu:
        fits.append(int(total.get("GPU", 0) // (_trial_workers(config) * s.gpus_per_worker)))
    fit = min(fits)
    have = f"the cluster has {total.get('CPU', 0):g} CPUs" + (f" and {total.get('GPU', 0):g} GPUs" if s.use_gpu else "")
    if can_grow and wanted > fit:
        warn(
            f"warning: {wanted} trials at once need {wanted * per_trial_cpus:g} CPUs (each trial's workers plus one "
            f"for Ray Data) and {have} now; starting {wanted}, whose workers wait for the nodes the autoscaler "
            f"adds (on a cluster that cannot grow, the sweep stalls: give --max-concurrent {max(fit, 1)})"
        )
        return wanted
    if can_grow and not wanted and fit < 1:
        warn(
            f"warning: {have} now, too few for one trial; starting one (on an autoscaling cluster, "
            "--max-concurrent N runs N as the cluster grows)"
        )
    fit = max(1, fit)
    if wanted > fit:
        warn(
            f"warning: {wanted} trials at once need {wanted * per_trial_cpus:g} CPUs "
            f"(each trial's workers plus one for Ray Data) but {have}; "
            f"running {fit} at a time (joined by RAY_ADDRESS or run.ray_address, a cluster that grows keeps --max-concurrent)"
        )
    return min(wanted, fit) if wanted else fit


def _scheduler(sweep: tune_space.SweepFile, config: TrainConfig):
    settings = sweep.settings
    steps = config.train.steps
    if settings.scheduler == "fifo":
        return FIFOScheduler()
    if settings.scheduler == "asha":
        if config.checkpoint.every >= steps:
            raise UserError(
                f"--scheduler asha compares trials at their checkpoints, where they report their validation "
                f"metrics, but checkpoint.every={config.checkpoint.every} leaves none before the end "
                f"(train.steps={steps}); set checkpoint.every lower (e.g. --set checkpoint.every={max(1, steps // 10)}) "
                "or use --scheduler fifo"
            )
        grace = settings.grace_period or config.checkpoint.every
        if grace >= steps:
            raise UserError(
                f"tune.grace_period: {grace} steps is not before the end of training (train.steps={steps}); "
                "ASHA could never stop a trial early. Lower it or use --scheduler fifo"
            )
        # Trials report at checkpoints (the step is ASHA's time). Rungs strictly before the last step, and no
        # forced stop at max_t: a trial that reaches the end finishes its run (final tags, model) undisturbed.
        return ASHAScheduler(
            time_attr="step",
            grace_period=grace,
            max_t=steps - 1,
            reduction_factor=settings.reduction_factor,
            stop_last_trials=False,
        )
    every = config.checkpoint.every
    interval = settings.perturbation_interval or every
    if interval % every or interval >= steps:
        raise UserError(
            f"tune.perturbation_interval: {interval} steps must be a multiple of checkpoint.every ({every}: "
            f"PBT copies checkpoints, which exist only there) and below train.steps ({steps}); "
            f"e.g. --set checkpoint.every={max(1, steps // 10)}"
        )
    # Trials report (with a checkpoint) at checkpoint steps; a trial in the bottom quantile continues
    # from a top trial's latest checkpoint with its settings, mutated (pipelines.tune.trial).
    return PBTBeforeTheEnd(
        final_step=steps,
        time_attr="step",
        perturbation_interval=interval,
        hyperparam_mutations=sweep.pbt_mutations(),
        quantile_fraction=settings.quantile_fraction,
        resample_probability=settings.resample_probability,
        perturbation_factors=(1.2, 0.8),
    )


# --------------------------------------------------------------------------- the stage


def _parent_params(config: TrainConfig, sweep: tune_space.SweepFile) -> dict[str, Any]:
    searched = {d.key for d in sweep.dimensions}
    base = {k: v for k, v in cfg.flatten(cfg.to_dict(config)).items() if k not in searched}
    return {
        **base,
        **{f"space.{d.key}": d.describe() for d in sweep.dimensions},
        **{f"tune.{k}": v for k, v in cfg.flatten(cfg.to_dict(sweep.settings)).items()},
    }


def _tuner(
    trainable, sweep: tune_space.SweepFile, config: TrainConfig, sweep_dir: str, tracker, scheduler, resume: bool
):
    settings = sweep.settings
    if resume:
        # Finished (and failed) trials stay as they were; unfinished ones run again and
        # continue their runs from the latest checkpoint (pipelines.tune.trial).
        return tune.Tuner.restore(
            storage.join(sweep_dir, TUNE_DIR),
            trainable=trainable,
            resume_unfinished=True,
            resume_errored=False,
            restart_errored=False,
        )
    if settings.seed is not None:
        random.seed(settings.seed)  # PBT's explore step draws from Python's global generator
    concurrent = _max_concurrent(
        config, settings.max_concurrent, can_grow=cluster_address(config.run.ray_address) is not None
    )
    echo(f"cdm tune: up to {concurrent} trial(s) at once", err=True)
    return tune.Tuner(
        trainable,
        param_space=sweep.param_space(),
        tune_config=tune.TuneConfig(
            metric=settings.tune_metric,
            mode="min",
            num_samples=settings.num_samples,
            scheduler=scheduler,
            search_alg=BasicVariantGenerator(random_state=settings.seed, max_concurrent=concurrent),
        ),
        run_config=tune.RunConfig(
            name=TUNE_DIR,
            storage_path=sweep_dir,
            callbacks=[tracker],
            # A failed trial is recorded and the sweep goes on; trial_retries restarts it first.
            failure_config=tune.FailureConfig(max_failures=settings.trial_retries, fail_fast=False),
            verbose=int(os.environ.get("CDM_TUNE_VERBOSE", "1")),
        ),
    )


def _locate(
    config: TrainConfig, sweep: tune_space.SweepFile, config_name: str, sweep_dir: Optional[str], resume: bool
) -> tuple[str, str, Optional[dict[str, Any]]]:
    """(name, folder, saved cdm_sweep.json or None) of the sweep; refuses a clash or a resume of nothing."""
    settings = sweep.settings
    if sweep_dir is None:
        name = check_name(settings.name or f"{config_name}-sweep-{time.strftime('%Y%m%d-%H%M%S')}")
        sweep_dir = storage.join(storage.absolute(config.run.storage_path), name)
    else:
        sweep_dir = storage.absolute(sweep_dir)
        name = check_name(settings.name or sweep_dir.rstrip("/").rsplit("/", 1)[-1])
    saved = read_sweep(sweep_dir)
    if saved is not None and not resume:
        raise UserError(f"tune.name: the sweep {sweep_dir} exists; continue it with --resume, or choose another --name")
    if saved is None and resume:
        raise UserError(f"--resume: there is no sweep at {sweep_dir} (no {storage.join(sweep_dir, SWEEP_FILE)})")
    if saved is not None:
        _check_against_saved(saved, config, sweep)
        if not tune.Tuner.can_restore(storage.join(sweep_dir, TUNE_DIR)):
            raise UserError(
                f"--resume: {sweep_dir} has no Ray Tune state to restore (the sweep was stopped before "
                "its first trial started); start it again with another --name"
            )
    return name, sweep_dir, saved


def run(
    config: TrainConfig,
    sweep: tune_space.SweepFile,
    *,
    config_name: str = "tune",
    resume: bool = False,
    sweep_dir: Optional[str] = None,
) -> TuneResult:
    """Run (or with `resume`, continue) a sweep; returns its trials sorted by the metric and the best one."""
    check_ray_train_v2()
    started = time.perf_counter()
    settings = sweep.settings
    tracking_uri = store_uri(config.tracking)
    config, tracking_uri = _local_paths_absolute(config, tracking_uri)
    resolve(config)  # the dataset and the model exist (each trial resolves its own sample again)
    scheduler = _scheduler(sweep, config)  # its settings are checked here too, before Ray starts

    name, sweep_dir, saved = _locate(config, sweep, config_name, sweep_dir, resume)
    if saved is not None:
        tracking_uri = saved["mlflow"]["tracking_uri"]

    experiment = config.tracking.experiment
    searched = [d.key for d in sweep.searched]
    trials_dir = storage.join(sweep_dir, TRIALS_DIR)
    # Locally, at least one logical CPU more than a trial's workers reserve: Ray Data's read tasks need it.
    ensure_ray(config.run.ray_address, min_cpus=_cpus_per_trial(config))
    ledger = open_ledger(name)  # noqa: F841 -- the handle keeps the (non-detached) ledger actor alive

    if saved is None:
        run_cm = mlflow_run(
            experiment,
            name,
            tracking_uri,
            _parent_params(config, sweep),
            {
                "cdm.stage": "tune",
                "cdm.sweep_dir": sweep_dir,
                "cdm.metric": settings.tune_metric,
                "cdm.dataset": config.data.uri,
            },
            config.tracking.parent_run_id,
        )
    else:
        run_cm = reopened_run(tracking_uri, saved["mlflow"]["run_id"])
    with run_cm as parent:
        parent_id = parent.info.run_id
        if saved is None:
            write_sweep(
                sweep_dir,
                {
                    "name": name,
                    "config": cfg.to_dict(config),
                    "config_name": config_name,
                    "sweep_file": sweep.raw,
                    "settings": cfg.to_dict(settings),
                    "mlflow": {"tracking_uri": tracking_uri, "experiment": experiment, "run_id": parent_id},
                },
            )
        echo(f"cdm tune: sweep {name}, folder {sweep_dir}, MLflow parent run {parent_id} ({tracking_uri})", err=True)
        setup = TrialSetup(
            sweep=name,
            trials_dir=trials_dir,
            base_config=cfg.to_dict(config),
            tracking_uri=tracking_uri,
            experiment=experiment,
            parent_run_id=parent_id,
            metric=settings.tune_metric,
            weights=dict(settings.weights),
            pbt=settings.scheduler == "pbt",
        )
        trainable = tune.with_resources(tune.with_parameters(cdm_trial, setup=setup), trial_resources(config))
        tracker = SweepTracker(
            sweep=name,
            tracking_uri=tracking_uri,
            experiment=experiment,
            parent_run_id=parent_id,
            steps=config.train.steps,
            metric=settings.tune_metric,
            weighted=settings.metric == "weighted",
            trials_dir=trials_dir,
        )
        _tuner(trainable, sweep, config, sweep_dir, tracker, scheduler, resume and saved is not None).fit()
        result = _summarise(
            name, sweep_dir, parent_id, settings.tune_metric, searched, tracking_uri, experiment, started
        )
        _record_best(result)
    return result


def _summarise(
    name: str,
    sweep_dir: str,
    parent_id: str,
    metric: str,
    searched: list[str],
    tracking_uri: str,
    experiment: str,
    started: float,
) -> TuneResult:
    rows = trial_rows(MlflowClient(tracking_uri), experiment, parent_id, metric, searched)
    best = best_row(rows)
    best_config = None
    if best is not None:
        info = read_run_file(trial_dir(sweep_dir, f"{name}-{best.trial_id}"))
        best_config = info["config"] if info else None
    return TuneResult(
        name, sweep_dir, parent_id, metric, searched, rows, best, best_config, time.perf_counter() - started
    )


def _record_best(result: TuneResult) -> None:
    """The best trial's metric, settings and checkpoint on the (active) parent run and in cdm_sweep.json."""
    info = read_sweep(result.sweep_dir) or {}
    info.pop("format", None)
    info["best"] = (
        None
        if result.best is None
        else {
            "trial_id": result.best.trial_id,
            "mlflow_run_id": result.best.run_id,
            "value": result.best.value,
            "checkpoint": result.best.checkpoint,
            "params": result.best.params,
            "config": result.best_config,
        }
    )
    write_sweep(result.sweep_dir, info)
    for status, n in counts(result.rows).items():
        mlflow.log_metric(f"tune/trials_{status.replace(' ', '_')}", n)
    with tempfile.TemporaryDirectory() as folder:
        Path(folder, "trials.txt").write_text(result.table() + "\n")
        Path(folder, "trials.json").write_text(
            json.dumps(
                [dataclasses.asdict(r) for r in result.rows],
                indent=2,
                default=lambda v: None if isinstance(v, float) and not math.isfinite(v) else str(v),
            )
            + "\n"
        )
        if result.best_config is not None:
            Path(folder, "best_config.json").write_text(json.dumps(result.best_config, indent=2) + "\n")
        mlflow.log_artifacts(folder)
    best = result.best
    if best is None:
        mlflow.set_tag("cdm.best_trial", "none (every trial failed)")
        return
    mlflow.log_metric(result.metric, best.value)
    tags = {
        "cdm.best_trial": best.trial_id,
        "cdm.best_run_id": best.run_id,
        **{f"cdm.best.{k}": v for k, v in best.params.items()},
    }
    if best.checkpoint:
        tags["cdm.best_checkpoint"] = best.checkpoint
    mlflow.set_tags(tags)


# --------------------------------------------------------------------------- the workflow's entry point


def run_for_workflow(
    train_config: TrainConfig,
    options: dict[str, Any],
    *,
    output: str,
    tracking_uri: str,
    experiment: str,
    parent_run_id: str,
) -> dict[str, Any]:
    """`cdm run`'s tune stage: a sweep in `output`, nested under the workflow's run.

    `options` is the workflow's [tune] table: `space` (a sweep file's path, or its [space] table inline)
    plus any [tune] setting of a sweep file. Resumes the sweep if `output` already holds one.
    """
    options = dict(options)
    space = options.pop("space", None)
    if space is None:
        raise UserError('[tune]: needs space = "SPACE.toml" (a sweep file) or a [tune.space] table')
    data = cfg.read_file(space) if isinstance(space, (str, Path)) else {"space": space}
    data = {"space": data.get("space", {}), "tune": {**data.get("tune", {}), **options}}
    config = cfg.apply_overrides(
        train_config,
        {
            "tracking.tracking_uri": tracking_uri,
            "tracking.experiment": experiment,
            "tracking.parent_run_id": parent_run_id,
        },
    )
    sweep = tune_space.parse(data, config, where=str(space) if isinstance(space, (str, Path)) else "[tune]")
    sweep_dir = storage.absolute(output)
    result = run(config, sweep, config_name="workflow", resume=read_sweep(sweep_dir) is not None, sweep_dir=sweep_dir)
    if result.best is None:
        raise UserError(
            f"tune: every trial of the sweep failed; see {result.sweep_dir} and MLflow run {result.mlflow_run_id}"
        )
    best = cfg.flatten(result.best_config) if result.best_config else {}
    overrides = {d.key: best.get(d.key) for d in sweep.dimensions if d.key in best}
    return {
        "best_overrides": overrides,
        "metric": result.metric,
        "best_value": result.best.value,
        "mlflow_run_id": result.mlflow_run_id,
        "best_checkpoint": result.best.checkpoint,
    }
