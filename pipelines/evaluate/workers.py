"""What the batch stages (sample, nll, ood, fid) share: their pool of Ray workers and the link to the training run.

Each batch stage runs a pool of Ray actors that load a model once and then
process many batches. `plan_workers` decides how many and what each gets:
one GPU per worker where the cluster has GPUs, else one CPU per worker (and
one torch thread, so workers do not fight over cores).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import ray

from pipelines.common.checkpoints import training_run_id
from pipelines.common.errors import UserError
from pipelines.common.ray_session import ensure_ray
from pipelines.evaluate.config import PoolSection


@dataclass(frozen=True)
class WorkerPlan:
    workers: int
    cpus_per_worker: float
    gpus_per_worker: float

    @property
    def device(self) -> str:
        return "cuda" if self.gpus_per_worker > 0 else "cpu"

    @property
    def threads(self) -> int:
        return max(1, int(self.cpus_per_worker))

    def actor_options(self) -> dict[str, float]:
        return {"num_cpus": self.cpus_per_worker, "num_gpus": self.gpus_per_worker}


def plan_workers(
    workers: int | None,
    *,
    gpus_per_worker: float | None = None,
    cpus_per_worker: float = 1.0,
    max_useful: int | None = None,
    reserve_cpus: float = 0.0,
) -> WorkerPlan:
    """How many workers and what each reserves, from the cluster's resources unless given.

    `reserve_cpus` stay free for other tasks of the same pipeline: a Ray Data
    stage's read tasks need a CPU of their own, and actors holding every CPU
    would leave them unscheduled forever.
    """
    if workers is not None and workers < 1:
        raise UserError(f"--workers {workers}: must be ≥ 1")
    if cpus_per_worker <= 0:
        raise UserError(f"cpus per worker {cpus_per_worker}: must be > 0")
    resources = ray.cluster_resources()
    total_gpus = float(resources.get("GPU", 0))
    total_cpus = float(resources.get("CPU", 1))
    if gpus_per_worker is None:
        gpus_per_worker = 1.0 if total_gpus >= 1 else 0.0
    if gpus_per_worker > 0 and total_gpus < gpus_per_worker:
        raise UserError(f"each worker asks for {gpus_per_worker} GPU but the Ray cluster has {total_gpus:g}")
    fit = int((total_cpus - reserve_cpus) // cpus_per_worker)
    if fit < 1:
        raise UserError(
            f"the Ray cluster has {total_cpus:g} CPUs: too few for one worker ({cpus_per_worker:g} CPU) "
            f"plus {reserve_cpus:g} for reading data"
        )
    if workers is None:
        workers = max(1, min(fit, int(total_gpus // gpus_per_worker))) if gpus_per_worker > 0 else fit
    elif workers > fit:
        raise UserError(
            f"--workers {workers}: the Ray cluster has {total_cpus:g} CPUs, room for {fit} workers of "
            f"{cpus_per_worker:g} CPU" + (f" next to {reserve_cpus:g} for reading data" if reserve_cpus else "")
        )
    if max_useful is not None:
        workers = max(1, min(workers, max_useful))
    return WorkerPlan(workers, cpus_per_worker, gpus_per_worker)


def plan_pool(pool: PoolSection, *, max_useful: int | None = None, reserve_cpus: float = 0.0) -> WorkerPlan:
    """Join (or start) Ray for a batch stage, then plan its pool of workers."""
    ensure_ray(pool.address, dashboard=False)
    return plan_workers(
        pool.workers, gpus_per_worker=pool.gpus_per_worker, max_useful=max_useful, reserve_cpus=reserve_cpus
    )


def run_tags(
    stage: str, checkpoint_file: str | os.PathLike | None = None, train_run_id: str | None = None
) -> dict[str, str]:
    """Tags that link a batch stage's MLflow run to its inputs and to the run that trained the model."""
    tags = {"cdm.stage": stage}
    if checkpoint_file is not None:
        tags["cdm.checkpoint"] = str(checkpoint_file)
        train_run_id = train_run_id or training_run_id(checkpoint_file)
    if train_run_id:
        tags["cdm.train_run_id"] = train_run_id
    return tags
