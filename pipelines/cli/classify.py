"""`cdm classify`: a class-conditional CDM as an exact Bayes classifier.

Parses its flags, builds the stage's config (help texts and defaults are the
config's), calls `pipelines.evaluate.classify.run` and prints. The stage is
imported inside the command: it loads torch, Ray and MLflow, which `cdm --help`
should not wait for.
"""

from __future__ import annotations

from typing import Optional

import typer

from pipelines.cli.evaluate import _NO_TRACK, _RAW_WEIGHTS, _TRACKING_URI
from pipelines.cli.options import argument, setting
from pipelines.common.config import TrackingSection
from pipelines.evaluate.config import ClassifyConfig, PoolSection


def classify(
    checkpoint: str = argument(ClassifyConfig, "checkpoint"),
    dataset: str = argument(ClassifyConfig, "dataset"),
    split: str = setting(ClassifyConfig, "split"),
    prior: str = setting(ClassifyConfig, "prior"),
    out: Optional[str] = setting(ClassifyConfig, "out", "--out"),
    batch_size: int = setting(ClassifyConfig, "batch_size"),
    raw_weights: bool = typer.Option(False, "--raw-weights", help=_RAW_WEIGHTS),
    workers: Optional[int] = setting(ClassifyConfig, "workers"),
    gpus_per_worker: Optional[float] = setting(ClassifyConfig, "gpus_per_worker"),
    address: Optional[str] = setting(ClassifyConfig, "address", envvar="RAY_ADDRESS"),
    wait_s: Optional[float] = setting(ClassifyConfig, "wait_s", "--wait-s"),
    tracking_uri: Optional[str] = typer.Option(None, envvar="MLFLOW_TRACKING_URI", help=_TRACKING_URI),
    train_run_id: Optional[str] = setting(ClassifyConfig, "train_run_id"),
    no_track: bool = typer.Option(False, "--no-track", help=_NO_TRACK),
) -> None:
    """Classify every sample of a split with a class-conditional CDM by Bayes' rule: accuracy, NLL of the labels, ECE.

    log p(y|x) = log p(x|y) + log p(y) − log Σ_y' p(x|y') p(y'), log p(x|y) by one forward pass per class.

    Example: cdm classify runs/mnist-cond/checkpoint data/mnist5k --split test --prior train
    """
    from pipelines.evaluate import classify as stage  # deferred: see the module docstring

    result = stage.run(
        ClassifyConfig(
            checkpoint=checkpoint,
            dataset=dataset,
            split=split,
            prior=prior,
            out=out,
            batch_size=batch_size,
            use_ema=not raw_weights,
            train_run_id=train_run_id,
            track=not no_track,
            pool=PoolSection(workers=workers, gpus_per_worker=gpus_per_worker, address=address, wait_s=wait_s),
            tracking=TrackingSection(tracking_uri=tracking_uri),
        )
    )
    s = result.summary
    typer.echo(
        f"accuracy {s['accuracy']:.4f} ({s['count']} samples of {s['split']}, {s['num_classes']} classes, "
        f"prior {s['prior']}); NLL of the labels {s['nll']:.4f} nats; ECE {s['ece']:.4f} ({s['ece_bins']} bins)"
    )
    typer.echo(f"per-sample scores: {result.scores_uri}")
    typer.echo(f"confusion matrix: {result.confusion}")
