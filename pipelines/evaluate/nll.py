"""The NLL stage: the CDM's likelihood of every sample of a dataset split, one forward pass each.

`run(NllConfig(...))` is the stage (`cdm nll` in pipelines.cli).

A Ray Data pipeline reads the split's shards, and a pool of actors (one model
each, EMA weights by default) scores batches with no gradient:

    log p(x) = ℓ_0(x) − ℓ_{T+1}(x) + log N(x; 0, I) + log π(T+1) − log π(0)    (Theorem 3.2)

Per-sample results (key, index, label, log p in nats, bits/dim) go to
`scores.parquet`; the mean bits/dim with a 95% confidence interval goes to
stdout and MLflow (`eval/nll_bpd`, `eval/nll_bpd_ci95`). Before anything is
reported the scored keys are checked against the dataset's manifest: every
sample of the split exactly once.

Bits/dim conventions (always recorded as the `bpd_convention` param; for images the summary and MLflow
also hold the mean in both image conventions, `eval/nll_bpd_standard` and `eval/nll_bpd_official`):
  standard    8-bit images in [-1, 1]: −log p/(d ln 2) + log2(127.5)
  official    the official CDM code's −log p/(d ln 2) + 7
  continuous  −log p/(d ln 2), no bin offset (the default for vector data)
Uniform dequantization (`--dequantize`) adds u·2/255, u ~ U[0, 1), drawn
per sample from (seed, index), so it does not depend on batching either.
"""

from __future__ import annotations

import io
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import mlflow
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch

from cdm_core.objective import LOG2_BIN_OFFSET, OFFICIAL_CODE_OFFSET, log_likelihood_from_logits, nats_to_bits_per_dim
from pipelines.common import storage
from pipelines.common.checkpoints import checkpoint_file, load_trained_model
from pipelines.common.errors import UserError
from pipelines.common.precision import set_tf32
from pipelines.common.tracking import mlflow_run, store_uri
from pipelines.data import shards as sh
from pipelines.data.readers import ray_dataset
from pipelines.evaluate.config import CONVENTIONS, NllConfig, PoolSection, ScoringSection
from pipelines.evaluate.workers import faults_from_env, maybe_die, plan_pool, run_tags

SCORES = "scores.parquet"
SUMMARY = "summary.json"
OFFSETS = {"standard": LOG2_BIN_OFFSET, "official": OFFICIAL_CODE_OFFSET, "continuous": 0.0}


def bpd_offset(convention: str) -> float:
    return OFFSETS[convention]


@dataclass
class SplitScores:
    """Per-sample scores of one split, sorted by index, already checked against the manifest."""

    dataset: str
    split: str
    table: Any  # pyarrow.Table: key, index, label, log_px, bpd
    convention: str
    offset: float
    dequantized: bool
    seconds: float
    allow_tf32: bool = False

    @property
    def count(self) -> int:
        return self.table.num_rows

    @property
    def bpd(self) -> np.ndarray:
        return self.table.column("bpd").to_numpy()

    @property
    def log_px(self) -> np.ndarray:
        return self.table.column("log_px").to_numpy()

    def summary(self) -> dict[str, Any]:
        bpd = self.bpd
        std = float(bpd.std(ddof=1)) if len(bpd) > 1 else float("nan")
        return {
            "dataset": self.dataset,
            "split": self.split,
            "count": self.count,
            "nll_bpd": float(bpd.mean()),
            # normal approximation of the mean's sampling distribution: fine for the thousands of images scored here
            "nll_bpd_ci95": 1.96 * std / math.sqrt(len(bpd)) if len(bpd) > 1 else float("nan"),
            "nll_bpd_std": std,
            "mean_log_px_nats": float(self.log_px.mean()),
            "bpd_convention": self.convention,
            "bpd_offset": self.offset,
            # The same mean in the other conventions for 8-bit images (they differ by their offsets only), so a
            # figure can be set beside the paper's (its code's +7) and beside the literature's (+log2 127.5).
            "nll_bpd_by_convention": (
                {c: float(bpd.mean()) - self.offset + OFFSETS[c] for c in ("standard", "official")}
                if self.convention != "continuous"
                else {}
            ),
            "dequantize": self.dequantized,
            "allow_tf32": self.allow_tf32,
            "seconds": self.seconds,
            "images_per_s": self.count / self.seconds if self.seconds > 0 else float("nan"),
        }


@dataclass
class NllResult:
    summary: dict[str, Any]
    scores_uri: str
    run_id: Optional[str] = None

    @property
    def nll_bpd(self) -> float:
        return self.summary["nll_bpd"]

    @property
    def ci95(self) -> float:
        return self.summary["nll_bpd_ci95"]

    @property
    def count(self) -> int:
        return self.summary["count"]


# --------------------------------------------------------------------------- the worker


def dequantization_noise(indices: np.ndarray, shape: tuple[int, ...], seed: int) -> np.ndarray:
    """u ~ U[0, 1) per sample, from its own stream (seed, index): independent of batching and worker count."""
    return (
        np.stack([np.random.default_rng([seed, int(i), 7]).random(shape, dtype=np.float32) for i in indices])
        if len(indices)
        else np.zeros((0, *shape), np.float32)
    )


class LikelihoodScorer:
    """A Ray Data actor: loads the model once, then scores batches {x, label, index, pad} → {index, label, log_px, bpd}."""

    def __init__(
        self,
        checkpoint: str,
        use_ema: bool,
        device: str,
        threads: int,
        *,
        dequantize: bool,
        seed: int,
        offset: float,
        conditional: bool,
        allow_tf32: bool = False,
        faults: dict[str, Any] | None = None,
    ):
        torch.set_num_threads(threads)
        set_tf32(allow_tf32)  # this actor only scores: full fp32 unless asked (pipelines.common.precision)
        self.trained = load_trained_model(checkpoint, use_ema=use_ema, device=device)
        self.device = device
        self.dequantize = dequantize
        self.seed = seed
        self.offset = offset
        self.conditional = conditional
        self.faults, self.calls = faults or {}, 0

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.calls += 1
        maybe_die(self.faults, self.calls)
        keep = ~batch["pad"]
        x_np, index, label = batch["x"][keep], batch["index"][keep], batch["label"][keep]
        if self.dequantize:
            x_np = x_np + dequantization_noise(index, x_np.shape[1:], self.seed) * np.float32(2.0 / 255.0)
        x = torch.from_numpy(np.ascontiguousarray(x_np)).to(self.device)
        with torch.no_grad():
            if self.conditional:
                logits = self.trained.model(x, torch.from_numpy(label).to(self.device))
            else:
                logits = self.trained.model(x)
            # float64 from here on: the likelihood is a difference of large logits plus log N(x; 0, I).
            log_px = log_likelihood_from_logits(logits.double(), x.double(), self.trained.prior)
            bpd = nats_to_bits_per_dim(log_px, x[0].numel(), self.offset)
        return {"index": index, "label": label, "log_px": log_px.cpu().numpy(), "bpd": bpd.cpu().numpy()}


# --------------------------------------------------------------------------- scoring a split


def _check_model_fits(trained: Any, ds: sh.Dataset, conditional: bool) -> None:
    where = ds.loc.uri
    if trained.kind != "cdm":
        raise UserError(
            f"{trained.path}: a {trained.kind!r} model; the one-forward-pass likelihood needs a CDM (model.kind = 'cdm')"
        )
    spec = ds.spec
    want = tuple(trained.model.data_shape)
    have = (spec.shape[2], spec.shape[0], spec.shape[1]) if spec.kind == "image" else tuple(spec.shape)
    if want != have:
        raise UserError(
            f"{where}: samples are {have} (C, H, W), the model takes {want}; score a dataset of the model's shape"
        )
    if conditional:
        if trained.num_labels is None:
            raise UserError("--conditional: the model is unconditional (trained without labels)")
        if not spec.labeled:
            raise UserError(f"{where}: --conditional needs labels, and this dataset has none")


def resolve_convention(convention: Optional[str], kind: str, dequantize: bool) -> str:
    if convention is None:
        convention = "standard" if kind == "image" else "continuous"
    if convention not in CONVENTIONS:
        raise UserError(f"--bpd-convention {convention!r}: choose one of {', '.join(CONVENTIONS)}")
    if kind == "vector" and convention != "continuous":
        raise UserError(f"--bpd-convention {convention}: vector data is continuous; only 'continuous' applies")
    if kind == "vector" and dequantize:
        raise UserError("--dequantize applies to 8-bit images; this dataset holds continuous vectors")
    return convention


def manifest_keys(ds: sh.Dataset, split: str) -> list[str]:
    if not ds.loc.exists(sh.MANIFEST):
        raise UserError(f"{ds.loc.where(sh.MANIFEST)}: missing; re-run `cdm prepare`")
    table = pq.read_table(io.BytesIO(ds.loc.read_bytes(sh.MANIFEST)), columns=["key", "split"])
    keys = [k for k, s in zip(table.column("key").to_pylist(), table.column("split").to_pylist()) if s == split]
    if len(keys) != ds.count(split):
        raise UserError(
            f"{ds.loc.where(sh.MANIFEST)}: {len(keys)} rows for split {split}, dataset.json counts {ds.count(split)}"
        )
    return keys


def check_complete(keys: list[str], expected: list[str], where: str) -> None:
    """Every expected key exactly once, nothing else; the message names what is wrong."""
    seen: dict[str, int] = {}
    for k in keys:
        seen[k] = seen.get(k, 0) + 1
    missing = sorted(set(expected) - set(seen))
    extra = sorted(set(seen) - set(expected))
    repeated = sorted(k for k, c in seen.items() if c > 1)
    if missing or extra or repeated:
        parts = [
            f"{len(missing)} missing (e.g. {missing[:3]})" if missing else "",
            f"{len(extra)} not in the manifest (e.g. {extra[:3]})" if extra else "",
            f"{len(repeated)} scored more than once (e.g. {repeated[:3]})" if repeated else "",
        ]
        raise RuntimeError(
            f"{where}: scored {len(keys)} samples, the manifest lists {len(expected)}: "
            + "; ".join(p for p in parts if p)
        )


def score_split(checkpoint: str, dataset: str, split: str, options: ScoringSection, pool: PoolSection) -> SplitScores:
    """Score every sample of `split` on Ray workers; sorted by index and checked against the manifest."""
    ds = sh.open_dataset(dataset)
    ckpt = checkpoint_file(checkpoint)
    trained = load_trained_model(ckpt, use_ema=options.use_ema)
    _check_model_fits(trained, ds, options.conditional)
    convention = resolve_convention(options.bpd_convention, ds.spec.kind, options.dequantize)
    if options.batch_size < 1:
        raise UserError(f"--batch-size {options.batch_size}: must be ≥ 1")
    expected = manifest_keys(ds, split)

    start = time.perf_counter()
    n_blocks = len(ds.shards(split))
    plan = plan_pool(pool, reserve_cpus=1, max_useful=max(n_blocks, -(-len(expected) // options.batch_size)))
    scored = ray_dataset(dataset, split).map_batches(
        LikelihoodScorer,
        fn_constructor_kwargs={
            "checkpoint": str(ckpt),
            "use_ema": options.use_ema,
            "device": plan.device,
            "threads": plan.threads,
            "dequantize": options.dequantize,
            "seed": options.seed,
            "offset": bpd_offset(convention),
            "conditional": options.conditional,
            "allow_tf32": options.allow_tf32,
            "faults": faults_from_env(),
        },
        batch_size=options.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=plan.workers),
        num_cpus=plan.cpus_per_worker,
        num_gpus=plan.gpus_per_worker,
    )
    columns: dict[str, list[np.ndarray]] = {"index": [], "label": [], "log_px": [], "bpd": []}
    for batch in scored.iter_batches(batch_size=None, batch_format="numpy"):
        for name in columns:
            columns[name].append(batch[name])
    seconds = time.perf_counter() - start
    arrays = {k: np.concatenate(v) if v else np.zeros(0) for k, v in columns.items()}
    order = np.argsort(arrays["index"], kind="stable")
    index = arrays["index"][order].astype(np.int64)
    keys = [sh.sample_key(split, int(i)) for i in index]
    check_complete(keys, expected, f"{ds.loc.uri} split {split}")
    table = pa.table(
        {
            "key": pa.array(keys, pa.string()),
            "index": pa.array(index, pa.int64()),
            "label": pa.array(arrays["label"][order].astype(np.int64), pa.int64()),
            "log_px": pa.array(arrays["log_px"][order].astype(np.float64), pa.float64()),
            "bpd": pa.array(arrays["bpd"][order].astype(np.float64), pa.float64()),
        }
    )
    return SplitScores(
        ds.loc.uri, split, table, convention, bpd_offset(convention), options.dequantize, seconds, options.allow_tf32
    )


def write_scores(scores: SplitScores, out: str) -> str:
    """scores.parquet + summary.json in `out` (a folder or URI); returns the Parquet file's URI."""
    loc = storage.resolve(out)
    if loc.root_kind() == "file":
        raise UserError(f"{loc.uri}: is a file; --out must be a folder")
    loc.makedirs()
    buf = io.BytesIO()
    pq.write_table(scores.table, buf)
    loc.write_bytes(SCORES, buf.getvalue())
    loc.write_bytes(SUMMARY, (json.dumps(scores.summary(), indent=2) + "\n").encode())
    return loc.where(SCORES)


def read_scores(uri: str) -> Any:
    """The per-sample scores a run wrote (`uri`: the out folder or the .parquet file)."""
    loc = storage.resolve(uri)
    if loc.root_kind() == "dir":
        return pq.read_table(io.BytesIO(loc.read_bytes(SCORES)))
    return pq.read_table(io.BytesIO(loc.fs.open_input_stream(loc.root).read()))


def default_out(dataset: str, split: str, stage: str = "nll") -> str:
    name = storage.resolve(dataset).root.rstrip("/").rsplit("/", 1)[-1] or "dataset"
    return str(Path("outputs") / stage / f"{name}-{split}")


# --------------------------------------------------------------------------- the stage


def run(config: NllConfig) -> NllResult:
    if not config.checkpoint or not config.dataset:
        raise UserError("nll needs a checkpoint and a dataset")
    out = config.out or default_out(config.dataset, config.split)
    storage.check_writable(out)  # before the split is scored, not after
    ckpt = checkpoint_file(config.checkpoint)

    def work() -> tuple[dict[str, Any], str]:
        scores = score_split(config.checkpoint, config.dataset, config.split, config.scoring, config.pool)
        return scores.summary(), write_scores(scores, out)

    if not config.track:
        summary, uri = work()
        return NllResult(summary, uri)

    tracking = store_uri(config.tracking)
    scoring = config.scoring
    params = {
        "dataset": storage.resolve(config.dataset).uri,
        "split": config.split,
        "conditional": scoring.conditional,
        "dequantize": scoring.dequantize,
        "seed": scoring.seed,
        "batch_size": scoring.batch_size,
        "use_ema": scoring.use_ema,
        "allow_tf32": scoring.allow_tf32,
        "workers": config.pool.workers,
    }
    tags = run_tags("nll", ckpt, config.train_run_id) | {"cdm.dataset": storage.resolve(config.dataset).uri}
    with mlflow_run(
        config.tracking.experiment, f"nll-{config.split}", tracking, params, tags, config.tracking.parent_run_id
    ) as active:
        summary, uri = work()
        # Which convention a figure uses is part of the figure: logged as params next to it.
        mlflow.log_params({"bpd_convention": summary["bpd_convention"], "bpd_offset": summary["bpd_offset"]})
        mlflow.log_metrics(
            {
                "eval/nll_bpd": summary["nll_bpd"],
                "eval/nll_bpd_ci95": summary["nll_bpd_ci95"],
                "eval/nll_count": float(summary["count"]),
                "eval/nll_mean_log_px_nats": summary["mean_log_px_nats"],
                "eval/nll_seconds": summary["seconds"],
                "eval/nll_images_per_s": summary["images_per_s"],
                **{f"eval/nll_bpd_{c}": v for c, v in summary["nll_bpd_by_convention"].items()},
            }
        )
        loc = storage.resolve(out)
        if loc.is_local():
            mlflow.log_artifact(str(Path(loc.root) / SUMMARY))
        run_id = active.info.run_id
    return NllResult(summary, uri, run_id)
