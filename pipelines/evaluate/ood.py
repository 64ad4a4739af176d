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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
from sklearn.metrics import roc_auc_score

from pipelines.common import config as cfg
from pipelines.common import storage
from pipelines.common.checkpoints import locate_model
from pipelines.common.errors import UserError
from pipelines.common.stage import tracked
from pipelines.data import shards as sh
from pipelines.evaluate.config import OodConfig
from pipelines.evaluate.nll import check_scoring, score, write_scores
from pipelines.evaluate.plots import save_beside, save_histogram
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
    names = (_name(config.in_dataset), _name(config.out_dataset))
    out = config.out or str(Path("outputs") / "ood" / f"{names[0]}-vs-{names[1]}")
    storage.check_writable(out)
    model = locate_model(config.checkpoint, use_ema=config.scoring.use_ema, train_run_id=config.train_run_id)
    inputs = [
        check_scoring(model, ds, split, config.scoring, config.pool)
        for ds, split in ((ds_in, config.in_split), (ds_out, config.out_split))
    ]

    settings = ("in_split", "out_split", "dequantize", "conditional", "seed", "batch_size", "use_ema", "allow_tf32")
    params = {k: v for k, v in cfg.flat_values(config).items() if k in (*settings, "workers")}
    params |= {"in_dataset": ds_in.loc.uri, "out_dataset": ds_out.loc.uri}
    with tracked(config, f"ood-{names[0]}-vs-{names[1]}", params, run_tags("ood", model)) as record:
        s_in, s_out = (score(i) for i in inputs)
        write_scores(s_in, f"{out.rstrip('/')}/in")
        write_scores(s_out, f"{out.rstrip('/')}/ood")
        auc = auroc(s_in.bpd, s_out.bpd)
        summary = {"auroc": auc, "in": s_in.summary(), "ood": s_out.summary()}
        loc = storage.resolve(out)
        loc.write_bytes("summary.json", (json.dumps(summary, indent=2) + "\n").encode())
        unit = "bits/dim" if s_in.convention != "continuous" else "bits/dim, continuous"
        plot = save_beside(
            out, HISTOGRAM, lambda path: save_histogram(s_in.bpd, s_out.bpd, names, auc, unit, path), record
        )
        histogram = plot if loc.is_local() else None
        record.params({"bpd_convention": summary["in"]["bpd_convention"], "bpd_offset": summary["in"]["bpd_offset"]})
        record.metrics(
            {
                "eval/ood_auroc": auc,
                "eval/ood_nll_bpd_in": summary["in"]["nll_bpd"],
                "eval/ood_nll_bpd_out": summary["ood"]["nll_bpd"],
            }
        )
    return OodResult(auc, summary, loc.uri, histogram, record.run_id)
