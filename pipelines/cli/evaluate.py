"""`cdm sample`, `cdm nll`, `cdm ood`, `cdm fid` and `cdm train-features`.

Each command parses its flags, builds the stage's config from them (help texts
and defaults are the config's), calls the stage's `run(config)` and prints.
The stages are imported inside the commands: they load torch, Ray and MLflow,
which takes seconds that `cdm --help` should not wait for.
"""

from __future__ import annotations

from typing import Optional

import typer

from pipelines.cli.options import argument, setting
from pipelines.common.config import TrackingSection
from pipelines.evaluate.config import (
    FidConfig,
    NllConfig,
    OodConfig,
    PoolSection,
    SampleConfig,
    ScoringSection,
    TrainFeaturesConfig,
)

_TRACKING_URI = "MLflow tracking URI (default: MLFLOW_TRACKING_URI or ./mlflow.db)."
_NO_TRACK = "Do not log to MLflow."
_RAW_WEIGHTS = "Use the raw weights instead of the EMA weights."


def sample(
    checkpoint: str = argument(SampleConfig, "checkpoint"),
    out: str = setting(SampleConfig, "out", "--out"),
    n: int = setting(SampleConfig, "n", "--n"),
    sampler: str = setting(SampleConfig, "sampler"),
    steps: int = setting(SampleConfig, "steps"),
    time_grid: str = setting(SampleConfig, "time_grid"),
    seed: int = setting(SampleConfig, "seed"),
    batch_size: int = setting(SampleConfig, "batch_size"),
    cfg: float = setting(SampleConfig, "cfg", "--cfg"),
    label: Optional[int] = setting(SampleConfig, "label"),
    raw_weights: bool = typer.Option(False, "--raw-weights", help=_RAW_WEIGHTS),
    clip_x0: Optional[float] = setting(SampleConfig, "clip_x0"),
    workers: Optional[int] = setting(SampleConfig, "workers"),
    gpus_per_worker: Optional[float] = setting(SampleConfig, "gpus_per_worker"),
    address: Optional[str] = setting(SampleConfig, "address", envvar="RAY_ADDRESS"),
    wait_s: Optional[float] = setting(SampleConfig, "wait_s", "--wait-s"),
    force: bool = setting(SampleConfig, "force"),
    tracking_uri: Optional[str] = typer.Option(None, envvar="MLFLOW_TRACKING_URI", help=_TRACKING_URI),
    train_run_id: Optional[str] = setting(SampleConfig, "train_run_id"),
    no_track: bool = typer.Option(False, "--no-track", help=_NO_TRACK),
) -> None:
    """Draw samples from a trained model on Ray workers; write them as shards plus grid.png.

    Example: cdm sample runs/mnist/checkpoint --n 1000 --sampler ddim --steps 50 --out outputs/samples
    """
    from pipelines.evaluate import sample as stage  # deferred: see the module docstring

    result = stage.run(
        SampleConfig(
            checkpoint=checkpoint,
            out=out,
            n=n,
            sampler=sampler,
            steps=steps,
            time_grid=time_grid,
            seed=seed,
            batch_size=batch_size,
            cfg=cfg,
            label=label,
            use_ema=not raw_weights,
            clip_x0=clip_x0,
            force=force,
            train_run_id=train_run_id,
            track=not no_track,
            pool=PoolSection(workers=workers, gpus_per_worker=gpus_per_worker, address=address, wait_s=wait_s),
            tracking=TrackingSection(tracking_uri=tracking_uri),
        )
    )
    if result.up_to_date:
        typer.echo(f"up to date: {result.uri} already holds these {result.count} samples")
    else:
        typer.echo(f"{result.count} samples in {result.seconds:.1f} s ({result.images_per_s:.2f}/s) → {result.uri}")
    if result.grid:
        typer.echo(f"grid: {result.grid}")


def nll(
    checkpoint: str = argument(NllConfig, "checkpoint"),
    dataset: str = argument(NllConfig, "dataset"),
    split: str = setting(NllConfig, "split"),
    out: Optional[str] = setting(NllConfig, "out", "--out"),
    method: Optional[str] = setting(NllConfig, "method"),
    elbo_stride: int = setting(NllConfig, "elbo_stride"),
    consistency_samples: int = setting(NllConfig, "consistency_samples"),
    consistency_classes: int = setting(NllConfig, "consistency_classes"),
    ode_rtol: float = setting(NllConfig, "ode_rtol"),
    ode_atol: float = setting(NllConfig, "ode_atol"),
    trace: Optional[str] = setting(NllConfig, "trace"),
    dequantize: bool = setting(NllConfig, "dequantize", "--dequantize"),
    bpd_convention: Optional[str] = setting(NllConfig, "bpd_convention"),
    conditional: bool = setting(NllConfig, "conditional", "--conditional"),
    seed: int = setting(NllConfig, "seed"),
    batch_size: int = setting(NllConfig, "batch_size"),
    raw_weights: bool = typer.Option(False, "--raw-weights", help=_RAW_WEIGHTS),
    workers: Optional[int] = setting(NllConfig, "workers"),
    gpus_per_worker: Optional[float] = setting(NllConfig, "gpus_per_worker"),
    address: Optional[str] = setting(NllConfig, "address", envvar="RAY_ADDRESS"),
    wait_s: Optional[float] = setting(NllConfig, "wait_s", "--wait-s"),
    tracking_uri: Optional[str] = typer.Option(None, envvar="MLFLOW_TRACKING_URI", help=_TRACKING_URI),
    train_run_id: Optional[str] = setting(NllConfig, "train_run_id"),
    no_track: bool = typer.Option(False, "--no-track", help=_NO_TRACK),
) -> None:
    """Negative log-likelihood of every sample of a split (one-pass, ELBO, ODE); mean bits/dim with a 95% CI.

    Example: cdm nll runs/mnist/checkpoint data/mnist5k --split test --method all
    """
    from pipelines.evaluate import nll as stage  # deferred: see the module docstring

    result = stage.run(
        NllConfig(
            checkpoint=checkpoint,
            dataset=dataset,
            split=split,
            out=out,
            train_run_id=train_run_id,
            track=not no_track,
            method=method,
            elbo_stride=elbo_stride,
            consistency_samples=consistency_samples,
            consistency_classes=consistency_classes,
            ode_rtol=ode_rtol,
            ode_atol=ode_atol,
            trace=trace,
            scoring=ScoringSection(
                bpd_convention=bpd_convention,
                dequantize=dequantize,
                conditional=conditional,
                seed=seed,
                batch_size=batch_size,
                use_ema=not raw_weights,
            ),
            pool=PoolSection(workers=workers, gpus_per_worker=gpus_per_worker, address=address, wait_s=wait_s),
            tracking=TrackingSection(tracking_uri=tracking_uri),
        )
    )
    s = result.summary
    for name, m in s["methods"].items():
        deq = "dequantized" if m["dequantize"] else "no dequantization"
        typer.echo(
            f"NLL {name:<8} {m['nll_bpd']:.4f} ± {m['nll_bpd_ci95']:.4f} bits/dim (95% CI, {s['count']} samples of "
            f"{s['split']}; convention {m['convention']}, {deq}; {m['nfe_per_sample']:g} NFE/sample, "
            f"{m['seconds']:.1f} s)"
        )
    if "reading" in s.get("consistency", {}):
        typer.echo(s["consistency"]["reading"])
    typer.echo(f"per-sample scores: {result.scores_uri}")
    if result.plot:
        typer.echo(f"one-pass vs the other methods, per sample: {result.plot}")


def ood(
    checkpoint: str = argument(OodConfig, "checkpoint"),
    in_dataset: str = argument(OodConfig, "in_dataset"),
    out_dataset: str = argument(OodConfig, "out_dataset"),
    in_split: str = setting(OodConfig, "in_split"),
    out_split: str = setting(OodConfig, "out_split"),
    out: Optional[str] = setting(OodConfig, "out", "--out"),
    dequantize: bool = setting(OodConfig, "dequantize", "--dequantize", help="Uniform dequantization (8-bit images)."),
    batch_size: int = setting(OodConfig, "batch_size", help="Samples per forward pass."),
    workers: Optional[int] = setting(OodConfig, "workers"),
    gpus_per_worker: Optional[float] = setting(OodConfig, "gpus_per_worker"),
    address: Optional[str] = setting(OodConfig, "address", envvar="RAY_ADDRESS"),
    wait_s: Optional[float] = setting(OodConfig, "wait_s", "--wait-s"),
    tracking_uri: Optional[str] = typer.Option(None, envvar="MLFLOW_TRACKING_URI", help=_TRACKING_URI),
    no_track: bool = typer.Option(False, "--no-track", help=_NO_TRACK),
) -> None:
    """AUROC of likelihood-based out-of-distribution detection, with a histogram of both NLL distributions.

    Example: cdm ood runs/mnist/checkpoint data/mnist5k data/digits28
    """
    from pipelines.evaluate import ood as stage  # deferred: see the module docstring

    result = stage.run(
        OodConfig(
            checkpoint=checkpoint,
            in_dataset=in_dataset,
            out_dataset=out_dataset,
            in_split=in_split,
            out_split=out_split,
            out=out,
            track=not no_track,
            scoring=ScoringSection(dequantize=dequantize, batch_size=batch_size),
            pool=PoolSection(workers=workers, gpus_per_worker=gpus_per_worker, address=address, wait_s=wait_s),
            tracking=TrackingSection(tracking_uri=tracking_uri),
        )
    )
    s = result.summary
    typer.echo(
        f"in  {s['in']['dataset']} [{s['in']['split']}]: {s['in']['nll_bpd']:.4f} bits/dim ({s['in']['count']} samples)"
    )
    typer.echo(
        f"ood {s['ood']['dataset']} [{s['ood']['split']}]: {s['ood']['nll_bpd']:.4f} bits/dim ({s['ood']['count']} samples)"
    )
    typer.echo(f"AUROC {result.auroc:.4f}" + (f"; histogram: {result.histogram}" if result.histogram else ""))


def fid(
    samples: str = argument(FidConfig, "samples"),
    reference: str = argument(FidConfig, "reference"),
    features: str = setting(FidConfig, "features"),
    samples_split: Optional[str] = setting(FidConfig, "samples_split"),
    reference_split: str = setting(FidConfig, "reference_split"),
    inception_weights: Optional[str] = setting(FidConfig, "inception_weights"),
    inception_sha256: Optional[str] = setting(FidConfig, "inception_sha256", envvar="CDM_INCEPTION_SHA256"),
    cache_dir: Optional[str] = setting(FidConfig, "cache_dir"),
    no_cache: bool = typer.Option(
        False, "--no-cache", help="Recompute the reference statistics and do not cache them."
    ),
    batch_size: int = setting(FidConfig, "batch_size"),
    workers: Optional[int] = setting(FidConfig, "workers"),
    gpus_per_worker: Optional[float] = setting(FidConfig, "gpus_per_worker"),
    address: Optional[str] = setting(FidConfig, "address", envvar="RAY_ADDRESS"),
    wait_s: Optional[float] = setting(FidConfig, "wait_s", "--wait-s"),
    tracking_uri: Optional[str] = typer.Option(None, envvar="MLFLOW_TRACKING_URI", help=_TRACKING_URI),
    no_track: bool = typer.Option(False, "--no-track", help=_NO_TRACK),
) -> None:
    """Fréchet distance between samples and a reference dataset: FID with Inception features, fd_<dataset> with a classifier's.

    Example: cdm fid outputs/samples data/mnist5k --features classifier:outputs/features/mnist5k/classifier.pt
    """
    from pipelines.evaluate import fid as stage  # deferred: see the module docstring

    r = stage.run(
        FidConfig(
            samples=samples,
            reference=reference,
            features=features,
            samples_split=samples_split,
            reference_split=reference_split,
            inception_weights=inception_weights,
            inception_sha256=inception_sha256,
            cache_dir=cache_dir,
            use_cache=not no_cache,
            batch_size=batch_size,
            track=not no_track,
            pool=PoolSection(workers=workers, gpus_per_worker=gpus_per_worker, address=address, wait_s=wait_s),
            tracking=TrackingSection(tracking_uri=tracking_uri),
        )
    )
    name = r.metric.split("/", 1)[1]
    cached = " (reference statistics from cache)" if r.reference_cached else ""
    typer.echo(
        f"{name} = {r.value:.4f}  [{r.samples_count} samples vs {r.reference_count} reference; {r.extractor}]{cached}"
    )
    if r.metric == "eval/fid" and min(r.samples_count, r.reference_count) < 10_000:
        typer.echo("note: FID is biased upward with few samples; the paper's figures use 50,000")


def train_features(
    dataset: str = argument(TrainFeaturesConfig, "dataset"),
    out: Optional[str] = setting(TrainFeaturesConfig, "out", "--out"),
    epochs: int = setting(TrainFeaturesConfig, "epochs"),
    batch_size: int = setting(TrainFeaturesConfig, "batch_size"),
    lr: float = setting(TrainFeaturesConfig, "lr"),
    seed: int = setting(TrainFeaturesConfig, "seed"),
    tracking_uri: Optional[str] = typer.Option(None, envvar="MLFLOW_TRACKING_URI", help=_TRACKING_URI),
    no_track: bool = typer.Option(False, "--no-track", help=_NO_TRACK),
) -> None:
    """Train a small classifier on a dataset; its penultimate features define `fd_<dataset>` for `cdm fid`.

    Example: cdm train-features data/mnist5k --out outputs/features/mnist5k
    """
    from pipelines.evaluate import feature_classifier as stage  # deferred: see the module docstring

    r = stage.run(
        TrainFeaturesConfig(
            dataset=dataset,
            out=out,
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            seed=seed,
            track=not no_track,
            tracking=TrackingSection(tracking_uri=tracking_uri),
        )
    )
    typer.echo(f"test accuracy {r.test_accuracy:.4f} after {r.train_seconds:.1f} s of training → {r.path}")
    typer.echo(
        f"use it with: cdm fid SAMPLES REFERENCE --features classifier:{r.path}   (reported as eval/fd_{r.dataset_name})"
    )
