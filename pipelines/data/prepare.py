"""The prepare stage: a real dataset → WebDataset shards + manifest + dataset.json, one MLflow run.

`run(PrepareConfig(...))` is the stage (`cdm prepare` in pipelines.cli).
Outputs are deterministic (same inputs and options → byte-identical shards), and a
rerun whose outputs are already complete and intact does no work.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import tempfile
import time
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from pipelines.common import config as cfg
from pipelines.common import console, storage
from pipelines.common.errors import UserError
from pipelines.common.stage import tracked
from pipelines.data import shards as sh
from pipelines.data.beside import recover_leftovers, sibling, written_beside
from pipelines.data.config import SOURCES, PrepareConfig
from pipelines.data.preview import save_preview
from pipelines.data.sources import BadInputs, Source, build_source

_OUR_FILES = re.compile(r"^([A-Za-z0-9_]+-\d{6}\.tar|manifest\.parquet|dataset\.json|\..*\.tmp-\d+)$")


def _check_type(name: str, value: Any, where: str) -> Any:
    """Check one value of a prepare TOML file against its setting's type (bool, int, float, str, optional)."""
    tp = cfg.flat_fields(PrepareConfig)[name][2]
    args = typing.get_args(tp)
    optional = type(None) in args
    base = next(a for a in args if a is not type(None)) if args else tp
    if value is None:
        if optional:
            return None
        raise UserError(f"{where}: '{name}' must not be empty")
    kind = {bool: "bool", int: "int", float: "float", str: "str"}[base]
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
        data = cfg.tomllib.loads(path.read_text())
    except (cfg.tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: not valid TOML ({err})") from None
    table = data.get("prepare", data)
    if not isinstance(table, dict):
        raise UserError(f"{path}: [prepare] must be a table")
    names = set(cfg.flat_fields(PrepareConfig))
    unknown = sorted(set(table) - names)
    if unknown:
        raise UserError(f"{path}: unknown prepare option(s) {unknown}; valid: {sorted(names)}")
    values = {k: _check_type(k, v, str(path)) for k, v in table.items()}
    values.update(overrides or {})
    missing = [k for k in ("source", "out") if k not in values]
    if missing:
        raise UserError(f"{path}: needs {' and '.join(missing)} (in the file or on the command line)")
    return cfg.nest(PrepareConfig, **values)


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
    return ds.loc.exists(sh.MANIFEST) and ds.loc.sha256(sh.MANIFEST) == manifest.get("sha256")


def _write(source: Source, config: PrepareConfig, loc: storage.Location, fingerprint: str) -> dict[str, Any]:
    bad = BadInputs(skip=config.skip_bad)
    spec: sh.SampleSpec | None = None
    splits_meta: dict[str, Any] = {}
    manifest: list[Any] = []  # the writers' per-shard Arrow tables
    written: set[str] = set()
    for split, generate in source.splits.items():
        writer: sh.SplitWriter | None = None
        try:
            with console.Progress(f"prepare {split}", 0, "samples") as progress:
                for record in generate(bad):
                    progress.advance(1)
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
        manifest += writer.manifest
        written |= {s.name for s in writer.shards}
    assert spec is not None
    # Shards left from an earlier, larger version of this dataset would confuse directory readers.
    for name in loc.list_names():
        if name.endswith(".tar") and _OUR_FILES.match(name) and name not in written:
            loc.delete(name)
    manifest = sh.write_manifest(loc, manifest)
    meta = sh.dataset_meta(
        source=source.name,
        options=source.options,
        inputs=source.inputs,
        fingerprint=fingerprint,
        spec=spec,
        class_names=source.class_names,
        samples_per_shard=config.samples_per_shard,
        splits=splits_meta,
        manifest=manifest,
        skipped={"count": bad.count, "skip_bad": config.skip_bad, "examples": bad.items},
        extra=source.extra,
    )
    sh.write_dataset_json(loc, meta)
    return meta


def _write_beside(source: Source, config: PrepareConfig, loc: storage.Location, fingerprint: str) -> dict[str, Any]:
    """Write the dataset into `.<name>.partial-<pid>` beside `loc`, then swap it into place."""
    with written_beside(Path(loc.root), loc.uri, "dataset") as partial:
        return _write(source, config, storage.resolve(partial), fingerprint)


@contextlib.contextmanager
def _claim(loc: storage.Location) -> Iterator[None]:
    """Hold `.NAME.lock` beside a local --out while this run checks and writes it, so that two `cdm prepare`
    runs into one folder cannot both pass the checks and the second replace the first's dataset.

    The second is refused at once rather than made to wait: it would then find a dataset it may not replace.
    The lock (flock) ends with the process, also a killed one; its file is removed by the run that holds it.
    An object store has no locks: it is written in place, as its own folder.
    """
    if not loc.is_local():
        yield
        return
    target = Path(loc.root)
    if not target.parent.is_dir():
        storage.check_writable(loc.uri)  # nothing created yet: the usual line for a folder that cannot be made
        target.parent.mkdir(parents=True, exist_ok=True)
    lock = sibling(target, "lock")
    fd = _lock(lock, loc.uri)
    try:
        yield
    finally:
        if fd is not None:
            lock.unlink(missing_ok=True)
            os.close(fd)


def _lock(lock: Path, uri: str) -> int | None:
    """The file descriptor of `lock`, locked exclusively; None where no file can be made (a read-only folder:
    then no run can write --out, and check_writable says why before any work)."""
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as err:
            if err.errno == errno.ELOOP:
                raise UserError(f"{lock}: a symbolic link where cdm keeps its lock for {uri}; remove it") from None
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip()
            os.close(fd)
            raise UserError(
                f"{uri}: another `cdm prepare`{f' (pid {holder})' if holder.isdigit() else ''} is writing this "
                "dataset now; wait for it to finish and run again (it then finds that dataset), or choose another --out"
            ) from None
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(lock, follow_symlinks=False))
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.write(fd, str(os.getpid()).encode())
            return fd
        os.close(fd)  # the run before us removed this file between our open and our lock: take the new one


def run(config: PrepareConfig) -> PrepareResult:
    """Prepare `config.source` into shards at `config.out`; skip if an intact identical copy is there."""
    if config.source not in SOURCES:
        raise UserError(f"unknown source {config.source!r}; choose one of {', '.join(SOURCES)}")
    if config.samples_per_shard < 1:
        raise UserError(f"--samples-per-shard {config.samples_per_shard}: must be ≥ 1")
    start = time.perf_counter()
    source = build_source(config.source, config)
    fingerprint = _fingerprint(source, config)
    loc = storage.resolve(config.out)
    with _claim(loc):
        return _run_claimed(config, source, fingerprint, loc, start)


def _run_claimed(
    config: PrepareConfig, source: Source, fingerprint: str, loc: storage.Location, start: float
) -> PrepareResult:
    """`run` once this process alone may write `loc`."""
    if loc.is_local():
        recover_leftovers(Path(loc.root), "cdm prepare")
    kind = loc.root_kind()
    if kind == "file":
        raise UserError(f"{loc.uri}: is a file; --out must be a directory (it is created if missing)")

    existing, damaged = None, None
    if kind == "dir" and loc.exists(sh.DATASET_JSON):
        try:
            existing = sh.open_dataset(loc.uri)
        except UserError as err:
            damaged = str(err).split(";")[0]
    up_to_date = (
        existing is not None
        and not config.force
        and existing.meta.get("fingerprint") == fingerprint
        and _is_intact(existing)
    )
    strangers = [n for n in loc.list_names() if not _OUR_FILES.match(n)] if kind == "dir" else []
    if not up_to_date:
        if damaged and not config.force:
            raise UserError(
                f"{damaged}: the dataset in {loc.uri} is damaged; rewrite it with --force (or choose another --out)"
            )
        if existing is not None and existing.meta.get("fingerprint") != fingerprint and not config.force:
            raise UserError(
                f"{loc.uri}: holds a dataset prepared from {existing.meta.get('source')!r} with other options or "
                "inputs; writing this one there would replace it. Give --force to replace it, or choose another --out"
            )
        if strangers and existing is None and damaged is None:
            raise UserError(
                f"{loc.uri}: not empty and not a prepared dataset (has {', '.join(strangers[:3])}"
                f"{', …' if len(strangers) > 3 else ''}); choose an empty or new --out"
            )
    # A local dataset is written into a folder beside it and renamed into place once complete: a failed or
    # killed run leaves the old dataset as it was and no half-written one. (Object stores have no rename
    # of folders, and a folder holding files of the user's own is rewritten in place, never moved.)
    beside = loc.is_local() and not strangers

    params = {
        "source": config.source,
        "out": loc.uri,
        "samples_per_shard": config.samples_per_shard,
        "skip_bad": config.skip_bad,
        "path": config.path,
        "options": source.options,
    }
    tags = {"cdm.stage": "prepare", "cdm.dataset": loc.uri, "cdm.fingerprint": fingerprint}
    with tracked(config, f"prepare-{config.source}", params, tags) as record:
        meta = existing.meta if up_to_date else _write_to(source, config, loc, fingerprint, beside)
        seconds = time.perf_counter() - start
        all_shards = [s for v in meta["splits"].values() for s in v["shards"]]
        record.metrics(
            {
                **{f"data/{s}_count": v["count"] for s, v in meta["splits"].items()},
                "data/num_shards": len(all_shards),
                "data/bytes": sum(s["bytes"] for s in all_shards),
                "data/skipped_bad": meta["skipped"]["count"],
                "data/seconds": seconds,
                "data/up_to_date": float(up_to_date),
            }
        )
        record.json(sh.DATASET_JSON, meta)
        if record.run_id:
            with tempfile.TemporaryDirectory() as tmp:
                save_preview(sh.open_dataset(loc.uri), Path(tmp) / "samples.png")
                record.artifact(Path(tmp) / "samples.png")
    return PrepareResult(loc.uri, meta, up_to_date, seconds, record.run_id)


def _write_to(source: Source, config: PrepareConfig, loc: storage.Location, fingerprint: str, beside: bool) -> dict:
    """Write the dataset at `loc`: into a folder beside it, renamed into place, or (`beside` False) in place."""
    storage.check_writable(loc.uri)
    if beside:
        return _write_beside(source, config, loc, fingerprint)
    loc.makedirs()
    if loc.exists(sh.DATASET_JSON):
        loc.delete(sh.DATASET_JSON)  # written last: its absence marks an unfinished dataset
    for name in loc.list_names():
        if name.startswith(".") and _OUR_FILES.match(name):
            loc.delete(name)  # temp files of an interrupted earlier run
    return _write(source, config, loc, fingerprint)
