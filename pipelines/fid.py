"""The FID stage: `cdm fid SAMPLES REFERENCE --features inception|classifier:PATH|raw`.

Features are computed on a pool of Ray actors, one shard per call; each call
returns the shard's streaming statistics (count, sum, sum of outer products,
float64, `cdm_core.frechet.FeatureStats`), which the driver merges exactly.
The Fréchet distance is `cdm_core.frechet.fd_from_stats`.

Reference statistics are cached under `cache_dir`, keyed by the extractor id
(which names the weights by their SHA-256) and the reference split's identity
(dataset fingerprint, split, count and every shard's SHA-256 from
dataset.json). The shards are checked against those hashes on every run, so a
changed dataset can never be served stale statistics.

Metric names: `eval/fid` for Inception features only; `eval/fd_<dataset>` for
a classifier trained on <dataset>; `eval/fd_raw` for raw data.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import typer

from pipelines import shards as sh
from pipelines.errors import UserError
from pipelines.features import ExtractorSpec, build_extractor, resolve_extractor

EXPERIMENT = "cdm"


@dataclass
class FidConfig:
    samples: str
    reference: str
    features: str = "inception"
    samples_split: Optional[str] = None  # None: the only split of SAMPLES (a `cdm sample` output has one)
    reference_split: str = "train"
    inception_weights: Optional[str] = None
    inception_sha256: Optional[str] = None
    cache_dir: Optional[str] = None  # default $CDM_CACHE_DIR/fid-stats or ~/.cache/cdm/fid-stats
    use_cache: bool = True
    batch_size: int = 100
    # Ray
    workers: Optional[int] = None
    gpus_per_worker: Optional[float] = None
    address: Optional[str] = None
    # tracking
    track: bool = True
    tracking_uri: Optional[str] = None
    workdir: str = "."
    experiment: str = EXPERIMENT
    parent_run_id: Optional[str] = None


@dataclass
class FidResult:
    value: float
    metric: str  # eval/fid, eval/fd_<dataset> or eval/fd_raw
    extractor: str
    samples_count: int
    reference_count: int
    reference_cached: bool
    seconds: float
    images_per_s: float  # feature extraction throughput over the images actually processed
    run_id: Optional[str] = None


# --------------------------------------------------------------------------- statistics on workers


def shard_stats(extractor: Any, ds: sh.Dataset, split: str, shard: dict[str, Any], batch_size: int) -> dict[str, Any]:
    """FeatureStats (as a dict) of one shard's samples."""
    from cdm_core.frechet import FeatureStats

    stats = FeatureStats()
    buf: list[np.ndarray] = []
    for _, _, data, _ in sh.iter_shard(ds, split, shard):
        buf.append(data)
        if len(buf) == batch_size:
            stats.update(extractor(np.stack(buf)))
            buf = []
    if buf:
        stats.update(extractor(np.stack(buf)))
    return stats.to_dict()


class FeatureWorker:
    """A Ray actor: builds the extractor once, then turns shards into FeatureStats."""

    def __init__(self, spec: ExtractorSpec, device: str, threads: int, batch_size: int):
        import torch

        torch.set_num_threads(threads)
        self.extractor = build_extractor(spec, device)
        self.batch_size = batch_size
        self._datasets: dict[str, sh.Dataset] = {}

    def stats(self, job: int, dataset: str, split: str, shard: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """(job, stats): the job number comes back with the result because results arrive in any order."""
        if dataset not in self._datasets:
            self._datasets[dataset] = sh.open_dataset(dataset)
        return job, shard_stats(self.extractor, self._datasets[dataset], split, shard, self.batch_size)


def compute_stats(jobs: list[tuple[str, str]], spec: ExtractorSpec, config: FidConfig) -> list[Any]:
    """FeatureStats of each (dataset, split) in `jobs`, all shards of all jobs sharing one actor pool."""
    import ray
    from ray.util import ActorPool

    from cdm_core.frechet import FeatureStats
    from pipelines.batch import ensure_ray, plan_workers

    ensure_ray(config.address)
    tasks = [(i, uri, split, shard) for i, (uri, split) in enumerate(jobs)
             for shard in sh.open_dataset(uri).shards(split)]
    plan = plan_workers(config.workers, gpus_per_worker=config.gpus_per_worker, max_useful=len(tasks))
    remote = ray.remote(FeatureWorker).options(**plan.actor_options())
    actors = [remote.remote(spec, plan.device, plan.threads, config.batch_size) for _ in range(plan.workers)]
    merged = [FeatureStats() for _ in jobs]
    try:
        pool = ActorPool(actors)
        for job, stats in pool.map_unordered(lambda actor, task: actor.stats.remote(*task), tasks):
            merged[job].merge(FeatureStats.from_dict(stats))
    finally:
        for actor in actors:
            ray.kill(actor)
    return merged


# --------------------------------------------------------------------------- reference cache


def cache_dir(config: FidConfig) -> Path:
    if config.cache_dir:
        return Path(config.cache_dir)
    base = os.environ.get("CDM_CACHE_DIR")
    return (Path(base) if base else Path.home() / ".cache" / "cdm") / "fid-stats"


def reference_key(ds: sh.Dataset, split: str, extractor_id: str) -> dict[str, Any]:
    """Everything the reference statistics depend on: the extractor and the exact bytes of the split."""
    return {
        "extractor": extractor_id,
        "dataset_fingerprint": ds.meta.get("fingerprint"),
        "split": split,
        "count": ds.count(split),
        "shards": [s["sha256"] for s in ds.shards(split)],
    }


def _cache_file(folder: Path, key: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    return folder / f"{key['extractor']}-{digest[:32]}.npz"


def load_cached(folder: Path, key: dict[str, Any]) -> Optional[Any]:
    from cdm_core.frechet import FeatureStats

    file = _cache_file(folder, key)
    if not file.is_file():
        return None
    try:
        with np.load(file, allow_pickle=False) as z:
            if json.loads(str(z["key"])) != key:
                return None
            return FeatureStats.from_dict({"count": int(z["count"]), "shift": z["shift"], "sum": z["sum"],
                                           "sum_outer": z["sum_outer"]})
    except (OSError, ValueError, KeyError):
        return None  # unreadable cache entry: recompute and overwrite it


def save_cached(folder: Path, key: dict[str, Any], stats: Any) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    file = _cache_file(folder, key)
    d = stats.to_dict()
    tmp = file.with_name(f".{file.name}.tmp-{os.getpid()}.npz")
    np.savez(tmp, key=json.dumps(key, sort_keys=True), count=d["count"], shift=d["shift"], sum=d["sum"],
             sum_outer=d["sum_outer"])
    os.replace(tmp, file)
    return file


# --------------------------------------------------------------------------- the stage


def _pick_split(ds: sh.Dataset, split: Optional[str], role: str) -> str:
    if split is not None:
        ds.split(split)
        return split
    if len(ds.splits) == 1:
        return ds.splits[0]
    raise UserError(f"{ds.loc.uri}: has splits {ds.splits}; say which with --{role}-split")


def _check_compatible(spec: ExtractorSpec, samples: sh.Dataset, reference: sh.Dataset) -> None:
    a, b = samples.spec, reference.spec
    if (a.kind, a.shape) != (b.kind, b.shape):
        raise UserError(f"{samples.loc.uri} holds {a.kind} {a.shape}, {reference.loc.uri} holds {b.kind} {b.shape}; "
                        "compare samples of the reference's shape")
    if spec.kind in ("inception", "classifier") and a.kind != "image":
        raise UserError(f"--features {spec.kind} needs images; these datasets hold vectors (use --features raw)")
    if spec.kind == "classifier":
        from pipelines.features import load_classifier

        _, meta, _ = load_classifier(spec.path)
        c = meta["config"]
        if (c["height"], c["width"], c["in_channels"]) != tuple(a.shape):
            raise UserError(f"{spec.path}: the classifier takes {c['height']}×{c['width']}×{c['in_channels']} images, "
                            f"the datasets hold {a.shape[0]}×{a.shape[1]}×{a.shape[2]}")


def run(config: FidConfig) -> FidResult:
    from cdm_core.frechet import fd_from_stats

    if config.batch_size < 1:
        raise UserError(f"--batch-size {config.batch_size}: must be ≥ 1")
    spec = resolve_extractor(config.features, config.inception_weights, config.inception_sha256)
    samples, reference = sh.open_dataset(config.samples), sh.open_dataset(config.reference)
    s_split = _pick_split(samples, config.samples_split, "samples")
    r_split = _pick_split(reference, config.reference_split, "reference")
    _check_compatible(spec, samples, reference)
    for ds, split in ((samples, s_split), (reference, r_split)):
        if ds.count(split) < 2:
            raise UserError(f"{ds.loc.uri}: split {split} has {ds.count(split)} sample(s); a Fréchet distance needs at least 2")
    # The cache key trusts dataset.json's hashes, so the files must match them.
    sh.require_valid_shards(samples, [s_split])
    sh.require_valid_shards(reference, [r_split])

    def work() -> FidResult:
        start = time.perf_counter()
        key = reference_key(reference, r_split, spec.id)
        folder = cache_dir(config)
        ref_stats = load_cached(folder, key) if config.use_cache else None
        cached = ref_stats is not None
        jobs = [(samples.loc.uri, s_split)] + ([] if cached else [(reference.loc.uri, r_split)])
        computed = compute_stats(jobs, spec, config)
        sample_stats = computed[0]
        if not cached:
            ref_stats = computed[1]
            if config.use_cache:
                save_cached(folder, key, ref_stats)
        seconds = time.perf_counter() - start
        processed = sample_stats.count + (0 if cached else ref_stats.count)
        value = fd_from_stats(sample_stats, ref_stats)
        return FidResult(value, spec.metric, spec.id, sample_stats.count, ref_stats.count, cached, seconds,
                         processed / seconds)

    if not config.track:
        return work()

    import mlflow

    from pipelines.tracking import default_tracking_uri, mlflow_run

    uri = config.tracking_uri or default_tracking_uri(config.workdir)
    params = {"samples": samples.loc.uri, "samples_split": s_split, "reference": reference.loc.uri,
              "reference_split": r_split, "features": config.features, "extractor": spec.id,
              "batch_size": config.batch_size, "workers": config.workers}
    tags = {"cdm.stage": "fid", "cdm.samples": samples.loc.uri, "cdm.reference": reference.loc.uri,
            "cdm.metric": spec.metric}
    train_run = samples.meta.get("options", {}).get("train_run_id")
    if train_run:
        tags["cdm.train_run_id"] = train_run
    with mlflow_run(config.experiment, f"fid-{spec.kind}", uri, params, tags, config.parent_run_id) as active:
        result = work()
        metric_base = spec.metric.split("/", 1)[1]
        mlflow.log_metrics({spec.metric: result.value, f"eval/{metric_base}_samples": float(result.samples_count),
                            f"eval/{metric_base}_reference": float(result.reference_count),
                            f"eval/{metric_base}_seconds": result.seconds})
        result.run_id = active.info.run_id
    return result


def fid_command(
    samples: str = typer.Argument(..., help="Generated samples: a `cdm sample` output (or any prepared dataset)."),
    reference: str = typer.Argument(..., help="The reference dataset (`cdm prepare` output)."),
    features: str = typer.Option("inception", help="inception (FID), classifier:PATH (from `cdm train-features`) or raw."),
    samples_split: Optional[str] = typer.Option(None, help="Split of SAMPLES (default: its only split)."),
    reference_split: str = typer.Option("train", help="Split of REFERENCE."),
    inception_weights: Optional[str] = typer.Option(None, help="Path to pt_inception-2015-12-05-6726825d.pth (default: $CDM_WEIGHTS_DIR or ~/.cache/cdm/weights)."),
    inception_sha256: Optional[str] = typer.Option(None, help="Full SHA-256 the Inception file must have (default: the published prefix 6726825d)."),
    cache_dir: Optional[str] = typer.Option(None, help="Where reference statistics are cached (default ~/.cache/cdm/fid-stats)."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Recompute the reference statistics and do not cache them."),
    batch_size: int = typer.Option(100, help="Images per feature batch."),
    workers: Optional[int] = typer.Option(None, help="Ray workers (default: one per GPU, else one per CPU)."),
    address: Optional[str] = typer.Option(None, help="Ray cluster address (default: RAY_ADDRESS or a local Ray)."),
    tracking_uri: Optional[str] = typer.Option(None, help="MLflow tracking URI (default: MLFLOW_TRACKING_URI or ./mlflow.db)."),
    no_track: bool = typer.Option(False, "--no-track", help="Do not log to MLflow."),
) -> None:
    """Fréchet distance between samples and a reference dataset: FID with Inception features, fd_<dataset> with a classifier's.

    Example: cdm fid outputs/samples data/mnist5k --features classifier:outputs/features/mnist5k/classifier.pt
    """
    r = run(FidConfig(
        samples=samples, reference=reference, features=features, samples_split=samples_split,
        reference_split=reference_split, inception_weights=inception_weights, inception_sha256=inception_sha256,
        cache_dir=cache_dir, use_cache=not no_cache, batch_size=batch_size, workers=workers, address=address,
        tracking_uri=tracking_uri, track=not no_track,
    ))
    name = r.metric.split("/", 1)[1]
    cached = " (reference statistics from cache)" if r.reference_cached else ""
    typer.echo(f"{name} = {r.value:.4f}  [{r.samples_count} samples vs {r.reference_count} reference; {r.extractor}]{cached}")
    if r.metric == "eval/fid" and min(r.samples_count, r.reference_count) < 10_000:
        typer.echo("note: FID is biased upward with few samples; the paper's figures use 50,000")
