"""The sample stage: draw N samples from a trained CDM (or DDM) on a pool of Ray workers.

`run(SampleConfig(...))` is the stage (`cdm sample` in pipelines.cli).

Reproducibility per seed: sample i starts from its own torch.Generator seeded
from (seed, i) and keeps that stream through every sampler step, and the N
samples are cut into fixed batches [0, B), [B, 2B), … whatever the number of
workers. So sample i is the same with 1 worker or 8 (CPU workers run one
torch thread each, so not even reduction order changes).

Output: a prepared dataset (the same format as `cdm prepare`, split
`samples`), so `cdm fid` and `cdm nll` read it like any other, plus
`grid.png` beside the shards. Images are stored as 8-bit PNG; vector data as
float32 .npy. Conditional models store the label each sample was drawn for.
A model of continuous data (vectors, or arrays from `cdm prepare arrays`: its
checkpoint records `data.normalization`) samples in its normalized space; the
samples are mapped back to the data's units (x = μ + σ·z), stored as .npy with
the normalization in dataset.json, and also written whole as `samples.npy`
(N, *shape) beside the shards; `grid.png` is then a scatter plot of the first
two dimensions, or for (C, H, W) arrays each sample stretched to its own range.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from cdm_core.samplers import classifier_free_guidance, initial_noise, sample, timestep_grid
from pipelines.common import config as cfg
from pipelines.common import storage
from pipelines.common.checkpoints import locate_model
from pipelines.common.console import Progress
from pipelines.common.errors import UserError
from pipelines.common.stage import tracked
from pipelines.data import shards as sh
from pipelines.data.beside import recover_leftovers, written_beside
from pipelines.data.normalization import Normalization, of_model
from pipelines.data.preview import save_preview
from pipelines.data.readers import from_model_input, load_split
from pipelines.evaluate.config import SampleConfig
from pipelines.evaluate.workers import ModelWorker, faults_from_env, plan_pool, pool_map, run_tags

SPLIT = "samples"
GRID = "grid.png"
ARRAY = "samples.npy"  # continuous data: every sample in the data's units, (N, *shape)
# The settings that make the samples what they are (the output's fingerprint and dataset.json options).
SAMPLE_SETTINGS = ("n", "sampler", "steps", "time_grid", "seed", "batch_size", "cfg", "label", "use_ema", "clip_x0")


@dataclass
class SampleResult:
    uri: str
    count: int
    seconds: float
    images_per_s: float
    grid: Optional[str]
    up_to_date: bool
    run_id: Optional[str] = None


# --------------------------------------------------------------------------- per-sample randomness


def sample_seed(seed: int, index: int) -> int:
    """A 63-bit seed for sample `index` of a run with `seed`: distinct streams for distinct (seed, index)."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def sample_generators(seed: int, indices: range, device: str = "cpu") -> list[Any]:
    """One generator per sample, on the sampling device (so its noise needs no copy there each step)."""
    return [torch.Generator(device=device).manual_seed(sample_seed(seed, i)) for i in indices]


def sample_labels(indices: range, num_labels: Optional[int], label: Optional[int]) -> Optional[np.ndarray]:
    """The label each sample is drawn for: `label` if given, else classes in turn (balanced); None if unconditional."""
    if num_labels is None:
        if label is not None:
            raise UserError(f"--label {label}: the model is unconditional (trained without labels)")
        return None
    if label is not None:
        if not 0 <= label < num_labels:
            raise UserError(f"--label {label}: the model knows labels 0..{num_labels - 1}")
        return np.full(len(indices), label, dtype=np.int64)
    return np.asarray([i % num_labels for i in indices], dtype=np.int64)


# --------------------------------------------------------------------------- the work


def default_clip(data_shape: tuple[int, ...], clip_x0: Optional[float], continuous: bool = False) -> Optional[float]:
    """The clip the sampler gets: None (not set) is 1 for images and no clipping for vectors and other
    continuous data; 0 is no clipping."""
    if clip_x0 is None:
        return 1.0 if len(data_shape) == 3 and not continuous else None
    return clip_x0 if clip_x0 > 0 else None


def generate(
    trained: Any,
    indices: range,
    *,
    sampler: str,
    steps: int,
    seed: int,
    cfg: float = 0.0,
    label: Optional[int] = None,
    clip_x0: Optional[float] = None,
    time_grid: str = "even",
    device: str = "cpu",
) -> dict[str, np.ndarray]:
    """Samples `indices` of a run: {"index", "x" float32 (B, *data_shape), "label"} (label −1 if unconditional)."""
    shape = tuple(trained.model.data_shape)
    labels = sample_labels(indices, trained.num_labels, label)
    generators = sample_generators(seed, indices, device)
    schedule = trained.schedule.to(device=device, dtype=torch.float32)
    if labels is None:
        eps_fn = trained.eps_fn(None, device=device)
    else:
        y = torch.from_numpy(labels).to(device)
        null = torch.full_like(y, trained.num_labels)
        eps_fn = classifier_free_guidance(trained.eps_fn(y, device=device), trained.eps_fn(null, device=device), cfg)
    start = timestep_grid(schedule.T, steps, time_grid)[0]
    x = initial_noise((len(indices), *shape), schedule, generators, device=device, t=start)
    out = sample(
        sampler,
        eps_fn,
        x,
        schedule,
        steps,
        generator=generators,
        clip_x0=default_clip(shape, clip_x0, of_model(trained.config) is not None),
        time_grid=time_grid,
    )
    return {
        "index": np.asarray(indices, dtype=np.int64),
        "x": out.detach().float().cpu().numpy(),
        "label": labels if labels is not None else np.full(len(indices), -1, dtype=np.int64),
    }


class SampleWorker(ModelWorker):
    """A Ray actor: loads the model once, then generates batches of samples by index range (TF32 as torch's
    defaults have it: samples are not a figure computed in fp32)."""

    def __init__(
        self,
        checkpoint: str,
        use_ema: bool,
        device: str,
        threads: int,
        settings: dict[str, Any],
        faults: dict[str, Any] | None = None,
    ):
        super().__init__(checkpoint, use_ema, device, threads, allow_tf32=None, faults=faults)
        self.settings = settings

    def generate(self, start: int, stop: int) -> dict[str, np.ndarray]:
        self.next_call()
        return generate(self.trained, range(start, stop), device=self.device, **self.settings)


# --------------------------------------------------------------------------- writing a dataset


def spec_for(data_shape: tuple[int, ...], num_labels: Optional[int], continuous: bool = False) -> sh.SampleSpec:
    """Dataset spec for model-shaped data: (C, H, W) images become 8-bit PNG, (D,) vectors and continuous
    (C, H, W) arrays float32 .npy."""
    if continuous and len(data_shape) in (1, 3):
        return sh.SampleSpec("vector", tuple(data_shape), num_labels is not None, num_labels)
    if len(data_shape) == 3:
        c, h, w = data_shape
        if c not in (1, 3):
            raise UserError(f"the model makes {c}-channel images; only 1 (grey) or 3 (RGB) can be stored as PNG")
        return sh.SampleSpec("image", (h, w, c), num_labels is not None, num_labels)
    if len(data_shape) == 1:
        return sh.SampleSpec("vector", tuple(data_shape), num_labels is not None, num_labels)
    raise UserError(f"cannot store samples of shape {data_shape}")


def write_dataset(
    out: str,
    split: str,
    spec: sh.SampleSpec,
    batches: Iterator[dict[str, np.ndarray]],
    *,
    source: str,
    options: dict[str, Any],
    fingerprint: str,
    samples_per_shard: int = 1000,
    extra: Optional[dict[str, Any]] = None,
) -> dict[str, Any]:
    """Write model-space batches ({"x": images in [-1, 1] (B, C, H, W) or vectors (B, D), "label"}) as a prepared dataset.

    The result reads like any `cdm prepare` output (shards, manifest.parquet,
    dataset.json written last). Returns dataset.json's content.
    """
    loc = storage.resolve(out)
    if loc.root_kind() == "file":
        raise UserError(f"{loc.uri}: is a file; --out must be a directory")
    loc.makedirs()
    if loc.exists(sh.DATASET_JSON):
        loc.delete(sh.DATASET_JSON)  # written last: its absence marks an unfinished dataset
    writer = sh.SplitWriter(loc, split, spec, samples_per_shard)
    try:
        for batch in batches:
            x = batch["x"]
            data = from_model_input(x) if spec.kind == "image" else np.asarray(x, dtype=np.float32)
            labels = batch.get("label")
            for j in range(len(data)):
                label = int(labels[j]) if spec.labeled else None
                writer.add(data[j], label, f"{source}:{writer.count}")
    except BaseException:
        writer.abort()
        raise
    if writer.count == 0:
        raise UserError("no samples to write")
    split_meta = writer.close()
    written = {s.name for s in writer.shards}
    for name in loc.list_names():  # shards of an earlier, larger run in the same folder
        if name.endswith(".tar") and name.startswith(f"{split}-") and name not in written:
            loc.delete(name)
    manifest = sh.write_manifest(loc, writer.manifest)
    meta = sh.dataset_meta(
        source=source,
        options=options,
        inputs={},
        fingerprint=fingerprint,
        spec=spec,
        class_names=[str(c) for c in range(spec.num_classes)] if spec.num_classes else None,
        samples_per_shard=samples_per_shard,
        splits={split: split_meta},
        manifest=manifest,
        skipped={"count": 0, "skip_bad": False, "examples": []},
        extra=extra,
    )
    sh.write_dataset_json(loc, meta)
    return meta


# --------------------------------------------------------------------------- the stage


def _validate(config: SampleConfig) -> None:
    try:
        config.check()  # sampler, time_grid, clip_x0: the checks a config file gets on load
    except cfg.FieldError as err:
        raise UserError(f"--{err.field.replace('_', '-')} {err.message}") from None
    if config.n < 1:
        raise UserError(f"--n {config.n}: must be ≥ 1")
    if config.batch_size < 1:
        raise UserError(f"--batch-size {config.batch_size}: must be ≥ 1")
    if config.steps < 1:
        raise UserError(f"--steps {config.steps}: must be ≥ 1")
    if config.cfg < 0:
        raise UserError(f"--cfg {config.cfg}: the guidance scale must be ≥ 0")


def _settings(config: SampleConfig, names: tuple[str, ...]) -> dict[str, Any]:
    return {k: v for k, v in cfg.flat_values(config).items() if k in names}


def _fingerprint(config: SampleConfig, checkpoint_sha256: str) -> str:
    settings = _settings(config, (*SAMPLE_SETTINGS, "samples_per_shard"))
    blob = {"format": sh.FORMAT, "checkpoint_sha256": checkpoint_sha256, **settings}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()


def _existing(out: str, fingerprint: str) -> Optional[dict[str, Any]]:
    """dataset.json of an intact earlier run with the same inputs and settings, else None."""
    loc = storage.resolve(out)
    if loc.root_kind() != "dir" or not loc.exists(sh.DATASET_JSON):
        return None
    try:
        ds = sh.open_dataset(out)
    except UserError:
        return None
    if ds.meta.get("fingerprint") != fingerprint or sh.check_shard_files(ds):
        return None
    return ds.meta


def _check_writable(out: str) -> None:
    """--out must be new, empty, or an earlier sample output: never overwrite a real dataset or other files."""
    loc = storage.resolve(out)
    if loc.root_kind() != "dir":
        return
    if loc.exists(sh.DATASET_JSON):
        try:
            source = sh.open_dataset(out).meta.get("source")
        except UserError:
            source = None
        if source != "samples":
            raise UserError(
                f"{loc.uri}: holds a prepared dataset (source {source!r}), not samples; choose another --out"
            )
    ours = lambda n: n.endswith(".tar") or n in (sh.MANIFEST, sh.DATASET_JSON, GRID, ARRAY) or n.startswith(".")  # noqa: E731
    strangers = [n for n in loc.list_names() if not ours(n)]
    if strangers:
        raise UserError(f"{loc.uri}: holds other files ({', '.join(strangers[:3])}); choose an empty or new --out")


def run(config: SampleConfig) -> SampleResult:
    """Draw `config.n` samples on Ray workers and write them as a dataset at `config.out`."""
    _validate(config)
    model = locate_model(config.checkpoint, use_ema=config.use_ema, train_run_id=config.train_run_id)
    trained = model.trained  # on the driver only to learn the data shape and labels
    shape = tuple(trained.model.data_shape)
    norm = of_model(trained.config)  # None: a model of 8-bit images
    spec = spec_for(shape, trained.num_labels, norm is not None)
    sample_labels(range(1), trained.num_labels, config.label)  # fail early on a bad --label
    if config.cfg > 0 and trained.num_labels is None:
        raise UserError(f"--cfg {config.cfg}: guidance needs a class-conditional model; this one is unconditional")
    if not 1 <= config.steps <= trained.schedule.T:
        raise UserError(f"--steps {config.steps}: must be between 1 and the model's T={trained.schedule.T}")
    fingerprint = _fingerprint(config, model.sha256)
    loc = storage.resolve(config.out)
    if loc.is_local():
        recover_leftovers(Path(loc.root), "cdm sample")
    existing = None if config.force else _existing(config.out, fingerprint)
    if existing is None:
        _check_writable(config.out)
        storage.check_writable(config.out)  # before any sample is drawn

    options = _settings(config, SAMPLE_SETTINGS)
    options["clip_x0"] = default_clip(shape, config.clip_x0, norm is not None)  # the effective clip: None is none
    options["nfe"] = len(timestep_grid(trained.schedule.T, config.steps, config.time_grid)) - 1  # ε̂ calls per sample
    options["model_kind"] = trained.kind
    options["checkpoint"] = str(model.file)
    options["checkpoint_step"] = trained.step
    options["train_run_id"] = model.train_run_id

    tags = run_tags("sample", model) | {"cdm.output": loc.uri, "cdm.fingerprint": fingerprint}
    params = {**options, "workers": config.pool.workers, "samples_per_shard": config.samples_per_shard, "out": loc.uri}
    with tracked(config, f"sample-{config.sampler}-{config.steps}", params, tags) as record:
        start = time.perf_counter()
        if existing is None:
            # A local --out is written beside and renamed into place: stopped midway (Ctrl-C, SIGTERM), the
            # command leaves --out as it was, not empty or half-written (in place where only --out is writable,
            # and in an object store, which has no rename: there dataset.json, written last, marks it done).
            beside = loc.is_local() and os.access(Path(loc.root).parent, os.W_OK)
            in_place = contextlib.nullcontext(loc.uri)
            with written_beside(Path(loc.root), loc.uri, "samples") if beside else in_place as folder:
                write_dataset(
                    str(folder),
                    SPLIT,
                    spec,
                    _in_data_units(_generate_on_workers(config, str(model.file)), norm),
                    source="samples",
                    options=options,
                    fingerprint=fingerprint,
                    samples_per_shard=config.samples_per_shard,
                    extra={"normalization": norm.to_json()} if norm is not None else None,
                )
        if norm is not None and loc.is_local():
            np.save(Path(loc.root) / ARRAY, load_split(config.out, SPLIT, verify=False)[0], allow_pickle=False)
        seconds = time.perf_counter() - start
        grid = _save_grid(config.out)
        rate = config.n / seconds if existing is None else 0.0
        record.metrics(
            {
                "sample/count": config.n,
                "sample/seconds": seconds,
                "sample/images_per_s": rate,
                "sample/up_to_date": float(existing is not None),
            }
        )
        record.artifact(grid)
    return SampleResult(loc.uri, config.n, seconds, rate, grid, existing is not None, record.run_id)


def _in_data_units(
    batches: Iterator[dict[str, np.ndarray]], norm: Optional[Normalization]
) -> Iterator[dict[str, np.ndarray]]:
    """Samples of a model of continuous data, from its normalized space back to the data's units."""
    for batch in batches:
        yield batch if norm is None else {**batch, "x": norm.undo(batch["x"])}


def _generate_on_workers(config: SampleConfig, checkpoint: str) -> Iterator[dict[str, np.ndarray]]:
    """Batches in index order from the stage's SampleWorkers."""
    ranges = [(s, min(s + config.batch_size, config.n)) for s in range(0, config.n, config.batch_size)]
    plan = plan_pool(config.pool, max_useful=len(ranges))
    settings = {
        "sampler": config.sampler,
        "steps": config.steps,
        "seed": config.seed,
        "cfg": config.cfg,
        "label": config.label,
        "clip_x0": config.clip_x0,
        "time_grid": config.time_grid,
    }
    args = (checkpoint, config.use_ema, plan.device, plan.threads, settings, faults_from_env())
    with Progress(f"sample ({config.sampler}, {config.steps} steps)", config.n, "samples") as progress:
        for batch in pool_map(plan, SampleWorker, args, "generate", ranges):
            progress.advance(len(batch["index"]))
            yield batch


def _save_grid(out: str) -> Optional[str]:
    """grid.png (or a scatter plot for 2-D data) of the first samples, beside the shards; the local file's path.

    For an output at a URI (s3://…) the grid is drawn in a local scratch folder (one per URI), then copied
    beside the shards.
    """
    loc = storage.resolve(out)
    if loc.is_local():
        path = Path(loc.root) / GRID
    else:  # one scratch folder per output URI, reused by the next run there (MLflow logs the file after we return)
        scratch = Path(tempfile.gettempdir()) / f"cdm-grid-{hashlib.sha256(loc.uri.encode()).hexdigest()[:16]}"
        scratch.mkdir(exist_ok=True)
        path = scratch / GRID
    save_preview(sh.open_dataset(out), path)
    if not loc.is_local():
        loc.write_bytes(GRID, path.read_bytes())
    return str(path)
