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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import typer

from pipelines import shards as sh
from pipelines.errors import UserError
from pipelines.nll import EXPERIMENT, ScoringOptions, score_split, write_scores

HISTOGRAM = "ood_histogram.png"


@dataclass
class OodConfig(ScoringOptions):
    checkpoint: str = ""
    in_dataset: str = ""
    out_dataset: str = ""
    in_split: str = "test"
    out_split: str = "test"
    out: Optional[str] = None  # folder for in/ and ood/ scores, summary.json and the histogram
    # tracking
    track: bool = True
    tracking_uri: Optional[str] = None
    workdir: str = "."
    experiment: str = EXPERIMENT
    parent_run_id: Optional[str] = None
    train_run_id: Optional[str] = None


@dataclass
class OodResult:
    auroc: float
    summary: dict[str, Any]
    out: str
    histogram: Optional[str]
    run_id: Optional[str] = None


def auroc(in_scores: np.ndarray, out_scores: np.ndarray) -> float:
    """P(score of a random OOD sample > score of a random in-distribution sample), ties counting half."""
    from sklearn.metrics import roc_auc_score

    labels = np.concatenate([np.zeros(len(in_scores)), np.ones(len(out_scores))])
    return float(roc_auc_score(labels, np.concatenate([in_scores, out_scores])))


def save_histogram(in_bpd: np.ndarray, out_bpd: np.ndarray, names: tuple[str, str], auc: float, unit: str,
                   path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    both = np.concatenate([in_bpd, out_bpd])
    finite = both[np.isfinite(both)]
    lo, hi = np.percentile(finite, [0.5, 99.5]) if len(finite) else (0.0, 1.0)
    bins = np.linspace(lo, hi if hi > lo else lo + 1, 60)
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ax.hist(np.clip(in_bpd, lo, hi), bins=bins, alpha=0.6, density=True, label=f"in: {names[0]} ({len(in_bpd)})")
    ax.hist(np.clip(out_bpd, lo, hi), bins=bins, alpha=0.6, density=True, label=f"out: {names[1]} ({len(out_bpd)})")
    ax.set_xlabel(f"NLL ({unit})")
    ax.set_ylabel("density")
    ax.set_title(f"Likelihood OOD detection, AUROC {auc:.3f}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _name(uri: str) -> str:
    return sh.resolve(uri).root.rstrip("/").rsplit("/", 1)[-1] or uri


def run(config: OodConfig) -> OodResult:
    from pipelines.batch import tracking_tags
    from pipelines.models import checkpoint_file

    if not (config.checkpoint and config.in_dataset and config.out_dataset):
        raise UserError("ood needs a checkpoint, an in-distribution dataset and an out-of-distribution dataset")
    ds_in, ds_out = sh.open_dataset(config.in_dataset), sh.open_dataset(config.out_dataset)
    if ds_in.spec.shape != ds_out.spec.shape or ds_in.spec.kind != ds_out.spec.kind:
        raise UserError(f"{ds_out.loc.uri}: samples are {ds_out.spec.kind} {ds_out.spec.shape}, "
                        f"{ds_in.loc.uri} has {ds_in.spec.kind} {ds_in.spec.shape}; OOD scoring needs one shape")
    ckpt = checkpoint_file(config.checkpoint)
    names = (_name(config.in_dataset), _name(config.out_dataset))
    out = config.out or str(Path("outputs") / "ood" / f"{names[0]}-vs-{names[1]}")

    def work() -> tuple[float, dict[str, Any], Optional[str]]:
        s_in = score_split(config.checkpoint, config.in_dataset, config.in_split, config)
        s_out = score_split(config.checkpoint, config.out_dataset, config.out_split, config)
        write_scores(s_in, f"{out.rstrip('/')}/in")
        write_scores(s_out, f"{out.rstrip('/')}/ood")
        auc = auroc(s_in.bpd, s_out.bpd)
        summary = {"auroc": auc, "in": s_in.summary(), "ood": s_out.summary()}
        loc = sh.resolve(out)
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
        return OodResult(auc, summary, sh.resolve(out).uri, histogram)

    import mlflow

    from pipelines.tracking import default_tracking_uri, mlflow_run

    tracking = config.tracking_uri or default_tracking_uri(config.workdir)
    params = {k: v for k, v in asdict(config).items()
              if k in ("in_split", "out_split", "dequantize", "conditional", "seed", "batch_size", "use_ema", "workers")}
    params |= {"in_dataset": ds_in.loc.uri, "out_dataset": ds_out.loc.uri}
    tags = tracking_tags("ood", ckpt, config.train_run_id)
    with mlflow_run(config.experiment, f"ood-{names[0]}-vs-{names[1]}", tracking, params, tags, config.parent_run_id) as active:
        auc, summary, histogram = work()
        mlflow.log_params({"bpd_convention": summary["in"]["bpd_convention"], "bpd_offset": summary["in"]["bpd_offset"]})
        mlflow.log_metrics({"eval/ood_auroc": auc, "eval/ood_nll_bpd_in": summary["in"]["nll_bpd"],
                            "eval/ood_nll_bpd_out": summary["ood"]["nll_bpd"]})
        if histogram:
            mlflow.log_artifact(histogram)
        run_id = active.info.run_id
    return OodResult(auc, summary, sh.resolve(out).uri, histogram, run_id)


def ood_command(
    checkpoint: str = typer.Argument(..., help="A CDM checkpoint.pt or the folder holding one."),
    in_dataset: str = typer.Argument(..., help="The in-distribution dataset (what the model was trained on)."),
    out_dataset: str = typer.Argument(..., help="The out-of-distribution dataset (same sample shape)."),
    in_split: str = typer.Option("test", help="Split of IN_DATASET to score."),
    out_split: str = typer.Option("test", help="Split of OUT_DATASET to score."),
    out: Optional[str] = typer.Option(None, "--out", help="Folder for scores, summary.json and the histogram."),
    dequantize: bool = typer.Option(False, "--dequantize", help="Uniform dequantization (8-bit images)."),
    batch_size: int = typer.Option(256, help="Samples per forward pass."),
    workers: Optional[int] = typer.Option(None, help="Ray workers (default: one per GPU, else one per CPU)."),
    address: Optional[str] = typer.Option(None, help="Ray cluster address (default: RAY_ADDRESS or a local Ray)."),
    tracking_uri: Optional[str] = typer.Option(None, help="MLflow tracking URI (default: MLFLOW_TRACKING_URI or ./mlflow.db)."),
    no_track: bool = typer.Option(False, "--no-track", help="Do not log to MLflow."),
) -> None:
    """AUROC of likelihood-based out-of-distribution detection, with a histogram of both NLL distributions.

    Example: cdm ood runs/mnist/checkpoint data/mnist5k data/digits28
    """
    result = run(OodConfig(
        checkpoint=checkpoint, in_dataset=in_dataset, out_dataset=out_dataset, in_split=in_split, out_split=out_split,
        out=out, dequantize=dequantize, batch_size=batch_size, workers=workers, address=address,
        tracking_uri=tracking_uri, track=not no_track,
    ))
    s = result.summary
    typer.echo(f"in  {s['in']['dataset']} [{s['in']['split']}]: {s['in']['nll_bpd']:.4f} bits/dim ({s['in']['count']} samples)")
    typer.echo(f"ood {s['ood']['dataset']} [{s['ood']['split']}]: {s['ood']['nll_bpd']:.4f} bits/dim ({s['ood']['count']} samples)")
    typer.echo(f"AUROC {result.auroc:.4f}" + (f"; histogram: {result.histogram}" if result.histogram else ""))
