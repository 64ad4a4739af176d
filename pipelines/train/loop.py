"""The per-worker training loop that Ray Train runs on every worker (or a `cdm tune` trial in its own process).

Every worker builds the same network (same seed), restores the latest checkpoint
if Ray hands it one (a restart after a failure, or `cdm train --resume`), wraps
the model in DDP through `ray.train.torch.prepare_model`, and trains on its
share of the training split. Rank 0 alone writes to MLflow and writes the
checkpoint; all workers call `ray.train.report` together at checkpoint steps
(it is a barrier).

Fault injection for tests (read by the driver from the environment, handed over
in the loop config):
  CDM_FAIL_AT_STEP=k, CDM_FAIL_RANK=r   worker r dies (os._exit) at step k, once per marker file
  CDM_FAIL_MARKER=path                  the marker (default: in the temp dir, named after the run)
  CDM_NAN_AT_STEP=k                     the loss becomes NaN at step k (on rank CDM_FAIL_RANK, default 0)
"""

from __future__ import annotations

import copy
import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import ray
import ray.train
import ray.train.torch
import torch

from cdm_core.checkpoint import load_checkpoint, restore, save_checkpoint
from cdm_core.ema import EMA
from cdm_core.networks import unwrap_model
from pipelines.common import storage
from pipelines.common.checkpoints import CHECKPOINT_FILENAME
from pipelines.common.config import from_dict, to_dict
from pipelines.data.preview import save_png
from pipelines.train import collectives
from pipelines.train.config import TrainConfig
from pipelines.train.run_dir import (
    LocalCheckpoints,
    checkpoint_line,
    checkpoint_step,
    first_loadable,
    load_run_checkpoint,
)
from pipelines.train.run_logger import RunLogger
from pipelines.train.session import InTrial, RayTrain
from pipelines.train.step import TrainStep, build_network, build_optimizer, build_prior, build_schedule, lr_factor
from pipelines.train.validation import Validator, plot_curve, sample_grid, t_grid


def _seed(generator: torch.Generator, seed: int, rank: int, step: int) -> None:
    # Distinct streams per rank (different t and noise on each worker), and a fresh
    # one after a restart whose RNG state could not be restored.
    generator.manual_seed((seed * 1_000_003 + rank) * 1_000_003 + step)
    torch.manual_seed(generator.initial_seed() + 1)  # dropout


def _rng_state(generator: torch.Generator) -> dict[str, Any]:
    state = {"generator": generator.get_state(), "torch": torch.get_rng_state(), "device_type": generator.device.type}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(generator: torch.Generator, state: dict[str, Any]) -> str | None:
    """Restore a worker's RNG streams; returns why they could not be (None if they were).

    A generator's state fits only a generator of its own device type (a CPU state is
    5056 bytes, a CUDA one 16), and a run may resume on another (`--set scaling.use_gpu=true`
    after a CPU trial run); checkpoints from before the device type was recorded are CPU ones.
    """
    saved = state.get("device_type", "cpu")
    if saved != generator.device.type:
        return f"the checkpoint's RNG streams are {saved}, this worker's {generator.device.type}"
    generator.set_state(state["generator"].cpu())
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"].cpu())
    return None


def _apply_hyperparameters(optimizer, scheduler, config: TrainConfig, step: int) -> None:
    """Make a restored optimiser follow the current config (a resumed run may change optim.*)."""
    optim = config.optim
    scheduler.base_lrs = [optim.lr for _ in optimizer.param_groups]
    for group in optimizer.param_groups:
        group.update(
            lr=optim.lr * lr_factor(optim, step + 1),
            betas=tuple(optim.betas),
            eps=optim.eps,
            weight_decay=optim.weight_decay,
        )


class _Faults:
    def __init__(self, spec: dict[str, Any], rank: int):
        self.spec = spec or {}
        self.rank = rank

    def before_step(self, step: int, train_step: TrainStep) -> None:
        s = self.spec
        if s.get("nan_at_step") == step and self.rank == s.get("rank", 0):
            train_step.poison_loss = True
        if s.get("fail_at_step") == step and self.rank == s.get("rank", 0):
            marker = Path(s["marker"])
            if not marker.exists():
                marker.parent.mkdir(parents=True, exist_ok=True)
                marker.write_text(f"injected failure at step {step} on rank {self.rank}\n")
                os._exit(1)  # the worker process dies, as on a lost node or an OOM kill


def _restore_latest(
    checkpoint,
    model,
    ema,
    optimizer,
    scheduler,
    generator,
    config: TrainConfig,
    rank: int,
    world: int,
    loop_config: dict[str, Any] | None = None,
) -> tuple[int, int, str, str, list[str]]:
    """Load a checkpoint into the live objects: Ray's latest if this fit wrote it, else the newest of the run's line.

    Ray hands over its latest checkpoint both when it restarts this fit's workers after a failure and when
    a continuation starts; only in the first case is it this fit's (its `fit_id` says so). At a
    continuation's start the driver has chosen where to go on from and made it the newest of the run's
    current line (run_dir.checkpoint_line); Ray's latest may be on a line that was left. A checkpoint that
    cannot be loaded (truncated, damaged) is passed over for the next older one on the line that loads.

    Returns (step, epoch, what became of the RNG streams, the checkpoint used, why newer ones were skipped).
    """
    loop_config = loop_config or {}
    run_dir, name = loop_config.get("run_dir"), Path(checkpoint.path).name
    used, state, skipped = name, None, []
    try:
        with checkpoint.as_directory() as folder:
            state = load_checkpoint(Path(folder) / CHECKPOINT_FILENAME, map_location="cpu")
    except (ValueError, OSError) as err:
        skipped = [f"{name}: {str(err).split('; expected')[0]}"]
    ours = state is not None and state.get("extra", {}).get("fit_id") == loop_config.get("fit_id")
    if not ours and run_dir and (state is None or loop_config.get("resume_from")):
        line = [n for n in checkpoint_line(run_dir) if state is not None or n != name]
        if not (state is not None and line and line[0] == name):  # else Ray's is the one to go on from
            used, state, more = first_loadable(run_dir, line)
            skipped += more
    if state is None:
        raise RuntimeError(f"no checkpoint of {run_dir} could be loaded: {'; '.join(skipped)}")
    step = _restore_state(state, model, ema, optimizer, scheduler, config)
    extra = state["extra"]
    # Each worker's RNG streams come back only if the worker count and the device type are unchanged.
    if "rng" not in extra:
        why = "the checkpoint holds no RNG streams"
    elif extra.get("world_size") != world:
        why = f"the checkpoint's world size is {extra.get('world_size')}, this run's {world}"
    else:
        why = _set_rng_state(generator, extra["rng"][rank])
    rng = "restored" if why is None else f"reseeded ({why})"
    return step, int(extra.get("epoch", 0)), rng, used, skipped


def _last_good_checkpoint(
    run_dir: str | None, train_step: TrainStep, model, x, labels, step: int
) -> tuple[str | None, list[str]]:
    """The newest checkpoint from which a step on this batch is finite, and the newer ones from which it is not.

    A diverging run can write checkpoints whose weights are finite but whose gradients are not (the
    MSE term's double backward overflows first): resuming from those would stop again, whatever optim.lr.
    """
    if not run_dir:
        return None, []
    probe = copy.deepcopy(unwrap_model(model)).train()
    bad = []
    for name in checkpoint_line(run_dir, registered=False):  # this fit's newest may not be recorded yet
        if checkpoint_step(name) >= step:
            continue
        try:
            state = load_run_checkpoint(run_dir, name)
        except ValueError:
            continue
        if train_step.finite_from(state["model"], probe, x, labels):
            return name, bad
        bad.append(name)
    return None, bad


def _restore_state(state: dict[str, Any], model, ema, optimizer, scheduler, config: TrainConfig) -> int:
    """A checkpoint (loaded on the CPU) into the live objects; returns its step.

    Loaded on the CPU, as torch intends: `load_state_dict` copies the weights and Adam's
    moments to the parameters' device but keeps Adam's `step` counters on the CPU, where
    the foreach Adam reads them without a device sync (on the GPU it would sync twice per
    parameter tensor per step).
    """
    step = restore(state, model, ema, optimizer, scheduler)
    _apply_hyperparameters(optimizer, scheduler, config, step)
    return step


def _start_from(folder: str, model, ema, optimizer, scheduler, config: TrainConfig) -> int:
    """run.init_from: another run's checkpoint as this run's starting point; returns its step."""
    with storage.resolve(folder).open_seekable(CHECKPOINT_FILENAME) as f:
        state = load_checkpoint(f, map_location="cpu", name=storage.join(folder, CHECKPOINT_FILENAME))
    return _restore_state(state, model, ema, optimizer, scheduler, config)


def _report_checkpoint(
    step: int,
    epoch: int,
    metrics: dict[str, float],
    *,
    rank: int,
    world: int,
    model,
    ema,
    optimizer,
    scheduler,
    generator,
    config: TrainConfig,
    mlflow_run_id: str,
    suffix: str = "",
    fit_id: str | None = None,
    session: RayTrain | InTrial,
    local: LocalCheckpoints | None = None,
) -> None:
    """All workers: gather RNG states, then report together; rank 0 attaches checkpoint.pt.

    `suffix` (e.g. "-b20261201130812") marks the checkpoints of a branch (a continuation from an older
    checkpoint), whose steps repeat those of the line it left: Ray's checkpoint manager must never see one
    folder twice. `fit_id` tells the checkpoints of this fit from those before it (see _restore_latest).
    `local`: in local mode, where Ray keeps no checkpoint, cdm copies it into the run folder itself.
    """
    extra = {
        "rng": collectives.all_gather_object(_rng_state(generator)),
        "world_size": world,
        "epoch": epoch,
        "mlflow_run_id": mlflow_run_id,
        "fit_id": fit_id,
    }
    report = {"step": step, "epoch": epoch, **metrics}
    name = f"checkpoint_{step:08d}{suffix}"
    if rank != 0:
        session.report(report, None, name)
        return
    with tempfile.TemporaryDirectory() as folder:
        save_checkpoint(
            Path(folder) / CHECKPOINT_FILENAME,
            model=model,
            step=step,
            config=to_dict(config),
            ema=ema,
            optimizer=optimizer,
            scheduler=scheduler,
            extra=extra,
        )
        if local is not None:
            checkpoint = ray.train.Checkpoint(local.save(folder, name, report))
        else:
            checkpoint = ray.train.Checkpoint.from_directory(folder)
        session.report(report, checkpoint, name)


def _log_validation_curve(logger, validator, config: TrainConfig, step: int, scratch: str) -> None:
    grid = t_grid(config.schedule.T, config.validation.t_points)
    png, js = os.path.join(scratch, "val_mse_per_t.png"), os.path.join(scratch, "val_mse_per_t.json")
    plot_curve(
        grid, validator.curve, png, f"{config.model.kind} {config.schedule.name} T={config.schedule.T}, step {step}"
    )
    Path(js).write_text(json.dumps({"t": grid.tolist(), "mse": validator.curve, "step": step}))
    logger.artifact(png)
    logger.artifact(js)


def train_worker(loop_config: dict[str, Any], session: RayTrain | InTrial | None = None) -> dict[str, Any]:
    """Ray Train's train_loop_per_worker. Returns (on rank 0, to the driver) how training ended.

    `session`: what the loop asks of its run (pipelines.train.session); Ray Train's functions by default.
    """
    session = session or RayTrain()
    config = from_dict(TrainConfig, loop_config["config"])
    data_shape = tuple(loop_config["data_shape"])  # (C, H, W), or (D,) for vectors
    rank, world = session.rank_and_world()
    local = config.scaling.num_workers == 0  # Ray Train's local mode: this loop runs in the cdm process
    torch.set_num_threads(config.scaling.cpus_per_worker)
    device = torch.device("cuda" if config.scaling.use_gpu else "cpu") if local else ray.train.torch.get_device()

    torch.manual_seed(config.train.seed)  # identical initial weights on every worker
    model = build_network(config, *data_shape[:2]).to(device)
    ema = EMA(model, config.ema.decay, config.ema.start_step)
    optimizer, scheduler = build_optimizer(model, config.optim)
    generator = torch.Generator(device=device)
    schedule, prior = build_schedule(config), build_prior(config)

    step, epoch, resumed_from, rng, used, skipped = 0, 0, None, "seeded", None, []
    checkpoint = session.checkpoint()  # set after a failure, or when a run is resumed
    if checkpoint is None and loop_config.get("resume_from"):  # Ray has no record of the run (local mode)
        checkpoint = ray.train.Checkpoint(storage.join(loop_config["run_dir"], loop_config["resume_from"]))
    if checkpoint is not None:
        step, epoch, rng, used, skipped = _restore_latest(
            checkpoint, model, ema, optimizer, scheduler, generator, config, rank, world, loop_config
        )
        resumed_from = step
    elif config.run.init_from:  # a new run that continues another's training (PBT); fresh RNG streams
        step = _start_from(config.run.init_from, model, ema, optimizer, scheduler, config)
    if rng != "restored":
        _seed(generator, config.train.seed, rank, step)
    # DDP when world > 1; a compiled step takes the bare network and averages gradients itself (TrainStep).
    strategy = None if config.train.compile else "ddp"
    model = session.prepare_model(model, strategy)

    train_step = TrainStep(config, model, ema, optimizer, scheduler, schedule, prior, device, generator)
    validator = Validator(config, schedule, prior, device, data_shape)
    faults = _Faults(loop_config.get("faults", {}), rank)
    keeper = (
        LocalCheckpoints(loop_config["run_dir"], config.checkpoint.keep_best, config.score_metric) if local else None
    )
    logger = RunLogger(loop_config["tracking_uri"], loop_config["mlflow_run_id"]) if rank == 0 else None

    nodes = collectives.all_gather_object(ray.get_runtime_context().get_node_id())
    if logger:
        logger.tags(
            {
                "cdm.world_size": world,
                "cdm.worker_nodes": ",".join(nodes),
                "cdm.num_nodes": len(set(nodes)),
                "cdm.local_mode": str(local).lower(),
            }
        )
        if config.run.init_from and resumed_from is None:
            logger.tags({"cdm.init_from": config.run.init_from, "cdm.init_step": step})
        if resumed_from is not None:
            logger.tags({f"cdm.restarted_from_step.{resumed_from}": f"rng {rng}"})
            if skipped:
                logger.tags({f"cdm.restored_instead.{resumed_from}": f"{used}; skipped {'; '.join(skipped)}"[:4000]})
                print(f"cdm train: continuing from {used}; skipped {'; '.join(skipped)}", flush=True)

    # The validation share is small: read it once and keep it (all workers read together).
    validator.load(session.dataset("val").iter_torch_batches(batch_size=config.validation.batch_size, device="cpu"))
    train_data = session.dataset("train")
    per_worker = config.train.batch_size // world
    shape = data_shape

    def log(metrics: dict[str, float], at: int) -> None:
        if logger and metrics:
            logger.metrics(metrics, at)

    def finish(status: str, **info: Any) -> dict[str, Any]:
        if keeper is not None:  # Ray ranks the checkpoints it kept; in local mode cdm does
            info["best_checkpoint"] = keeper.best()
        return {"status": status, "step": step, "epoch": epoch, "resumed_from": resumed_from, **info}

    last_val: dict[str, float] = {}
    # Sums of loss, ce and mse since the last log, kept on the device: the step's one host sync is its
    # gradient norm (TrainStep needs it to skip a non-finite update), which is summed here on the host.
    window = torch.zeros(3, dtype=torch.float64, device=device)
    window_norm, window_steps, window_time = 0.0, 0, 0.0  # time in data loading and steps, not logging/validation
    steps = config.train.steps
    with tempfile.TemporaryDirectory() as scratch:
        while step < steps:
            batches = 0
            tick = time.perf_counter()
            for batch in train_data.iter_torch_batches(
                batch_size=per_worker,
                drop_last=True,
                device="cpu",
                local_shuffle_buffer_size=config.data.shuffle_buffer or None,
            ):
                batches += 1
                step += 1
                faults.before_step(step, train_step)
                x = batch["x"].to(device, non_blocking=True)
                labels = batch["label"].to(device) if config.model.conditional else None
                result = train_step(x, labels)
                if not result.finite:  # every worker sees the same all-reduced gradient norm
                    loss = collectives.all_mean(result.loss.detach().double().reshape(1), device).item()
                    good, bad = None, []
                    if logger:  # rank 0 alone: its answer is the one the driver reads
                        logger.tags({"cdm.nonfinite_step": step})
                        good, bad = _last_good_checkpoint(
                            loop_config.get("run_dir"), train_step, model, x, labels, step
                        )
                    return finish(
                        "nonfinite", loss=loss, grad_norm=result.grad_norm, good_checkpoint=good, bad_checkpoints=bad
                    )
                window += torch.stack([result.loss, result.ce, result.mse]).double()
                window_norm += result.grad_norm
                window_steps += 1
                window_time += time.perf_counter() - tick

                if step % config.train.log_every == 0 or step == steps:
                    sums = torch.cat([window, torch.tensor([window_norm], dtype=torch.float64, device=device)])
                    means = (collectives.all_mean(sums, device) / window_steps).tolist()
                    log(
                        {
                            "train/loss": means[0],
                            "train/ce": means[1],
                            "train/mse": means[2],
                            "train/grad_norm": means[3],
                            "train/lr": optimizer.param_groups[0]["lr"],
                            "train/epoch": float(epoch),
                            "train/images_per_s": window_steps * config.train.batch_size / max(window_time, 1e-9),
                        },
                        step,
                    )
                    window.zero_()
                    window_norm, window_steps, window_time = 0.0, 0, 0.0

                checkpoint_due = step % config.checkpoint.every == 0 or step == steps
                if checkpoint_due or step % config.validation.every == 0:
                    started = time.perf_counter()
                    last_val = validator(ema.model, final=step == steps)
                    last_val["val/seconds"] = time.perf_counter() - started
                    log(last_val, step)

                every = config.sampling.every
                # Grids are of 8-bit images; continuous data (data.normalization) is sampled with `cdm sample`.
                images = config.data.normalization is None
                if logger and every and images and (step % every == 0 or step == steps):
                    path = os.path.join(scratch, f"step_{step:08d}.png")
                    save_png(sample_grid(ema.model, config, schedule, shape, device), path)
                    logger.artifact(path, "samples")

                if checkpoint_due:
                    _report_checkpoint(
                        step,
                        epoch,
                        last_val,
                        rank=rank,
                        world=world,
                        model=model,
                        ema=ema,
                        optimizer=optimizer,
                        scheduler=scheduler,
                        generator=generator,
                        config=config,
                        mlflow_run_id=loop_config["mlflow_run_id"],
                        suffix=loop_config.get("checkpoint_suffix", ""),
                        fit_id=loop_config.get("fit_id"),
                        session=session,
                        local=keeper,
                    )
                if step >= steps:
                    break
                tick = time.perf_counter()
            if batches == 0:
                raise RuntimeError(
                    f"worker {rank} got no full batch of {per_worker} in epoch {epoch}; the split is too small"
                )
            if step < steps:
                epoch += 1
        if logger and validator.curve:
            _log_validation_curve(logger, validator, config, step, scratch)
    return finish("done", metrics={k: v for k, v in last_val.items() if math.isfinite(v)})
