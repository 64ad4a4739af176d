"""The prepare stage: a real dataset → WebDataset shards + manifest + dataset.json, one MLflow run.

`run(PrepareConfig(...))` is the stage; `prepare_command` is its `cdm prepare` CLI.
Outputs are deterministic (same inputs and options → byte-identical shards), and a
rerun whose outputs are already complete and intact does no work.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import typer

from pipelines import shards as sh
from pipelines.errors import UserError
from pipelines.sources import SOURCES, BadInputs, Source, SourceOptions, build_source

EXPERIMENT = "cdm"
_OUR_FILES = re.compile(r"^([A-Za-z0-9_]+-\d{6}\.tar|manifest\.parquet|dataset\.json|\..*\.tmp-\d+)$")


@dataclass
class PrepareConfig:
    source: str
    out: str
    path: Optional[str] = None
    name: Optional[str] = None
    test_fraction: Optional[float] = None
    seed: int = 0
    size: Optional[int] = None
    crop: Optional[int] = None
    channels: Optional[int] = None
    preset: Optional[str] = None
    labels: str = "auto"
    num_train: Optional[int] = None
    num_test: Optional[int] = None
    samples_per_shard: int = 1000
    skip_bad: bool = False
    force: bool = False
    # tracking
    track: bool = True
    tracking_uri: Optional[str] = None
    workdir: str = "."
    experiment: str = EXPERIMENT
    parent_run_id: Optional[str] = None

    def source_options(self) -> SourceOptions:
        fields = {f.name for f in dataclasses.fields(SourceOptions)}
        return SourceOptions(**{k: v for k, v in dataclasses.asdict(self).items() if k in fields})


def _check_type(name: str, value: Any, where: str) -> Any:
    """Coerce/validate one config value against PrepareConfig's field type (int, float, str, bool, Optional)."""
    hint = {f.name: f.type for f in dataclasses.fields(PrepareConfig)}[name]
    optional = "Optional" in str(hint)
    if value is None:
        if optional:
            return None
        raise UserError(f"{where}: '{name}' must not be empty")
    kind = next(t for t in ("bool", "int", "float", "str") if t in str(hint))
    ok = {
        "bool": isinstance(value, bool),
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, (int, float)) and not isinstance(value, bool),
        "str": isinstance(value, str),
    }[kind]
    if not ok:
        raise UserError(f"{where}: '{name}' must be {kind}, got {value!r}")
    return float(value) if kind == "float" else value


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> PrepareConfig:
    """A PrepareConfig from a TOML file (top level or a [prepare] table), then `overrides` on top."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: config file does not exist")
    try:
        import tomllib
    except ImportError:  # Python < 3.11
        import tomli as tomllib
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: not valid TOML ({err})") from None
    table = data.get("prepare", data)
    if not isinstance(table, dict):
        raise UserError(f"{path}: [prepare] must be a table")
    names = {f.name for f in dataclasses.fields(PrepareConfig)}
    unknown = sorted(set(table) - names)
    if unknown:
        raise UserError(f"{path}: unknown prepare option(s) {unknown}; valid: {sorted(names)}")
    values = {k: _check_type(k, v, str(path)) for k, v in table.items()}
    values.update(overrides or {})
    missing = [k for k in ("source", "out") if k not in values]
    if missing:
        raise UserError(f"{path}: needs {' and '.join(missing)} (in the file or on the command line)")
    return PrepareConfig(**values)


@dataclass
class PrepareResult:
    uri: str
    meta: dict[str, Any]
    up_to_date: bool
    seconds: float
    run_id: Optional[str] = None

    @property
    def counts(self) -> dict[str, int]:
        return {s: int(v["count"]) for s, v in self.meta["splits"].items()}


def _fingerprint(source: Source, config: PrepareConfig) -> str:
    blob = {
        "format": sh.FORMAT,
        "source": source.name,
        "options": source.options,
        "inputs": source.inputs,
        "samples_per_shard": config.samples_per_shard,
        "skip_bad": config.skip_bad,
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()


def _is_intact(ds: sh.Dataset) -> bool:
    if sh.check_shard_files(ds):
        return False
    manifest = ds.meta.get("manifest") or {}
    return ds.loc.exists(sh.MANIFEST) and sh.sha256_of(ds.loc, sh.MANIFEST) == manifest.get("sha256")


def _write(source: Source, config: PrepareConfig, loc: sh.Location, fingerprint: str) -> dict[str, Any]:
    bad = BadInputs(skip=config.skip_bad)
    spec: sh.SampleSpec | None = None
    splits_meta: dict[str, Any] = {}
    manifest_rows: list[dict[str, Any]] = []
    written: set[str] = set()
    for split, generate in source.splits.items():
        writer: sh.SplitWriter | None = None
        try:
            for record in generate(bad):
                if spec is None:
                    shape = source.shape or tuple(record.data.shape)
                    spec = sh.SampleSpec(source.kind, tuple(shape), source.labeled, source.num_classes)
                if writer is None:
                    writer = sh.SplitWriter(loc, split, spec, config.samples_per_shard)
                writer.add(record.data, record.label, record.source_id)
        except BaseException:
            if writer is not None:
                writer.abort()  # close the half-built shard's tar stream; it is never written
            raise
        if writer is None or writer.count == 0:
            raise UserError(
                f"{config.path or config.source}: split {split!r} has no usable samples"
                + (f" ({bad.count} skipped as bad)" if bad.count else "")
            )
        splits_meta[split] = writer.close()
        manifest_rows += writer.manifest_rows
        written |= {s.name for s in writer.shards}
    assert spec is not None
    # Shards left from an earlier, larger version of this dataset would confuse directory readers.
    for name in loc.list_names():
        if name.endswith(".tar") and _OUR_FILES.match(name) and name not in written:
            loc.delete(name)
    manifest = sh.write_manifest(loc, manifest_rows)
    meta: dict[str, Any] = {
        "format": sh.FORMAT,
        "source": source.name,
        "options": source.options,
        "inputs": source.inputs,
        "fingerprint": fingerprint,
        "sample": spec.to_json(),
        "num_classes": source.num_classes,
        "class_names": source.class_names,
        "samples_per_shard": config.samples_per_shard,
        "counts": {s: m["count"] for s, m in splits_meta.items()},
        "stats_units": "pixel values / 255 (images); raw values (vectors)",
        "splits": splits_meta,
        "manifest": manifest,
        "skipped": {"count": bad.count, "skip_bad": config.skip_bad, "examples": bad.items},
        **source.extra,
    }
    sh.write_dataset_json(loc, meta)
    return meta


def run(config: PrepareConfig) -> PrepareResult:
    """Prepare `config.source` into shards at `config.out`; skip if an intact identical copy is there."""
    if config.source not in SOURCES:
        raise UserError(f"unknown source {config.source!r}; choose one of {', '.join(SOURCES)}")
    if config.samples_per_shard < 1:
        raise UserError(f"--samples-per-shard {config.samples_per_shard}: must be ≥ 1")
    start = time.perf_counter()
    source = build_source(config.source, config.source_options())
    fingerprint = _fingerprint(source, config)
    loc = sh.resolve(config.out)
    kind = loc.root_kind()
    if kind == "file":
        raise UserError(f"{loc.uri}: is a file; --out must be a directory (it is created if missing)")

    existing = sh.open_dataset(loc.uri) if kind == "dir" and loc.exists(sh.DATASET_JSON) else None
    up_to_date = (
        existing is not None
        and not config.force
        and existing.meta.get("fingerprint") == fingerprint
        and _is_intact(existing)
    )
    if not up_to_date and kind == "dir" and existing is None:
        strangers = [n for n in loc.list_names() if not _OUR_FILES.match(n)]
        if strangers:
            raise UserError(
                f"{loc.uri}: not empty and not a prepared dataset (has {', '.join(strangers[:3])}"
                f"{', …' if len(strangers) > 3 else ''}); choose an empty or new --out"
            )

    def work() -> dict[str, Any]:
        if up_to_date:
            return existing.meta
        loc.makedirs()
        if loc.exists(sh.DATASET_JSON):
            loc.delete(sh.DATASET_JSON)  # written last: its absence marks an unfinished dataset
        for name in loc.list_names():
            if name.startswith(".") and _OUR_FILES.match(name):
                loc.delete(name)  # temp files of an interrupted earlier run
        return _write(source, config, loc, fingerprint)

    if not config.track:
        meta = work()
        return PrepareResult(loc.uri, meta, up_to_date, time.perf_counter() - start)

    import mlflow

    from pipelines.tracking import default_tracking_uri, mlflow_run

    uri = config.tracking_uri or default_tracking_uri(config.workdir)
    params = {
        "source": config.source,
        "out": loc.uri,
        "samples_per_shard": config.samples_per_shard,
        "skip_bad": config.skip_bad,
        "path": config.path,
        "options": source.options,
    }
    tags = {"cdm.stage": "prepare", "cdm.dataset": loc.uri, "cdm.fingerprint": fingerprint}
    with mlflow_run(config.experiment, f"prepare-{config.source}", uri, params, tags, config.parent_run_id) as active:
        meta = work()
        seconds = time.perf_counter() - start
        metrics = {f"data/{s}_count": float(v["count"]) for s, v in meta["splits"].items()}
        all_shards = [s for v in meta["splits"].values() for s in v["shards"]]
        metrics.update(
            {
                "data/num_shards": float(len(all_shards)),
                "data/bytes": float(sum(s["bytes"] for s in all_shards)),
                "data/skipped_bad": float(meta["skipped"]["count"]),
                "data/seconds": seconds,
                "data/up_to_date": float(up_to_date),
            }
        )
        mlflow.log_metrics(metrics)
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / sh.DATASET_JSON).write_text(json.dumps(meta, indent=2) + "\n")
            mlflow.log_artifact(str(Path(tmp) / sh.DATASET_JSON))
            grid = Path(tmp) / "samples.png"
            save_preview(sh.open_dataset(loc.uri), grid)
            mlflow.log_artifact(str(grid))
        run_id = active.info.run_id
    return PrepareResult(loc.uri, meta, up_to_date, seconds, run_id)


def save_preview(ds: sh.Dataset, path: Path, n: int = 64) -> None:
    """A PNG grid of the first n training images (a scatter plot for vector data)."""
    split = "train" if "train" in ds.splits else ds.splits[0]
    if ds.spec.kind == "vector":
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        pts = np.stack([x for _, _, x, _ in _take(ds, split, 5000)])
        fig, ax = plt.subplots(figsize=(4, 4), dpi=100)
        ax.scatter(pts[:, 0], pts[:, 1], s=1, alpha=0.5)
        ax.set_aspect("equal")
        ax.set_title(f"{ds.meta['source']} {ds.meta.get('toy', {}).get('name', '')} ({split}, {len(pts)} points)")
        fig.savefig(path)
        plt.close(fig)
        return
    from PIL import Image

    images = [x for _, _, x, _ in _take(ds, split, n)]
    h, w, c = images[0].shape
    cols = int(np.ceil(np.sqrt(len(images))))
    rows = int(np.ceil(len(images) / cols))
    grid = np.zeros((rows * (h + 2), cols * (w + 2), c), dtype=np.uint8)
    for i, im in enumerate(images):
        r, q = divmod(i, cols)
        grid[r * (h + 2) + 1 : r * (h + 2) + 1 + h, q * (w + 2) + 1 : q * (w + 2) + 1 + w] = im
    scale = max(1, 256 // max(grid.shape[:2]))
    pil = Image.fromarray(grid[:, :, 0] if c == 1 else grid)
    pil.resize((pil.width * scale, pil.height * scale), Image.Resampling.NEAREST).save(path)


def _take(ds: sh.Dataset, split: str, n: int) -> list[tuple[str, int, Any, int]]:
    out = []
    for item in sh.iter_split(ds, split):
        out.append(item)
        if len(out) >= n:
            break
    return out


# --------------------------------------------------------------------------- CLI


def prepare_command(
    ctx: typer.Context,
    source: Optional[str] = typer.Argument(None, help=f"One of: {', '.join(SOURCES)} (or set it in --config)."),
    out: Optional[str] = typer.Option(None, "--out", help="Output directory or URI (file://, s3://, gs://, …)."),
    config: Optional[Path] = typer.Option(None, "--config", help="TOML file with these options (top level or [prepare]); flags override it."),
    path: Optional[str] = typer.Option(None, help="Input for cifar10 (tar.gz or folder) and imagefolder (folder)."),
    name: Optional[str] = typer.Option(None, help="toy2d distribution: gmm, gmm8, gmm25, checkerboard, two_moons."),
    test_fraction: Optional[float] = typer.Option(
        None, help="Held-out fraction, stratified by class (mnist5k/digits default 0.1, imagefolder 0)."
    ),
    seed: int = typer.Option(0, help="Seed for the split and the sample order."),
    size: Optional[int] = typer.Option(None, help="Resize to SIZE×SIZE (shorter side, then center crop)."),
    crop: Optional[int] = typer.Option(None, help="imagefolder: center-crop CROP×CROP before resizing."),
    channels: Optional[int] = typer.Option(None, help="imagefolder: 1 (grayscale) or 3 (RGB, default)."),
    preset: Optional[str] = typer.Option(None, help="imagefolder: 'celeba' (128×128 crop at (89, 121) → 64×64)."),
    labels: str = typer.Option("auto", help="imagefolder: auto | folder (class subfolders) | none."),
    num_train: Optional[int] = typer.Option(None, help="toy2d: training points (default 10000)."),
    num_test: Optional[int] = typer.Option(None, help="toy2d: test points (default 2000)."),
    samples_per_shard: int = typer.Option(1000, help="Samples per tar shard."),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Skip unreadable/mismatched inputs with a warning (counted in dataset.json)."),
    force: bool = typer.Option(False, "--force", help="Rewrite even if an intact identical dataset is already there."),
    tracking_uri: Optional[str] = typer.Option(None, help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///WORKDIR/mlflow.db)."),
    workdir: str = typer.Option(".", help="Where the default MLflow store lives."),
    experiment: str = typer.Option(EXPERIMENT, help="MLflow experiment name."),
    track: bool = typer.Option(True, "--track/--no-track", help="Log an MLflow run."),
    parent_run_id: Optional[str] = typer.Option(None, help="Nest the MLflow run under this run."),
) -> None:
    """Turn a dataset into WebDataset shards + manifest.parquet + dataset.json.

    Examples:
      cdm prepare mnist5k --out data/mnist5k
      cdm prepare cifar10 --path ~/cifar-10-python.tar.gz --out data/cifar10
      cdm prepare imagefolder --path ~/celeba/img_align_celeba --preset celeba --out data/celeba64
      cdm prepare toy2d --name gmm8 --out data/gmm8
      cdm prepare --config configs/mnist.toml --seed 1
    """
    values = {k: v for k, v in locals().items() if k not in ("ctx", "config")}
    if config is not None:
        # Only what was typed on the command line overrides the file.
        # (compared by name: typer may ship its own copy of click's ParameterSource enum)
        given = {k: v for k, v in values.items() if getattr(ctx.get_parameter_source(k), "name", "") == "COMMANDLINE"}
        cfg = load_config(config, given)
    else:
        if source is None or out is None:
            raise UserError("cdm prepare needs SOURCE and --out (or --config FILE); see `cdm prepare --help`")
        cfg = PrepareConfig(**values)
    result = run(cfg)
    counts = ", ".join(f"{s} {n}" for s, n in result.counts.items())
    shards = sum(len(v["shards"]) for v in result.meta["splits"].values())
    verb = "up to date" if result.up_to_date else "wrote"
    typer.echo(f"{verb}: {result.uri} ({counts}; {shards} shards) in {result.seconds:.1f} s")
    skipped = result.meta["skipped"]["count"]
    if skipped:
        typer.secho(f"skipped {skipped} bad input(s); see 'skipped' in dataset.json", fg=typer.colors.YELLOW, err=True)
    if result.run_id:
        typer.echo(f"mlflow run: {result.run_id}")
