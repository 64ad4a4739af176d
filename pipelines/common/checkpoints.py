"""Trained models as the stages after training see them: loading a checkpoint, and the run that made it.

The contract between `cdm train` and everything downstream: a checkpoint in
the `cdm_core.checkpoint` format whose `config` holds the training config as
nested plain dicts, with at least

    config["model"]["kind"]          "cdm" | "ddm"
    config["schedule"]["name"], config["schedule"]["T"], config["schedule"].get("params", {})
    config["loss"].get("prior")      None (uniform) or a list of T+2 probabilities
    config["data"].get("num_labels") None or the number of classes

A checkpoint path may be the `.pt` file or a folder holding `checkpoint.pt`
(a Ray Train checkpoint directory), on local disk or at any URI `pipelines.common.storage`
reads (`s3://bucket/runs/NAME/checkpoint_00000040`): a URI stays a URI, so the Ray workers
of a batch stage read the checkpoint from the bucket themselves, whichever node they are on.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cdm_core.checkpoint import load_checkpoint, model_from_checkpoint
from cdm_core.samplers import EpsFn, cdm_eps_fn, ddm_eps_fn
from cdm_core.schedules import Schedule, get_schedule
from pipelines.common import storage
from pipelines.common.errors import UserError

CHECKPOINT_FILENAME = "checkpoint.pt"


@dataclass
class TrainedModel:
    model: torch.nn.Module
    kind: str  # "cdm" or "ddm"
    schedule: Schedule  # float64; cast with .to() where used
    prior: torch.Tensor | None
    num_labels: int | None
    config: dict[str, Any]
    step: int
    path: str

    def eps_fn(self, y: torch.Tensor | None = None, dtype=torch.float32, device=None) -> EpsFn:
        """The ε-predictor the samplers take, for either kind of model."""
        if self.kind == "cdm":
            return cdm_eps_fn(self.model, self.schedule.to(device=device, dtype=dtype), y)
        return ddm_eps_fn(self.model, y)


def checkpoint_file(path: str | os.PathLike) -> Path | str:
    """The checkpoint file at `path` (the file, or a folder holding one): a local Path, or the file's URI."""
    text = os.fspath(path)
    if storage.is_uri(text):
        loc = storage.resolve(text)
        if loc.kind() == "dir":
            if loc.exists(CHECKPOINT_FILENAME):
                return loc.where(CHECKPOINT_FILENAME)
        elif loc.kind() == "file":
            return text
        raise UserError(f"no checkpoint at {path}: expected a {CHECKPOINT_FILENAME} file or a folder containing one")
    p = Path(path)
    if p.is_dir():
        p = p / CHECKPOINT_FILENAME
    if not p.is_file():
        raise UserError(f"no checkpoint at {path}: expected a {CHECKPOINT_FILENAME} file or a folder containing one")
    return p


@contextlib.contextmanager
def _local(file: Path | str) -> Iterator[Path]:
    """The checkpoint as a local file for the block: itself, or a URI downloaded once to a scratch file
    (one pass, few requests)."""
    if isinstance(file, str) and storage.is_uri(file):
        folder, name = storage.parent_and_name(file)
        with tempfile.TemporaryDirectory(prefix="cdm-checkpoint-") as scratch:
            local = Path(scratch) / CHECKPOINT_FILENAME
            folder.download(name, local)
            yield local
    else:
        yield Path(file)


def _trained(file: Path | str, local: Path, use_ema: bool, device: str) -> tuple[TrainedModel, dict[str, Any]]:
    """The network (EMA weights by default), its schedule and prior, from the local copy of `file`."""
    try:
        ckpt = load_checkpoint(local, name=str(file))
        model = model_from_checkpoint(ckpt, use_ema=use_ema and ckpt.get("ema") is not None)
    except (ValueError, RuntimeError, OSError) as err:
        raise UserError(f"{file}: cannot load checkpoint ({err})") from None
    config = ckpt["config"]
    try:
        kind = config["model"]["kind"]
        sched_cfg = config["schedule"]
        schedule = get_schedule(sched_cfg["name"], int(sched_cfg["T"]), **sched_cfg.get("params", {}))
    except (KeyError, TypeError, ValueError) as err:
        raise UserError(f"{file}: checkpoint config lacks a usable model kind or schedule ({err!r})") from None
    prior = config.get("loss", {}).get("prior")
    trained = TrainedModel(
        # Inference only: no parameter keeps a gradient (a CDM's ε̂ differentiates the input alone).
        model=model.to(device).eval().requires_grad_(False),
        kind=kind,
        schedule=schedule,
        prior=None if prior is None else torch.tensor(prior, dtype=torch.float64),
        num_labels=config.get("data", {}).get("num_labels"),
        config=config,
        step=int(ckpt["step"]),
        path=str(file),
    )
    return trained, ckpt


def load_trained_model(path: str | os.PathLike, *, use_ema: bool = True, device: str = "cpu") -> TrainedModel:
    """Rebuild the network (EMA weights by default), its schedule and prior from a checkpoint."""
    file = checkpoint_file(path)
    with _local(file) as local:
        return _trained(file, local, use_ema, device)[0]


@dataclass
class LocatedModel:
    """A trained model as a batch stage's driver checks it: found, read once (a URI downloaded once), hashed
    and loaded; the workers load `file` themselves."""

    file: Path | str  # the checkpoint file: a local path or a URI
    trained: TrainedModel
    sha256: str
    train_run_id: str | None  # the MLflow run that trained it, where the checkpoint (or the caller) says


def locate_model(path: str | os.PathLike, *, use_ema: bool = True, train_run_id: str | None = None) -> LocatedModel:
    file = checkpoint_file(path)
    with _local(file) as local:
        sha256 = storage.sha256_file(local)
        trained, ckpt = _trained(file, local, use_ema, "cpu")
    return LocatedModel(file, trained, sha256, train_run_id or _run_id_of(ckpt))


def _run_id_of(ckpt: dict[str, Any]) -> str | None:
    run_id = (ckpt.get("extra") or {}).get("mlflow_run_id")
    if run_id is None:
        run_id = ((ckpt.get("config") or {}).get("tracking") or {}).get("run_id")
    return str(run_id) if run_id else None
