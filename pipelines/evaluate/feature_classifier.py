"""`cdm train-features`: the small CNN whose penultimate layer is the space `fd_<dataset>` is measured in.

`train_features(TrainFeaturesConfig(...))` (also `run`) trains it on a labelled
dataset's train split, reports its test accuracy, and writes `classifier.pt`;
`load_classifier` reads it back for `cdm fid --features classifier:PATH`.
"""

from __future__ import annotations

import io
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from pipelines.common import storage
from pipelines.common.errors import UserError
from pipelines.common.stage import tracked
from pipelines.common.storage import sha256_file
from pipelines.data import shards as sh
from pipelines.data.readers import stream_batches
from pipelines.evaluate.config import TrainFeaturesConfig

CLASSIFIER_FORMAT = "cdm-feature-classifier"


class FeatureClassifier(nn.Module):
    """Two conv stages (conv→ReLU→2×2 max-pool), a hidden layer of `feature_dim` units, a linear head (LeNet-like).

    Small on purpose: a few epochs on MNIST-sized digits reach ~97% test
    accuracy within a minute on two CPU cores, and the features only need to
    tell the dataset's classes apart well.
    """

    def __init__(
        self, in_channels: int, height: int, width: int, num_classes: int, width_mult: int = 16, feature_dim: int = 128
    ):
        super().__init__()
        self.config = {
            "in_channels": in_channels,
            "height": height,
            "width": width,
            "num_classes": num_classes,
            "width_mult": width_mult,
            "feature_dim": feature_dim,
        }
        c1, c2 = width_mult, 2 * width_mult
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, c1, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
        )
        flat = c2 * (height // 4) * (width // 4)
        if flat == 0:
            raise UserError(f"images of {height}×{width} are too small for the feature classifier (need ≥ 4×4)")
        self.hidden = nn.Sequential(nn.Linear(flat, feature_dim), nn.ReLU())
        self.head = nn.Sequential(nn.Dropout(0.3), nn.Linear(feature_dim, num_classes))
        self.feature_dim = feature_dim

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.hidden(self.body(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def load_classifier(path: str | os.PathLike, device: str = "cpu") -> tuple[Any, dict[str, Any], str]:
    """(model in eval mode, the checkpoint's metadata, its SHA-256) from a `cdm train-features` file."""
    file = Path(path)
    if file.is_dir():
        file = file / "classifier.pt"
    if not file.is_file():
        raise UserError(f"{path}: no feature classifier there; make one with `cdm train-features DATASET --out {path}`")
    digest = sha256_file(file)
    try:
        ckpt = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:
        raise UserError(f"{file}: not a cdm feature classifier ({type(err).__name__})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CLASSIFIER_FORMAT:
        raise UserError(f"{file}: not a cdm feature classifier (written by `cdm train-features`)")
    model = FeatureClassifier(**ckpt["config"])
    model.load_state_dict(ckpt["state_dict"])
    meta = {k: v for k, v in ckpt.items() if k not in ("state_dict",)}
    return model.to(device).eval(), meta, digest


# --------------------------------------------------------------------------- the stage


@dataclass
class TrainFeaturesResult:
    path: str
    test_accuracy: float
    train_seconds: float
    dataset_name: str
    run_id: Optional[str] = None


def dataset_name(ds: sh.Dataset) -> str:
    """A metric-safe name for a dataset: its source (mnist5k, digits, cifar10), or the folder name for imagefolder."""
    source = str(ds.meta.get("source", "dataset"))
    name = source if source not in ("imagefolder", "samples") else ds.loc.root.rstrip("/").rsplit("/", 1)[-1]
    return re.sub(r"[^a-z0-9_]+", "_", name.lower()).strip("_") or "dataset"


def accuracy(model: Any, batches: Iterator[dict[str, Any]], device: str) -> tuple[float, int]:
    """(fraction correct, count) over `batches`."""
    model.eval()
    correct, count = 0, 0
    with torch.no_grad():
        for batch in batches:
            predicted = model(batch["x"].to(device)).argmax(1).cpu()
            correct += int((predicted == batch["label"]).sum())
            count += len(batch["label"])
    return correct / max(1, count), count


def train_features(config: TrainFeaturesConfig) -> TrainFeaturesResult:
    """Train the feature classifier on the train split; report its accuracy on the test split; save it."""
    ds = sh.open_dataset(config.dataset)
    spec = ds.spec
    if spec.kind != "image":
        raise UserError(
            f"{ds.loc.uri}: holds vectors; the feature classifier is for images (use --features raw for vectors)"
        )
    if not spec.labeled or not spec.num_classes:
        raise UserError(f"{ds.loc.uri}: has no labels; a feature classifier needs a labelled dataset")
    for split in (config.train_split, config.test_split):
        ds.split(split)  # a clear error for a missing split
    if config.epochs < 1 or config.batch_size < 1:
        raise UserError("--epochs and --batch-size must be ≥ 1")
    name = dataset_name(ds)
    out = Path(config.out) if config.out else Path("outputs") / "features" / name / "classifier.pt"
    if out.suffix != ".pt":
        out = out / "classifier.pt"
    storage.check_writable(str(out.parent))
    device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")

    if device == "cpu":
        torch.set_num_threads(max(1, config.threads))
    torch.manual_seed(config.seed)
    sh.require_valid_shards(ds, [config.train_split, config.test_split])
    h, w, c = spec.shape
    model = FeatureClassifier(c, h, w, spec.num_classes, width_mult=config.width_mult).to(device)
    params = {
        "dataset": ds.loc.uri,
        "epochs": config.epochs,
        "batch_size": config.batch_size,
        "lr": config.lr,
        "seed": config.seed,
        "width_mult": config.width_mult,
        "feature_dim": model.feature_dim,
        "device": device,
    }
    tags = {"cdm.stage": "train-features", "cdm.dataset": ds.loc.uri, "cdm.output": str(out)}
    with tracked(config, f"train-features-{name}", params, tags) as record:
        opt = torch.optim.Adam(model.parameters(), lr=config.lr)
        steps_per_epoch = -(-ds.count(config.train_split) // config.batch_size)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=config.lr, total_steps=config.epochs * steps_per_epoch)
        losses = []
        start = time.perf_counter()
        for epoch in range(config.epochs):
            model.train()
            total, seen = 0.0, 0
            # Streamed shard by shard: the split is never held in memory (ImageNet-64's would be 15.7 GB).
            batches = stream_batches(
                ds, config.train_split, config.batch_size, shuffle=True, seed=config.seed, epoch=epoch, verify=False
            )
            for batch in batches:
                x, y = batch["x"].to(device), batch["label"].to(device)
                loss = F.cross_entropy(model(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                total += float(loss.detach()) * len(y)
                seen += len(y)
            losses.append(total / seen)
            record.metrics({"features/train_loss": losses[-1]}, step=epoch)
        seconds = time.perf_counter() - start
        test_acc, test_count = accuracy(model, stream_batches(ds, config.test_split, 512, verify=False), device)
        _save(model, out, name, ds, test_acc, test_count, config.epochs, losses)
        record.metrics({"features/test_accuracy": test_acc, "features/train_seconds": seconds})
    return TrainFeaturesResult(str(out), test_acc, seconds, name, record.run_id)


def _save(model, out: Path, name: str, ds: sh.Dataset, test_acc: float, test_count: int, epochs: int, losses) -> None:
    """The classifier's checkpoint at `out`, written whole or not at all."""
    ckpt = {
        "format": CLASSIFIER_FORMAT,
        "version": 1,
        "config": model.config,
        "state_dict": {k: v.cpu() for k, v in model.state_dict().items()},
        "dataset_name": name,
        "dataset": ds.loc.uri,
        "dataset_fingerprint": ds.meta.get("fingerprint"),
        "test_accuracy": test_acc,
        "test_count": test_count,
        "epochs": epochs,
        "train_losses": losses,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save(ckpt, buf)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, out)


run = train_features
