"""`cdm prepare` and `cdm verify`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from pipelines.cli.options import setting
from pipelines.common import config as cfg
from pipelines.common.errors import UserError
from pipelines.data.config import SOURCES, PrepareConfig


def prepare(
    ctx: typer.Context,
    source: Optional[str] = typer.Argument(None, help=f"One of: {', '.join(SOURCES)} (or set it in --config)."),
    out: Optional[str] = typer.Option(None, "--out", help=cfg.field_doc(PrepareConfig, "out")),
    config: Optional[Path] = typer.Option(
        None, "--config", help="TOML file with these options (top level or [prepare]); flags override it."
    ),
    path: Optional[str] = setting(PrepareConfig, "path"),
    name: Optional[str] = setting(PrepareConfig, "name"),
    test_fraction: Optional[float] = setting(PrepareConfig, "test_fraction"),
    seed: int = setting(PrepareConfig, "seed"),
    size: Optional[int] = setting(PrepareConfig, "size"),
    crop: Optional[int] = setting(PrepareConfig, "crop"),
    channels: Optional[int] = setting(PrepareConfig, "channels"),
    preset: Optional[str] = setting(PrepareConfig, "preset"),
    labels: str = setting(PrepareConfig, "labels"),
    num_train: Optional[int] = setting(PrepareConfig, "num_train"),
    num_test: Optional[int] = setting(PrepareConfig, "num_test"),
    key: Optional[str] = setting(PrepareConfig, "key"),
    normalize: Optional[str] = setting(PrepareConfig, "normalize"),
    samples_per_shard: int = setting(PrepareConfig, "samples_per_shard"),
    skip_bad: bool = setting(PrepareConfig, "skip_bad", "--skip-bad"),
    force: bool = setting(PrepareConfig, "force", "--force"),
    tracking_uri: Optional[str] = setting(PrepareConfig, "tracking_uri"),
    workdir: str = setting(PrepareConfig, "workdir", help="Where the default MLflow store lives."),
    experiment: str = setting(PrepareConfig, "experiment"),
    track: bool = setting(PrepareConfig, "track", "--track/--no-track"),
    parent_run_id: Optional[str] = setting(PrepareConfig, "parent_run_id", help="Nest the MLflow run under this run."),
) -> None:
    """Turn a dataset into WebDataset shards + manifest.parquet + dataset.json.

    Examples:
      cdm prepare mnist5k --out data/mnist5k
      cdm prepare cifar10 --path ~/cifar-10-python.tar.gz --out data/cifar10
      cdm prepare imagefolder --path ~/celeba/img_align_celeba --preset celeba --out data/celeba64
      cdm prepare toy2d --name gmm8 --out data/gmm8
      cdm prepare arrays --path latents.npz --key z --labels y.npy --out data/latents
      cdm prepare --config configs/mnist.toml --seed 1
    """
    # Deferred, as in every command here: the stage imports numpy, pyarrow and MLflow (seconds); `cdm --help` should not wait.
    from pipelines.data import prepare as stage

    values = {k: v for k, v in locals().items() if k not in ("ctx", "config", "stage")}
    if config is not None:
        # Only what was typed on the command line overrides the file.
        # (compared by name: typer may ship its own copy of click's ParameterSource enum)
        given = {k: v for k, v in values.items() if getattr(ctx.get_parameter_source(k), "name", "") == "COMMANDLINE"}
        prepare_config = stage.load_config(config, given)
    else:
        if source is None or out is None:
            raise UserError("cdm prepare needs SOURCE and --out (or --config FILE); see `cdm prepare --help`")
        prepare_config = cfg.nest(PrepareConfig, **values)
    result = stage.run(prepare_config)
    counts = ", ".join(f"{s} {n}" for s, n in result.counts.items())
    shards = sum(len(v["shards"]) for v in result.meta["splits"].values())
    verb = "up to date" if result.up_to_date else "wrote"
    typer.echo(f"{verb}: {result.uri} ({counts}; {shards} shards) in {result.seconds:.1f} s")
    norm = result.meta.get("normalization")
    if norm and norm.get("kind") == "standardize":
        typer.echo(
            "normalization: standardize per channel (train-split mean/std in dataset.json); the model sees "
            "(x - mean)/std, and NLLs and samples are reported in the data's own units"
        )
    skipped = result.meta["skipped"]["count"]
    if skipped:
        typer.secho(f"skipped {skipped} bad input(s); see 'skipped' in dataset.json", fg=typer.colors.YELLOW, err=True)
    if result.run_id:
        typer.echo(f"mlflow run: {result.run_id}")


def verify(
    uri: str = typer.Argument(..., help="A prepared dataset directory or URI."),
    quick: bool = typer.Option(False, "--quick", help="Only check files, sizes and SHA-256, do not decode samples."),
) -> None:
    """Check a prepared dataset end to end: checksums, manifest, and every sample decodes.

    Example: cdm verify data/mnist5k
    """
    from pipelines.data import shards  # deferred: see prepare

    report = shards.verify(uri, decode=not quick)
    if not report.ok:
        raise UserError(f"{report.uri}: {shards.summarise(report.problems)}")
    counts = ", ".join(f"{s} {n}" for s, n in report.counts.items())
    decoded = f", {report.decoded} samples decoded" if not quick else ""
    typer.echo(f"ok: {report.uri} ({counts}; {report.shards} shards, {report.bytes / 1e6:.1f} MB{decoded})")
