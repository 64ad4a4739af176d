"""The training stage: `cdm train CONFIG [--set key=value …]` and `cdm train --resume RUN`.

The driver resolves and checks the config against the dataset (so user mistakes
fail here, before Ray starts anything), opens the MLflow run, and runs Ray
Train's `TorchTrainer` with `pipelines.train.loop.train_worker` on every worker.
It owns the run folder `<run.storage_path>/<run.name>` (pipelines.train.run_dir).

Resuming relies on Ray Train V2: a trainer started with the same run name and
storage path finds the snapshot and gives the workers its latest checkpoint.
A worker failure is retried the same way within one `fit()` (run.max_failures).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import mlflow
import numpy as np
import ray
import torch
from mlflow.models import ModelSignature
from mlflow.types import Schema, TensorSpec
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig

from pipelines.common import config as cfg
from pipelines.common import storage
from pipelines.common.checkpoints import CHECKPOINT_FILENAME, load_trained_model
from pipelines.common.connect import check_cluster
from pipelines.common.console import echo, place_log, warn
from pipelines.common.errors import UserError
from pipelines.common.ray_compat import InterruptibleTorchTrainer, is_train_v2
from pipelines.common.ray_session import ensure_ray
from pipelines.common.tracking import mlflow_run, reopened_run, store_uri
from pipelines.data.normalization import of_dataset
from pipelines.data.readers import LocalReader, ray_dataset
from pipelines.data.shards import open_dataset
from pipelines.train.config import TrainConfig, resumable
from pipelines.train.loop import train_worker
from pipelines.train.run_dir import (
    RUN_FILE,
    RUN_FORMAT,
    checkpoint_line,
    checkpoint_names,
    find_run_dir,
    first_loadable,
    new_branch,
    read_run_file,
    write_run_file,
)
from pipelines.train.session import InTrial
from pipelines.train.step import build_network, build_prior, build_schedule
from pipelines.train.validation import BPD_CONVENTION

CONTINUOUS_CONVENTION = "continuous: bpd = -log p_x(x)/(d ln 2), no bin offset; the density of the data as given"


class NonFiniteLossError(UserError):
    """The loss became NaN/inf; training stopped, the last good checkpoint is kept."""


@dataclass
class TrainResult:
    run_name: str
    run_dir: str
    mlflow_run_id: str
    step: int
    checkpoint: Optional[str]  # the latest checkpoint folder (holds checkpoint.pt)
    best_checkpoint: Optional[str]  # the best by the score metric
    metrics: dict[str, float] = field(default_factory=dict)  # the final validation
    seconds: float = 0.0


# --------------------------------------------------------------------------- config → checked, resolved config


def resolve(config: TrainConfig) -> tuple[TrainConfig, tuple[int, ...]]:
    """Check the config against its dataset and the code; fill data.num_labels and data.normalization.

    Returns (config, data shape): (C, H, W) for images and arrays (a U-Net), (D,) for vectors (the mlp preset).
    """
    ds = open_dataset(config.data.uri)
    spec = ds.spec
    data_shape = (spec.shape[2], spec.shape[0], spec.shape[1]) if spec.kind == "image" else tuple(spec.shape)
    what = "images" if spec.kind == "image" else "arrays"
    if len(data_shape) == 1:
        if config.model.preset != "mlp":
            raise UserError(
                f"model.preset: {config.model.preset!r} is a U-Net for images, and {ds.loc.uri} holds vectors of "
                f"dimension {data_shape[0]}; set model.preset=mlp (the MLP networks; width and depth in "
                "model.mlp_hidden, model.mlp_depth)"
                + "".join(f" and model.{k}=none" for k in config.model.unet_overrides())
            )
    elif len(data_shape) == 3:
        if config.model.preset == "mlp":
            raise UserError(
                f"model.preset: 'mlp' is for (D,) vectors, and {ds.loc.uri} holds {what} of shape "
                f"{list(data_shape)} (C, H, W); choose a U-Net preset (tiny, mnist, cifar10, celeba64)"
            )
        if data_shape[1] != data_shape[2]:
            raise UserError(
                f"data.uri: {ds.loc.uri} has {data_shape[1]}×{data_shape[2]} {what}; the U-Net needs square ones"
                + (" (prepare with --size)" if spec.kind == "image" else "")
            )
    else:
        raise UserError(
            f"data.uri: {ds.loc.uri} holds samples of shape {list(data_shape)}; cdm trains (D,) or (C, H, W)"
        )
    image_only = (
        ("data.flip", config.data.flip, "flips images"),
        ("data.dequantize", config.data.dequantize, "dequantizes 8-bit images"),
        ("validation.dequantize", config.validation.dequantize, "dequantizes 8-bit images"),
    )
    for setting, on, what in image_only:
        if on and spec.kind != "image":
            raise UserError(f"{setting}: true {what}, and {ds.loc.uri} holds continuous data; set {setting}=false")
    norm = of_dataset(ds.meta, ds.loc.where("dataset.json"))
    recorded = norm.to_json() if norm is not None else None
    if config.data.normalization is not None and config.data.normalization != recorded:
        raise UserError(
            f"data.normalization: {config.data.normalization} differs from what {ds.loc.uri}/dataset.json records "
            f"({recorded}); it is filled in from the dataset: leave it unset (a resumed run needs its dataset as "
            "it was prepared)"
        )
    config = dataclasses.replace(config, data=dataclasses.replace(config.data, normalization=recorded))
    for key in ("train_split", "val_split"):
        split = getattr(config.data, key)
        if split not in ds.splits:
            raise UserError(f"data.{key}: {split!r} is not a split of {ds.loc.uri}; it has {', '.join(ds.splits)}")

    num_labels = None
    if config.model.conditional:
        if not spec.labeled or not spec.num_classes:
            raise UserError(f"model.conditional: true needs labels, but {ds.loc.uri} is unlabeled")
        if config.data.num_labels not in (None, spec.num_classes):
            raise UserError(
                f"data.num_labels: {config.data.num_labels} but {ds.loc.uri} has {spec.num_classes} classes"
            )
        num_labels = int(spec.num_classes)
    config = dataclasses.replace(config, data=dataclasses.replace(config.data, num_labels=num_labels))

    workers = max(config.scaling.num_workers, 1)  # local mode (0) trains in one process
    per_worker = config.train.batch_size // workers
    share = -(-ds.count(config.data.train_split) // workers)
    if share < per_worker:
        raise UserError(
            f"train.batch_size: {config.train.batch_size} over {workers} worker(s) is {per_worker} per worker, "
            f"but each worker's share of split {config.data.train_split!r} has only {share} samples"
        )
    try:
        build_network(config, *data_shape[:2])
    except ValueError as err:
        raise cfg.ConfigError(f"model: {err}") from None
    try:
        build_schedule(config)
    except ValueError as err:
        raise cfg.ConfigError(f"schedule: {err}") from None
    try:
        build_prior(config)
    except ValueError as err:
        raise cfg.ConfigError(f"loss.prior: {err}") from None
    if config.run.init_from:
        start = storage.absolute(config.run.init_from)
        if not storage.resolve(start).exists(CHECKPOINT_FILENAME):
            raise UserError(
                f"run.init_from: no {CHECKPOINT_FILENAME} in {start}; give a checkpoint folder of a "
                "cdm train run (…/checkpoint_00005000)"
            )
        config = dataclasses.replace(config, run=dataclasses.replace(config.run, init_from=start))
    return config, data_shape


# --------------------------------------------------------------------------- test hooks


def _fault_injection(run_name: str) -> dict[str, Any]:
    """Test hooks from the environment (see pipelines.train.loop); empty normally."""
    env = os.environ
    spec: dict[str, Any] = {}
    for var, key in (
        ("CDM_FAIL_AT_STEP", "fail_at_step"),
        ("CDM_NAN_AT_STEP", "nan_at_step"),
        ("CDM_FAIL_RANK", "rank"),
    ):
        if env.get(var):
            spec[key] = int(env[var])
    if "fail_at_step" in spec:
        spec["marker"] = env.get("CDM_FAIL_MARKER") or os.path.join(tempfile.gettempdir(), f"cdm-fail-{run_name}")
    return spec


# --------------------------------------------------------------------------- MLflow


def log_final_model(checkpoint_dir: str, data_uri: str, split: str, register_as: str | None = None) -> None:
    """The EMA network as an MLflow model (torch.export format, dynamic batch), with an input example.

    `register_as`: also a new version of that registered model in the MLflow model registry.
    """
    trained = load_trained_model(checkpoint_dir)
    reader = LocalReader(data_uri, split, verify=False, first=4)
    x = reader.inputs(np.arange(len(reader)))
    # The signature is the exported program's: CDM model(x[, y]) -> logits over t = 0..T+1;
    # DDM model(x, t[, y]) -> ε̂. The batch dimension (-1) stays dynamic.
    example = [x]
    inputs = [TensorSpec(np.dtype(np.float32), (-1, *x.shape[1:]), "x")]
    if trained.kind == "ddm":
        example.append(np.full(len(x), trained.schedule.T // 2, dtype=np.int64))
        inputs.append(TensorSpec(np.dtype(np.int64), (-1,), "t"))
    if trained.num_labels is not None:
        example.append(np.clip(reader.labels[: len(x)], 0, None).astype(np.int64))
        inputs.append(TensorSpec(np.dtype(np.int64), (-1,), "y"))
    out_shape = (-1, trained.schedule.T + 2) if trained.kind == "cdm" else (-1, *x.shape[1:])
    signature = ModelSignature(inputs=Schema(inputs), outputs=Schema([TensorSpec(np.dtype(np.float32), out_shape)]))
    with torch.no_grad():
        mlflow.pytorch.log_model(
            trained.model,
            name="model",
            input_example=example if len(example) > 1 else x,
            signature=signature,
            serialization_format="pt2",
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
            registered_model_name=register_as,
        )


# --------------------------------------------------------------------------- the stage


def check_ray_train_v2() -> None:
    if not is_train_v2():
        raise UserError("cdm train needs Ray Train V2 (the default since Ray 2.51); unset RAY_TRAIN_V2_ENABLED=0")


def _fit(
    config: TrainConfig,
    data_shape,
    run_name: str,
    storage_path: str,
    tracking_uri: str,
    run_id: str,
    callbacks=(),
    start: dict[str, str] | None = None,
    in_trial: bool = False,
):
    """Run the TorchTrainer; `start` ({resume_from, checkpoint_suffix}) says where a continuation starts, on which line.

    `in_trial` (a `cdm tune` trial) with no workers: the loop runs in the trial's process, outside any fit
    (pipelines.train.session.InTrial).
    """
    s = config.scaling
    resources = {"CPU": s.cpus_per_worker}
    if s.use_gpu:
        resources["GPU"] = s.gpus_per_worker
    shuffle = None if config.data.shuffle == "none" else config.data.shuffle
    # Local mode (0 workers) trains in this process, which reserves nothing from Ray, on one shard.
    reserved, shards = s.num_workers * s.cpus_per_worker, max(s.num_workers, 1)
    ensure_ray(config.run.ray_address, min_cpus=reserved + 1)
    if tracking_uri.startswith("sqlite:") and sum(1 for n in ray.nodes() if n.get("Alive")) > 1:
        warn(
            f"warning: MLflow tracks to a local SQLite file ({tracking_uri}) on a multi-node cluster; the "
            "rank-0 worker may run on another node and write elsewhere. Use an MLflow server "
            "(tracking.tracking_uri or MLFLOW_TRACKING_URI) unless all nodes share that path."
        )
    total = ray.cluster_resources().get("CPU", 0)
    if total - reserved < 1:
        warn(
            f"warning: the {s.num_workers} worker(s) reserve {reserved:g} of the cluster's {total:g} CPUs; Ray Data "
            "needs at least one more to read the dataset, so training waits until the cluster grows. Lower "
            "scaling.cpus_per_worker or scaling.num_workers on a fixed-size cluster."
        )
    loop_config = {
        "config": cfg.to_dict(config),
        "data_shape": list(data_shape),
        "tracking_uri": tracking_uri,
        "mlflow_run_id": run_id,
        "faults": _fault_injection(run_name),
        "run_dir": storage.join(storage_path, run_name),
        "fit_id": uuid.uuid4().hex,  # in each checkpoint: tells Ray's restart within this fit from its start
        **(start or {}),
    }
    datasets = {
        "train": ray_dataset(
            config.data.uri,
            config.data.train_split,
            flip=config.data.flip,
            pad_to_multiple_of=shards,
            shuffle=shuffle,
        ),
        "val": ray_dataset(config.data.uri, config.data.val_split, pad_to_multiple_of=shards, verify=False),
    }
    if in_trial and not s.num_workers:
        session = InTrial(datasets, [c for c in callbacks if isinstance(c, ray.train.UserCallback)])
        outcome = train_worker(loop_config, session)
        metrics, checkpoint = session.last
        return ray.train.Result(metrics=metrics, checkpoint=checkpoint, error=None, path=None, return_value=outcome)
    trainer = InterruptibleTorchTrainer(
        train_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=s.num_workers,
            use_gpu=s.use_gpu,
            resources_per_worker=resources,
            placement_strategy=s.placement_strategy,
        ),
        run_config=RunConfig(
            name=run_name,
            storage_path=storage_path,
            failure_config=FailureConfig(max_failures=config.run.max_failures),
            checkpoint_config=CheckpointConfig(
                num_to_keep=config.checkpoint.keep_best,
                checkpoint_score_attribute=config.score_metric,
                checkpoint_score_order="min",
            ),
            callbacks=list(callbacks),
        ),
        datasets=datasets,
    )
    try:
        result = trainer.fit()
    except BaseException:
        if trainer.interrupted:  # Ray aborted the run on Ctrl-C and ended the driver with SystemExit
            raise KeyboardInterrupt from None
        raise
    if trainer.interrupted:
        raise KeyboardInterrupt
    return result


def _finish(
    result, config: TrainConfig, run_name: str, run_dir: str, run_id: str, tracking_uri: str, started: float
) -> TrainResult:
    outcome = result.return_value or {}
    latest = storage.join(run_dir, Path(result.checkpoint.path).name) if result.checkpoint else None
    if outcome.get("status") == "nonfinite":
        raise NonFiniteLossError(_nonfinite_message(outcome, run_dir, latest))
    best = outcome.get("best_checkpoint")  # local mode ranks its own checkpoints (run_dir.LocalCheckpoints)
    scored = [(c, m) for c, m in (result.best_checkpoints or []) if config.score_metric in m]
    if scored:
        best_ckpt = min(scored, key=lambda cm: cm[1][config.score_metric])[0]
        best = storage.join(run_dir, Path(best_ckpt.path).name)
    tags = {"cdm.final_step": outcome.get("step"), "cdm.last_checkpoint": latest, "cdm.best_checkpoint": best}
    mlflow.set_tags({k: str(v) for k, v in tags.items() if v is not None})
    trained_now = outcome.get("resumed_from") != outcome.get("step")  # False: resumed a run that was already complete
    if config.run.log_model and result.checkpoint is not None and trained_now:
        with result.checkpoint.as_directory() as folder:
            log_final_model(folder, config.data.uri, config.data.val_split, config.run.register_model)
    return TrainResult(
        run_name,
        run_dir,
        run_id,
        int(outcome.get("step", 0)),
        latest,
        best,
        dict(outcome.get("metrics", {})),
        time.perf_counter() - started,
    )


def _nonfinite_message(outcome: dict[str, Any], run_dir: str, latest: str | None) -> str:
    head = (
        f"training stopped at step {outcome['step']}: the loss is {outcome.get('loss')} (gradient norm "
        f"{outcome.get('grad_norm')})"
    )
    good, bad = outcome.get("good_checkpoint"), outcome.get("bad_checkpoints") or []
    if good is None and latest is None:
        return f"{head}; no checkpoint had been written yet. Start again with a lower optim.lr (or set optim.grad_clip)"
    if good is None:
        return (
            f"{head}; no checkpoint of this run takes a finite step ({', '.join(bad)} give non-finite gradients). "
            "Start a new run with a lower optim.lr (or set optim.grad_clip)"
        )
    newer = f" ({', '.join(bad)}, newer, give non-finite gradients)" if bad else ""
    return (
        f"{head}; the last good checkpoint is {storage.join(run_dir, good)}, from which a step is finite{newer}. "
        f"Lower optim.lr or set optim.grad_clip, then `cdm train --resume {run_dir} --from-checkpoint {good} "
        "--set optim.lr=…`"
    )


def _start_of_continuation(
    run_dir: str, from_checkpoint: str | None, label: str, info: dict[str, Any]
) -> tuple[dict[str, str], dict[str, Any]]:
    """Where a continuation starts: (what the loop needs, the run file's new branch record, if any).

    The checkpoint asked for, else the newest of the run's current line that loads (saying which it
    passed over). Starting anywhere but the newest of the line starts a branch: its checkpoints get
    their own suffix (Ray's checkpoint manager must never see a folder twice), and the line it left is
    no longer the run's (see run_dir.checkpoint_line). The newest is the newest Ray recorded, so a
    folder written but never recorded (a worker stopped in between) is written again, as Ray would;
    with --from-checkpoint it is the newest folder of the line, so a chosen start never overwrites one.
    """
    names, line = checkpoint_names(run_dir), checkpoint_line(run_dir, info)
    newest = line[0] if line else None
    if from_checkpoint is not None:
        # A chosen checkpoint leaves every newer folder of the line as it is, recorded by Ray or not.
        on_disk = checkpoint_line(run_dir, info, registered=False)
        newest = on_disk[0] if on_disk else None
        used = from_checkpoint.rstrip("/").rsplit("/", 1)[-1]
        if used not in names:
            raise UserError(
                f"--from-checkpoint {from_checkpoint}: not a checkpoint of {run_dir}; it has {', '.join(names) or 'none'}"
            )
        loaded, _, skipped = first_loadable(run_dir, [used])
        if loaded is None:
            raise UserError(f"--from-checkpoint {skipped[0]}; choose another of {', '.join(names)}")
    elif not line:
        if names:
            raise UserError(
                f"{label}: the run's current line of training has no checkpoint left; choose one with "
                f"--from-checkpoint ({', '.join(names)})"
            )
        return {}, {}  # nothing was saved yet: the run starts again from step 0
    else:
        used, _, skipped = first_loadable(run_dir, line)
        if used is None:
            others = [n for n in names if n not in line]
            fix = f"choose one with --from-checkpoint ({', '.join(others)})" if others else "start a new run"
            raise UserError(f"{label}: no checkpoint of the run's current line loads ({'; '.join(skipped)}); {fix}")
        if skipped:
            warn(f"warning: {'; '.join(skipped)}; continuing from {used}, the newest checkpoint that loads")
    branch, record = info.get("branch", ""), {}
    if used != newest:
        branch = new_branch(info)
        record = {"branches": {**info.get("branches", {}), branch: used}, "branch": branch}
    return {"resume_from": used, "checkpoint_suffix": branch}, record


def _display_name(config: TrainConfig, run_name: str) -> str:
    """The MLflow run's name: a workflow's content-keyed folder (`train-3e0768205ace`) says what it trained.

    `train-tiny-linear-3e07` (preset, schedule, the key's first characters); the folder and the
    `cdm.run_name` tag keep the full key. Other names are shown as they are.
    """
    keyed = re.fullmatch(r"train-([0-9a-f]{8,})", run_name)
    if keyed is None:
        return run_name
    kind = "" if config.model.kind == "cdm" else f"{config.model.kind}-"
    return f"train-{kind}{config.model.preset}-{config.schedule.name}-{keyed[1][:4]}"


def _tags(config: TrainConfig, run_name: str, run_dir: str) -> dict[str, str]:
    return {
        "cdm.stage": "train",
        "cdm.dataset": config.data.uri,
        "cdm.run_name": run_name,
        "cdm.checkpoint_dir": run_dir,
        "cdm.model_kind": config.model.kind,
        "cdm.bpd_convention": BPD_CONVENTION if config.data.normalization is None else CONTINUOUS_CONVENTION,
    }


def run(config: TrainConfig, *, config_name: str = "train", callbacks=(), in_trial: bool = False) -> TrainResult:
    """Train a new run; returns where its checkpoints are and its final validation metrics.

    `callbacks` are Ray Train callbacks for the TorchTrainer's RunConfig (`cdm tune` passes
    one that reports each checkpoint's validation metrics to the Ray Tune trial). `in_trial`: see `_fit`.
    """
    check_ray_train_v2()
    started = time.perf_counter()
    config, data_shape = resolve(config)
    run_name = config.run.name or f"{config_name}-{time.strftime('%Y%m%d-%H%M%S')}"
    if not re.fullmatch(r"[A-Za-z0-9._-]+", run_name):
        raise UserError(f"run.name: {run_name!r} may contain only letters, digits, '.', '_' and '-'")
    storage_path = storage.absolute(config.run.storage_path)
    storage.check_writable(storage_path, "run.storage_path")
    run_dir = storage.join(storage_path, run_name)
    if storage.exists(run_dir):
        raise UserError(
            f"run.name: {run_dir} already exists; continue it with `cdm train --resume {run_dir}` "
            "or choose another run.name"
        )
    tracking_uri = store_uri(config.tracking)
    config = dataclasses.replace(config, run=dataclasses.replace(config.run, name=run_name))
    params = cfg.to_dict(config)
    check_cluster(config.run.ray_address, "run.ray_address")  # in seconds, before the run is opened
    with mlflow_run(
        config.tracking.experiment,
        _display_name(config, run_name),
        tracking_uri,
        params,
        _tags(config, run_name, run_dir),
        config.tracking.parent_run_id,
    ) as active:
        run_id = active.info.run_id
        echo(f"cdm train: run {run_name}, folder {run_dir}, MLflow run {run_id} ({tracking_uri})", err=True)
        write_run_file(
            run_dir,
            {
                "format": RUN_FORMAT,
                "config": params,
                "data_shape": list(data_shape),
                "mlflow": {"tracking_uri": tracking_uri, "run_id": run_id, "experiment": config.tracking.experiment},
            },
        )
        place_log(run_dir)
        result = _fit(config, data_shape, run_name, storage_path, tracking_uri, run_id, callbacks, in_trial=in_trial)
        return _finish(result, config, run_name, run_dir, run_id, tracking_uri, started)


def resume(
    run: str,
    overrides: list[str] | dict[str, Any] = (),
    *,
    tracking_uri: str | None = None,
    callbacks=(),
    from_checkpoint: str | None = None,
    in_trial: bool = False,
) -> TrainResult:
    """Continue a run from its latest checkpoint (same MLflow run), with optional overrides such as train.steps.

    `from_checkpoint` (a checkpoint folder's name) continues from an earlier checkpoint instead; a newest
    checkpoint that cannot be loaded is passed over for the newest one that can, with a warning.
    """
    check_ray_train_v2()
    started = time.perf_counter()
    run_dir = find_run_dir(run, tracking_uri)
    info = read_run_file(run_dir)
    if info is None or info.get("format") != RUN_FORMAT:
        raise UserError(f"--resume {run}: {storage.join(run_dir, RUN_FILE)} is missing or not a {RUN_FORMAT} file")
    original = cfg.from_dict(TrainConfig, info["config"])
    config = cfg.apply_overrides(original, overrides)
    before, after = cfg.flatten(cfg.to_dict(original)), cfg.flatten(cfg.to_dict(config))
    changed = {k: after.get(k) for k in set(before) | set(after) if before.get(k) != after.get(k)}
    fixed = sorted(k for k in changed if not resumable(k))
    if fixed:
        raise UserError(
            f"--resume: {', '.join(fixed)} cannot change in a resumed run (it would be a different experiment); "
            "start a new run instead"
        )
    config, data_shape = resolve(config)
    start, branch = _start_of_continuation(run_dir, from_checkpoint, f"--resume {run}", info)
    mlflow_info = info["mlflow"]
    uri, run_id = tracking_uri or mlflow_info["tracking_uri"], mlflow_info["run_id"]
    storage_path, run_name = run_dir.rstrip("/").rsplit("/", 1)
    check_cluster(config.run.ray_address, "run.ray_address")  # in seconds, before the run is reopened
    with reopened_run(uri, run_id):
        place_log(run_dir)
        if changed:
            # MLflow params are immutable: record what this continuation changed as a tag.
            mlflow.set_tag(f"cdm.resume.{time.strftime('%Y%m%d-%H%M%S')}", json.dumps(changed, sort_keys=True))
            info["config"] = cfg.to_dict(config)
        if branch:  # the checkpoints from here on are a new line; the run file says where it left the old one
            mlflow.set_tag(f"cdm.branch{branch['branch']}", f"continues from {start['resume_from']}")
            info.update(branch)
        if changed or branch:
            write_run_file(run_dir, info)
        result = _fit(config, data_shape, run_name, storage_path, uri, run_id, callbacks, start, in_trial)
        return _finish(result, config, run_name, run_dir, run_id, uri, started)
