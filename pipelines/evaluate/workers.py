"""What the batch stages (sample, nll, ood, fid) share: their pool of Ray workers and the link to the training run.

Each batch stage runs a pool of Ray actors that load a model once and then
process many batches. `plan_workers` decides how many and what each gets:
one GPU per worker where the cluster has GPUs, else one CPU per worker (and
one torch thread, so workers do not fight over cores). With `workers = 0`
the stage's one worker is an object in the calling process (no Ray): the same
class, the same calls, the same results; for a small evaluation, where starting
actors costs more than the work, and for a debugger.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
import torch
from ray.autoscaler.sdk import request_resources
from ray.util import ActorPool

from pipelines.common.checkpoints import LocatedModel, load_trained_model
from pipelines.common.console import Progress, warn
from pipelines.common.errors import UserError
from pipelines.common.precision import set_tf32
from pipelines.common.ray_session import cluster_address, ensure_ray
from pipelines.data import shards as sh
from pipelines.data.readers import DATASET, LocalReader, ray_dataset
from pipelines.evaluate.config import PoolSection

RESTARTS = 3  # times a batch stage's worker is started again after it died
CLUSTER_WAIT_S = 600.0  # how long a batch stage on a joined cluster waits for room for its workers
_POLL_S = 1.0


@dataclass(frozen=True)
class WorkerPlan:
    workers: int
    cpus_per_worker: float
    gpus_per_worker: float

    @property
    def local(self) -> bool:
        return self.workers == 0

    @property
    def device(self) -> str:
        return "cuda" if self.gpus_per_worker > 0 else "cpu"

    @property
    def threads(self) -> int:
        return max(1, int(self.cpus_per_worker))

    def actor_options(self) -> dict[str, float]:
        # A worker that dies (a lost node, an OOM kill) is started again and its call retried: each call
        # computes a fixed piece of the output (an index range, a shard), so a retry gives the same result.
        return {
            "num_cpus": self.cpus_per_worker,
            "num_gpus": self.gpus_per_worker,
            "max_restarts": RESTARTS,
            "max_task_retries": RESTARTS,
        }


def _fit(resources: dict[str, float], cpus_per_worker: float, gpus_per_worker: float, reserve_cpus: float) -> int:
    """How many workers of this size the cluster's resources hold now."""
    fit = int((float(resources.get("CPU", 0)) - reserve_cpus) // cpus_per_worker)
    if gpus_per_worker > 0:
        fit = min(fit, int(float(resources.get("GPU", 0)) // gpus_per_worker))
    return max(fit, 0)


def _wait_for_room(need: int, cpus: float, gpus: float, reserve_cpus: float, wait_s: float) -> dict[str, float]:
    """The cluster's resources once `need` workers fit, or when `wait_s` has passed (whatever it has then).

    A cluster whose worker groups scale from zero has no room until the autoscaler adds nodes,
    and it adds them for resources that are asked for: ask (`request_resources`), then watch.
    """
    resources = ray.cluster_resources()
    if _fit(resources, cpus, gpus, reserve_cpus) >= need or wait_s <= 0:
        return resources
    bundle = {"CPU": cpus, **({"GPU": gpus} if gpus > 0 else {})}
    request_resources(bundles=[bundle] * need + ([{"CPU": reserve_cpus}] if reserve_cpus else []))
    warn(
        f"waiting up to {wait_s:g} s for room for {need} worker(s) of {cpus:g} CPU{f' and {gpus:g} GPU' if gpus else ''}"
        f" (the cluster has {float(resources.get('CPU', 0)):g} CPUs and {float(resources.get('GPU', 0)):g} GPUs now;"
        " the autoscaler was asked for more)"
    )
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        time.sleep(min(_POLL_S, max(0.0, deadline - time.monotonic())))
        resources = ray.cluster_resources()
        if _fit(resources, cpus, gpus, reserve_cpus) >= need:
            break
    return resources


def plan_workers(
    workers: int | None,
    *,
    gpus_per_worker: float | None = None,
    cpus_per_worker: float = 1.0,
    max_useful: int | None = None,
    reserve_cpus: float = 0.0,
    wait_s: float = 0.0,
) -> WorkerPlan:
    """How many workers and what each reserves: as given, or as many as the cluster holds.

    `reserve_cpus` stay free for other tasks of the same pipeline: a Ray Data
    stage's read tasks need a CPU of their own, and actors holding every CPU
    would leave them unscheduled forever. If the cluster has no room yet for the
    workers asked for (or, unsized, for one), the plan waits up to `wait_s` for it
    to grow, asking the autoscaler for it; then it refuses, saying what is missing.
    `gpus_per_worker=None` means one GPU each if the cluster has GPUs now, else none.
    """
    if workers is not None and workers < 0:
        raise UserError(f"--workers {workers}: must be ≥ 0 (0: in this process, without Ray)")
    if workers == 0:
        gpus = gpus_per_worker if gpus_per_worker is not None else float(torch.cuda.is_available())
        if gpus > 0 and not torch.cuda.is_available():
            raise UserError(
                "--workers 0 --gpus-per-worker: this process has no GPU (torch.cuda.is_available() is false)"
            )
        return WorkerPlan(0, 1.0, 1.0 if gpus > 0 else 0.0)  # one torch thread, as a pool's worker: the same results
    if cpus_per_worker <= 0:
        raise UserError(f"cpus per worker {cpus_per_worker}: must be > 0")
    if gpus_per_worker is None:
        gpus_per_worker = 1.0 if float(ray.cluster_resources().get("GPU", 0)) >= 1 else 0.0
    resources = _wait_for_room(workers or 1, cpus_per_worker, gpus_per_worker, reserve_cpus, wait_s)
    total_gpus = float(resources.get("GPU", 0))
    total_cpus = float(resources.get("CPU", 0))
    waited = f" after waiting {wait_s:g} s for more" if wait_s > 0 else ""
    if gpus_per_worker > 0 and total_gpus < gpus_per_worker:
        raise UserError(f"each worker asks for {gpus_per_worker} GPU but the Ray cluster has {total_gpus:g}{waited}")
    fit = _fit(resources, cpus_per_worker, 0.0, reserve_cpus)
    if fit < 1:
        raise UserError(
            f"the Ray cluster has {total_cpus:g} CPUs{waited}: too few for one worker ({cpus_per_worker:g} CPU) "
            f"plus {reserve_cpus:g} for reading data"
        )
    if workers is None:
        workers = max(1, _fit(resources, cpus_per_worker, gpus_per_worker, reserve_cpus))
    elif workers > fit:
        raise UserError(
            f"--workers {workers}: the Ray cluster has {total_cpus:g} CPUs{waited}, room for {fit} workers of "
            f"{cpus_per_worker:g} CPU" + (f" next to {reserve_cpus:g} for reading data" if reserve_cpus else "")
        )
    if max_useful is not None:
        workers = max(1, min(workers, max_useful))
    return WorkerPlan(workers, cpus_per_worker, gpus_per_worker)


def plan_pool(pool: PoolSection, *, max_useful: int | None = None, reserve_cpus: float = 0.0) -> WorkerPlan:
    """Join (or start) Ray for a batch stage, then plan its pool of workers (none, without Ray, for `workers = 0`).

    On a cluster joined by address (or $RAY_ADDRESS) the plan waits up to `pool.wait_s` for
    room (default 600 s: an autoscaler may be starting nodes); a local Ray cannot grow, so there
    it does not wait unless told to.
    """
    if pool.workers == 0:
        return plan_workers(0, gpus_per_worker=pool.gpus_per_worker)
    ensure_ray(pool.address, dashboard=False)
    joined = cluster_address(pool.address) is not None
    wait_s = pool.wait_s if pool.wait_s is not None else (CLUSTER_WAIT_S if joined else 0.0)
    plan = plan_workers(
        pool.workers,
        gpus_per_worker=pool.gpus_per_worker,
        max_useful=max_useful,
        reserve_cpus=reserve_cpus,
        wait_s=wait_s,
    )
    if joined and pool.gpus_per_worker is None and not plan.gpus_per_worker:
        warn("no GPU in the cluster now: the workers run on CPUs (--gpus-per-worker 1 waits for GPU nodes instead)")
    return plan


def run_tags(stage: str, model: LocatedModel | None = None) -> dict[str, str]:
    """Tags that link a batch stage's MLflow run to its inputs and to the run that trained the model."""
    tags = {"cdm.stage": stage}
    if model is not None:
        tags["cdm.checkpoint"] = str(model.file)
        if model.train_run_id:
            tags["cdm.train_run_id"] = model.train_run_id
    return tags


def faults_from_env() -> dict[str, Any]:
    """Test hook, read on the driver: CDM_KILL_WORKER_AFTER=n makes one worker die after n calls (once per
    CDM_FAIL_MARKER file), as a lost node or an OOM kill would. Empty normally."""
    after = os.environ.get("CDM_KILL_WORKER_AFTER")
    if not after:
        return {}
    marker = os.environ.get("CDM_FAIL_MARKER") or os.path.join(tempfile.gettempdir(), f"cdm-kill-{os.getpid()}")
    return {"after": int(after), "marker": marker}


def maybe_die(faults: dict[str, Any], calls: int) -> None:
    """In a worker: die here (once) if the test hook says so."""
    if faults and calls > faults["after"] and not os.path.exists(faults["marker"]):
        with open(faults["marker"], "w") as f:
            f.write(f"worker {os.getpid()} killed after {calls - 1} calls\n")
        os._exit(1)


class ModelWorker:
    """What a batch stage's Ray actor starts from: its torch threads, full fp32 unless asked
    (pipelines.common.precision; `allow_tf32=None` leaves torch's defaults, as sampling does), the model
    loaded once, and the test hook's count of calls."""

    def __init__(
        self,
        checkpoint: str,
        use_ema: bool,
        device: str,
        threads: int,
        *,
        allow_tf32: bool | None = False,
        faults: dict[str, Any] | None = None,
    ):
        torch.set_num_threads(threads)
        if allow_tf32 is not None:
            set_tf32(allow_tf32)
        self.trained = load_trained_model(checkpoint, use_ema=use_ema, device=device)
        self.device = device
        self.faults, self.calls = faults or {}, 0

    def next_call(self) -> None:
        """Count a call, and die here (once) if the test hook says so."""
        self.calls += 1
        maybe_die(self.faults, self.calls)


@contextlib.contextmanager
def _as_a_worker() -> Iterator[None]:
    """A worker in this process sets torch's threads and TF32 as a pool's worker does; afterwards they are as they
    were, for the stages that run after it in the same process (`cdm run`)."""
    threads = torch.get_num_threads()
    tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32


def pool_map(
    plan: WorkerPlan,
    worker: type,
    args: tuple,
    method: str,
    tasks: Iterable[tuple],
    *,
    kwargs: dict[str, Any] | None = None,
    ordered: bool = True,
) -> Iterator[Any]:
    """`worker(*args, **kwargs).method(*task)` for each task: on `plan.workers` Ray actors of `worker` (results in
    the tasks' order if `ordered`, else as they finish), or on one `worker` in this process for a local plan."""
    kwargs = kwargs or {}
    if plan.local:
        with _as_a_worker():
            local = worker(*args, **kwargs)
            for task in tasks:
                yield getattr(local, method)(*task)
        return
    remote = ray.remote(worker).options(**plan.actor_options())
    actors = [remote.remote(*args, **kwargs) for _ in range(plan.workers)]
    try:
        pool = ActorPool(actors)
        results = pool.map if ordered else pool.map_unordered
        yield from results(lambda actor, task: getattr(actor, method).remote(*task), tasks)
    finally:
        for actor in actors:
            ray.kill(actor)


@dataclass
class SplitRows:
    """What a pool of scorers returned for one split: its columns sorted by sample index, each row's key."""

    keys: list[str]
    index: np.ndarray
    columns: dict[str, np.ndarray]
    seconds: float


def map_split(
    dataset: str | sh.Dataset,
    split: str,
    scorer: type,
    kwargs: dict[str, Any],
    *,
    batch_size: int,
    pool: PoolSection,
    normalization: Any = DATASET,
    label: str = "scoring",
) -> SplitRows:
    """Run `scorer` over every sample of a split on the stage's pool of Ray actors.

    `scorer` is a Ray Data actor class (a ModelWorker) taking `device`, `threads` and `faults` besides `kwargs`, called on
    batches {x, label, index, pad} and returning columns that include `index` (pads dropped). The caller
    checks the keys against the manifest (`pipelines.evaluate.nll.check_complete`). `normalization`: of
    continuous data, as `ray_dataset` takes it (pass the model's, `normalization.of_model`, where it has one).
    `label` names the work on the console's progress line.
    """
    start = time.perf_counter()
    ds = sh.open_dataset(dataset)
    plan = plan_pool(pool, reserve_cpus=1, max_useful=max(len(ds.shards(split)), -(-ds.count(split) // batch_size)))
    constructor = {**kwargs, "device": plan.device, "threads": plan.threads, "faults": faults_from_env()}
    if plan.local:  # the split in memory, its batches through the one scorer in this process
        batches = LocalReader(ds, split, normalization=normalization).batches(batch_size, as_torch=False)
        scored = pool_map(plan, scorer, (), "__call__", ((batch,) for batch in batches), kwargs=constructor)
    else:
        scored = (
            ray_dataset(ds, split, normalization=normalization)
            .map_batches(
                scorer,
                fn_constructor_kwargs=constructor,
                batch_size=batch_size,
                batch_format="numpy",
                compute=ray.data.ActorPoolStrategy(size=plan.workers),
                num_cpus=plan.cpus_per_worker,
                num_gpus=plan.gpus_per_worker,
            )
            .iter_batches(batch_size=None, batch_format="numpy")
        )
    parts: dict[str, list[np.ndarray]] = {}
    with Progress(label, ds.count(split), "samples") as progress:
        for batch in scored:
            for name, values in batch.items():
                parts.setdefault(name, []).append(values)
            progress.advance(len(batch.get("index", ())))
    seconds = time.perf_counter() - start
    columns = {k: np.concatenate(v) for k, v in parts.items()}
    index = columns.pop("index", np.zeros(0, np.int64))
    order = np.argsort(index, kind="stable")
    index = index[order].astype(np.int64)
    return SplitRows(
        [sh.sample_key(split, int(i)) for i in index], index, {k: v[order] for k, v in columns.items()}, seconds
    )
