"""Likelihood-based out-of-distribution detection: `cdm ood CKPT IN_DATASET OUT_DATASET`.

Both datasets are scored by the NLL stage's workers (one forward pass per
sample); a sample is called out-of-distribution the higher its bits/dim. The
AUROC of that score (OOD samples as positives) goes to MLflow as
`eval/ood_auroc`, with a histogram of both score distributions.

An AUROC near 1 means the likelihood separates the two datasets; near 0.5, it
cannot tell them apart; below 0.5, the OOD data gets *higher* likelihood — the
well-known failure of likelihood models on some pairs (e.g. CIFAR-10 vs SVHN),
which is a finding to report, not a bug.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import mlflow
import numpy as np
from matplotlib.figure import Figure
from sklearn.metrics import roc_auc_score

from pipelines.common import config as cfg
from pipelines.common import storage
from pipelines.common.checkpoints import checkpoint_file
from pipelines.common.errors import UserError
from pipelines.common.tracking import mlflow_run, store_uri
from pipelines.data import shards as sh
from pipelines.evaluate.config import OodConfig
from pipelines.evaluate.nll import score_split, write_scores
from pipelines.evaluate.workers import run_tags

HISTOGRAM = "ood_histogram.png"


@dataclass
class OodResult:
    auroc: float
    summary: dict[str, Any]
    out: str
    histogram: Optional[str]
    run_id: Optional[str] = None


def auroc(in_scores: np.ndarray, out_scores: np.ndarray) -> float:
    """P(score of a random OOD sample > score of a random in-distribution sample), ties counting half."""
    labels = np.concatenate([np.zeros(len(in_scores)), np.ones(len(out_scores))])
    return float(roc_auc_score(labels, np.concatenate([in_scores, out_scores])))


def save_histogram(
    in_bpd: np.ndarray, out_bpd: np.ndarray, names: tuple[str, str], auc: float, unit: str, path: Path
) -> None:
    both = np.concatenate([in_bpd, out_bpd])
    finite = both[np.isfinite(both)]
    lo, hi = np.percentile(finite, [0.5, 99.5]) if len(finite) else (0.0, 1.0)
    bins = np.linspace(lo, hi if hi > lo else lo + 1, 60)
    fig = Figure(figsize=(6, 4), dpi=100)
    ax = fig.subplots()
    ax.hist(np.clip(in_bpd, lo, hi), bins=bins, alpha=0.6, density=True, label=f"in: {names[0]} ({len(in_bpd)})")
    ax.hist(np.clip(out_bpd, lo, hi), bins=bins, alpha=0.6, density=True, label=f"out: {names[1]} ({len(out_bpd)})")
    ax.set_xlabel(f"NLL ({unit})")
    ax.set_ylabel("density")
    ax.set_title(f"Likelihood OOD detection, AUROC {auc:.3f}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


def _name(uri: str) -> str:
    return storage.resolve(uri).root.rstrip("/").rsplit("/", 1)[-1] or uri


def run(config: OodConfig) -> OodResult:
    if not (config.checkpoint and config.in_dataset and config.out_dataset):
        raise UserError("ood needs a checkpoint, an in-distribution dataset and an out-of-distribution dataset")
    ds_in, ds_out = sh.open_dataset(config.in_dataset), sh.open_dataset(config.out_dataset)
    if ds_in.spec.shape != ds_out.spec.shape or ds_in.spec.kind != ds_out.spec.kind:
        raise UserError(
            f"{ds_out.loc.uri}: samples are {ds_out.spec.kind} {ds_out.spec.shape}, "
            f"{ds_in.loc.uri} has {ds_in.spec.kind} {ds_in.spec.shape}; OOD scoring needs one shape"
        )
    ckpt = checkpoint_file(config.checkpoint)
    names = (_name(config.in_dataset), _name(config.out_dataset))
    out = config.out or str(Path("outputs") / "ood" / f"{names[0]}-vs-{names[1]}")
    storage.check_writable(out)

    def work() -> tuple[float, dict[str, Any], Optional[str]]:
        s_in = score_split(config.checkpoint, config.in_dataset, config.in_split, config.scoring, config.pool)
        s_out = score_split(config.checkpoint, config.out_dataset, config.out_split, config.scoring, config.pool)
        write_scores(s_in, f"{out.rstrip('/')}/in")
        write_scores(s_out, f"{out.rstrip('/')}/ood")
        auc = auroc(s_in.bpd, s_out.bpd)
        summary = {"auroc": auc, "in": s_in.summary(), "ood": s_out.summary()}
        loc = storage.resolve(out)
        loc.write_bytes("summary.json", (json.dumps(summary, indent=2) + "\n").encode())
        unit = "bits/dim" if s_in.convention != "continuous" else "bits/dim, continuous"
        histogram = None
        if loc.is_local():
            histogram = str(Path(loc.root) / HISTOGRAM)
            save_histogram(s_in.bpd, s_out.bpd, names, auc, unit, Path(histogram))
        else:
            with tempfile.TemporaryDirectory() as tmp:
                save_histogram(s_in.bpd, s_out.bpd, names, auc, unit, Path(tmp) / HISTOGRAM)
                loc.write_bytes(HISTOGRAM, (Path(tmp) / HISTOGRAM).read_bytes())
        return auc, summary, histogram

    if not config.track:
        auc, summary, histogram = work()
        return OodResult(auc, summary, storage.resolve(out).uri, histogram)

    tracking = store_uri(config.tracking)
    params = {
        k: v
        for k, v in cfg.flat_values(config).items()
        if k
        in (
            "in_split",
            "out_split",
            "dequantize",
            "conditional",
            "seed",
            "batch_size",
            "use_ema",
            "allow_tf32",
            "workers",
        )
    }
    params |= {"in_dataset": ds_in.loc.uri, "out_dataset": ds_out.loc.uri}
    tags = run_tags("ood", ckpt, config.train_run_id)
    with mlflow_run(
        config.tracking.experiment,
        f"ood-{names[0]}-vs-{names[1]}",
        tracking,
        params,
        tags,
        config.tracking.parent_run_id,
    ) as active:
        auc, summary, histogram = work()
        mlflow.log_params(
            {"bpd_convention": summary["in"]["bpd_convention"], "bpd_offset": summary["in"]["bpd_offset"]}
        )
        mlflow.log_metrics(
            {
                "eval/ood_auroc": auc,
                "eval/ood_nll_bpd_in": summary["in"]["nll_bpd"],
                "eval/ood_nll_bpd_out": summary["ood"]["nll_bpd"],
            }
        )
        if histogram:
            mlflow.log_artifact(histogram)
        run_id = active.info.run_id
    return OodResult(auc, summary, storage.resolve(out).uri, histogram, run_id)
