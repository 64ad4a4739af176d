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
import ray
import torch

from cdm_core.frechet import FeatureStats, fd_from_stats
from pipelines.common import storage
from pipelines.common.console import Progress
from pipelines.common.errors import UserError
from pipelines.common.precision import set_tf32
from pipelines.common.stage import tracked
from pipelines.data import shards as sh
from pipelines.evaluate.config import FidConfig
from pipelines.evaluate.feature_classifier import load_classifier
from pipelines.evaluate.features import ExtractorSpec, build_extractor, extractor_file, resolve_extractor
from pipelines.evaluate.workers import faults_from_env, maybe_die, plan_pool, pool_map


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

    def __init__(
        self,
        spec: ExtractorSpec,
        device: str,
        threads: int,
        batch_size: int,
        *,
        allow_tf32: bool = False,
        file_data: bytes | None = None,
        faults: dict[str, Any] | None = None,
    ):
        torch.set_num_threads(threads)
        set_tf32(allow_tf32)  # this actor only measures: full fp32 unless asked (pipelines.common.precision)
        self.extractor = build_extractor(spec, device, file_data)
        self.batch_size = batch_size
        self._datasets: dict[str, sh.Dataset] = {}
        self.faults, self.calls = faults or {}, 0

    def stats(self, job: int, dataset: str, split: str, shard: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """(job, stats): the job number comes back with the result because results arrive in any order."""
        self.calls += 1
        maybe_die(self.faults, self.calls)
        if dataset not in self._datasets:
            self._datasets[dataset] = sh.open_dataset(dataset)
        return job, shard_stats(self.extractor, self._datasets[dataset], split, shard, self.batch_size)


def compute_stats(jobs: list[tuple[sh.Dataset, str]], spec: ExtractorSpec, config: FidConfig) -> list[Any]:
    """FeatureStats of each (dataset, split) in `jobs`, all shards of all jobs sharing one actor pool."""
    tasks = [(i, ds.loc.uri, split, shard) for i, (ds, split) in enumerate(jobs) for shard in ds.shards(split)]
    plan = plan_pool(config.pool, max_useful=len(tasks))
    file_data = extractor_file(spec)
    if file_data is not None and not plan.local:
        file_data = ray.put(file_data)  # once in the object store, for every worker
    options = {"allow_tf32": config.allow_tf32, "file_data": file_data, "faults": faults_from_env()}
    args = (spec, plan.device, plan.threads, config.batch_size)
    merged = [FeatureStats() for _ in jobs]
    with Progress(f"features ({spec.kind})", len(tasks), "shards") as progress:
        for job, stats in pool_map(plan, FeatureWorker, args, "stats", tasks, kwargs=options, ordered=False):
            merged[job].merge(FeatureStats.from_dict(stats))
            progress.advance(1)
    return merged


# --------------------------------------------------------------------------- reference cache


def cache_dir(config: FidConfig) -> Path:
    if config.cache_dir:
        return Path(config.cache_dir)
    return storage.user_cache("fid-stats")


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
    file = _cache_file(folder, key)
    if not file.is_file():
        return None
    try:
        with np.load(file, allow_pickle=False) as z:
            if json.loads(str(z["key"])) != key:
                return None
            return FeatureStats.from_dict(
                {"count": int(z["count"]), "shift": z["shift"], "sum": z["sum"], "sum_outer": z["sum_outer"]}
            )
    except (OSError, ValueError, KeyError):
        return None  # unreadable cache entry: recompute and overwrite it


def save_cached(folder: Path, key: dict[str, Any], stats: Any) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    file = _cache_file(folder, key)
    d = stats.to_dict()
    tmp = file.with_name(f".{file.name}.tmp-{os.getpid()}.npz")
    np.savez(
        tmp,
        key=json.dumps(key, sort_keys=True),
        count=d["count"],
        shift=d["shift"],
        sum=d["sum"],
        sum_outer=d["sum_outer"],
    )
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
        raise UserError(
            f"{samples.loc.uri} holds {a.kind} {a.shape}, {reference.loc.uri} holds {b.kind} {b.shape}; "
            "compare samples of the reference's shape"
        )
    if spec.kind in ("inception", "classifier") and a.kind != "image":
        raise UserError(f"--features {spec.kind} needs images; these datasets hold vectors (use --features raw)")
    if spec.kind == "classifier":
        _, meta, _ = load_classifier(spec.path)
        c = meta["config"]
        if (c["height"], c["width"], c["in_channels"]) != tuple(a.shape):
            raise UserError(
                f"{spec.path}: the classifier takes {c['height']}×{c['width']}×{c['in_channels']} images, "
                f"the datasets hold {a.shape[0]}×{a.shape[1]}×{a.shape[2]}"
            )


def run(config: FidConfig) -> FidResult:
    if config.batch_size < 1:
        raise UserError(f"--batch-size {config.batch_size}: must be ≥ 1")
    spec = resolve_extractor(config.features, config.inception_weights, config.inception_sha256)
    samples, reference = sh.open_dataset(config.samples), sh.open_dataset(config.reference)
    s_split = _pick_split(samples, config.samples_split, "samples")
    r_split = _pick_split(reference, config.reference_split, "reference")
    _check_compatible(spec, samples, reference)
    for ds, split in ((samples, s_split), (reference, r_split)):
        if ds.count(split) < 2:
            raise UserError(
                f"{ds.loc.uri}: split {split} has {ds.count(split)} sample(s); a Fréchet distance needs at least 2"
            )
    # The cache key trusts dataset.json's hashes, so the files must match them.
    sh.require_valid_shards(samples, [s_split])
    sh.require_valid_shards(reference, [r_split])

    params = {
        "samples": samples.loc.uri,
        "samples_split": s_split,
        "reference": reference.loc.uri,
        "reference_split": r_split,
        "features": config.features,
        "extractor": spec.id,
        "batch_size": config.batch_size,
        "allow_tf32": config.allow_tf32,
        "workers": config.pool.workers,
    }
    tags = {
        "cdm.stage": "fid",
        "cdm.samples": samples.loc.uri,
        "cdm.reference": reference.loc.uri,
        "cdm.metric": spec.metric,
    }
    train_run = samples.meta.get("options", {}).get("train_run_id")
    if train_run:
        tags["cdm.train_run_id"] = train_run
    with tracked(config, f"fid-{spec.kind}", params, tags) as record:
        start = time.perf_counter()
        key = reference_key(reference, r_split, spec.id)
        folder = cache_dir(config)
        ref_stats = load_cached(folder, key) if config.use_cache else None
        cached = ref_stats is not None
        jobs = [(samples, s_split)] + ([] if cached else [(reference, r_split)])
        computed = compute_stats(jobs, spec, config)
        sample_stats = computed[0]
        if not cached:
            ref_stats = computed[1]
            if config.use_cache:
                save_cached(folder, key, ref_stats)
        seconds = time.perf_counter() - start
        processed = sample_stats.count + (0 if cached else ref_stats.count)
        value = fd_from_stats(sample_stats, ref_stats)
        metric_base = spec.metric.split("/", 1)[1]
        record.metrics(
            {
                spec.metric: value,
                f"eval/{metric_base}_samples": sample_stats.count,
                f"eval/{metric_base}_reference": ref_stats.count,
                f"eval/{metric_base}_seconds": seconds,
            }
        )
    return FidResult(
        value,
        spec.metric,
        spec.id,
        sample_stats.count,
        ref_stats.count,
        cached,
        seconds,
        processed / seconds,
        record.run_id,
    )
