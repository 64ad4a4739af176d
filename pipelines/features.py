"""Feature extractors for Fréchet distances, and `cdm train-features`.

Three extractors, each with an `id` that names exactly which network (and
weights) made the features, so cached statistics can never be mixed up:

* `inception` — Inception-v3 pool features (2048-D) through torch-fidelity's
  `FeatureExtractorInceptionV3`, the network FID is defined with. The weights
  come from a local file whose SHA-256 is checked *before* it is loaded; cdm
  never downloads anything at run time. The distance is reported as FID.
* `classifier:PATH` — the penultimate layer of a small classifier trained on
  the dataset itself by `cdm train-features` (for datasets far from ImageNet,
  e.g. MNIST). The distance is `fd_<dataset>`, never "FID".
* `raw` — the data itself (flattened pixels in [-1, 1], or the vectors): the
  exact Fréchet distance between Gaussian fits, useful for 2-D toy data.

torch-fidelity without torchvision: the package's `__init__` imports every
extractor, and its CLIP/VGG/DINOv2 extractors import torchvision (whose PyPI
wheels need a matching torch build). The Inception extractor itself needs only
torch, so when torchvision is absent its module is imported on its own, without
running the package `__init__` (`_import_inception_extractor`).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import io
import os
import re
import sys
import time
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import typer

from pipelines import shards as sh
from pipelines.errors import UserError

# The FID Inception weights (TensorFlow's 2015-12-05 Inception converted to PyTorch), as published by
# pytorch-fid and torch-fidelity. The file names carry the first 8 hex digits of the file's SHA-256
# (torch.hub's convention); that prefix is what the published name lets us check.
INCEPTION_FILENAMES = ("pt_inception-2015-12-05-6726825d.pth", "weights-inception-2015-12-05-6726825d.pth")
INCEPTION_SHA256_PREFIX = "6726825d"
INCEPTION_DIM = 2048
CLASSIFIER_FORMAT = "cdm-feature-classifier"
TORCH_FIDELITY_INSTALL = 'pip install --no-deps "torch-fidelity==0.4.0"'


def weights_dir() -> Path:
    """Where cdm looks for downloaded weights: $CDM_WEIGHTS_DIR, else ~/.cache/cdm/weights."""
    return Path(os.environ.get("CDM_WEIGHTS_DIR") or Path.home() / ".cache" / "cdm" / "weights")


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------- Inception-v3 (FID)


def inception_weights(path: Optional[str] = None, sha256: Optional[str] = None) -> tuple[Path, str]:
    """The local Inception weights file and its SHA-256, checked against `sha256` (full hex) or the published prefix.

    `sha256` defaults to $CDM_INCEPTION_SHA256 when set. Raises UserError saying
    which file is expected and where to put it.
    """
    sha256 = (sha256 or os.environ.get("CDM_INCEPTION_SHA256") or "").lower() or None
    if path is None:
        candidates = [weights_dir() / name for name in INCEPTION_FILENAMES]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise UserError(
                f"Inception-v3 FID weights not found: expected {candidates[0]} "
                f"(the file {INCEPTION_FILENAMES[0]} published with pytorch-fid, SHA-256 starting {INCEPTION_SHA256_PREFIX}; "
                f"torch-fidelity's {INCEPTION_FILENAMES[1]} is the same file). cdm never downloads at run time: fetch it on a "
                f"machine with internet access and copy it there (or set CDM_WEIGHTS_DIR, or pass --inception-weights PATH). "
                f"Without it, use --features classifier:PATH (see `cdm train-features`)."
            )
        file = found
    else:
        file = Path(path).expanduser()
        if not file.is_file():
            raise UserError(
                f"{file}: no such Inception weights file; expected {INCEPTION_FILENAMES[0]} "
                f"(SHA-256 starting {INCEPTION_SHA256_PREFIX}) at that path"
            )
    digest = sha256_file(file)
    if sha256 is not None:
        if not re.fullmatch(r"[0-9a-f]{8,64}", sha256):
            raise UserError(f"--inception-sha256 {sha256!r}: expected hex digits of a SHA-256")
        ok, expected = digest.startswith(sha256), sha256
    else:
        ok, expected = digest.startswith(INCEPTION_SHA256_PREFIX), INCEPTION_SHA256_PREFIX
    if not ok:
        raise UserError(
            f"{file}: SHA-256 {digest[:16]}… does not match the expected {expected[:16]}…; this is not the FID "
            f"Inception-v3 weights file ({INCEPTION_FILENAMES[0]}) or it is damaged. Replace it; it is not loaded."
        )
    return file, digest


def _import_inception_extractor() -> type:
    """torch-fidelity's FeatureExtractorInceptionV3, importable even when torchvision is not installed."""
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        return FeatureExtractorInceptionV3
    except ModuleNotFoundError as err:
        if err.name != "torchvision":
            if err.name and err.name.startswith("torch_fidelity"):
                raise UserError(f"--features inception needs torch-fidelity: {TORCH_FIDELITY_INSTALL}") from None
            raise
    # The package __init__ failed on torchvision (for its other extractors). Import the Inception module under a
    # bare package object instead: its own imports (base class, helpers, TF-compatible resize) need only torch.
    spec = importlib.util.find_spec("torch_fidelity")
    for name in [m for m in sys.modules if m == "torch_fidelity" or m.startswith("torch_fidelity.")]:
        del sys.modules[name]
    package = types.ModuleType("torch_fidelity")
    package.__path__ = list(spec.submodule_search_locations)
    package.__spec__ = spec
    sys.modules["torch_fidelity"] = package
    return importlib.import_module("torch_fidelity.feature_extractor_inceptionv3").FeatureExtractorInceptionV3


class InceptionFeatures:
    """Inception-v3 2048-D pool features of uint8 images (grey images are repeated to RGB), as torch-fidelity computes them."""

    def __init__(self, weights: str, sha256: str, device: str = "cpu"):
        import torch

        # Checked again here: a worker may sit on another machine than the driver that checked it.
        file, digest = inception_weights(weights, sha256)
        extractor_cls = _import_inception_extractor()
        self.net = extractor_cls("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(file)).to(device)
        self.device = device
        self.id = f"inception-v3-{digest[:16]}"
        self.dim = INCEPTION_DIM
        self._torch = torch

    def __call__(self, images: np.ndarray) -> np.ndarray:
        torch = self._torch
        x = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))).to(self.device)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        with torch.no_grad():
            return self.net(x)[0].double().cpu().numpy()


# --------------------------------------------------------------------------- a classifier trained on the dataset


def load_classifier(path: str | os.PathLike, device: str = "cpu") -> tuple[Any, dict[str, Any], str]:
    """(model in eval mode, the checkpoint's metadata, its SHA-256) from a `cdm train-features` file."""
    import torch

    from pipelines.feature_classifier import FeatureClassifier

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


class ClassifierFeatures:
    """Penultimate-layer features of a `cdm train-features` classifier, for uint8 images (N, H, W, C)."""

    def __init__(self, path: str, device: str = "cpu"):
        import torch

        self.model, self.meta, digest = load_classifier(path, device)
        self.device = device
        self.id = f"classifier-{digest[:16]}"
        self.dim = self.model.feature_dim
        self.dataset_name = self.meta["dataset_name"]
        self._torch = torch

    def __call__(self, images: np.ndarray) -> np.ndarray:
        from pipelines.readers import to_model_input

        torch = self._torch
        with torch.no_grad():
            x = torch.from_numpy(to_model_input(images)).to(self.device)
            return self.model.features(x).double().cpu().numpy()


class RawFeatures:
    """The data itself: vectors as stored, images flattened and scaled to [-1, 1]."""

    id = "raw"

    def __call__(self, data: np.ndarray) -> np.ndarray:
        if data.dtype == np.uint8:
            return data.reshape(len(data), -1).astype(np.float64) / 127.5 - 1.0
        return data.reshape(len(data), -1).astype(np.float64)


@dataclass(frozen=True)
class ExtractorSpec:
    """What a worker needs to build the extractor: plain data, checked on the driver first."""

    kind: str  # inception | classifier | raw
    path: Optional[str] = None
    sha256: Optional[str] = None
    id: str = "raw"
    metric: str = "eval/fd_raw"
    label: str = "Fréchet distance (raw data)"


def resolve_extractor(features: str, inception_weights_path: Optional[str] = None,
                      inception_sha256: Optional[str] = None) -> ExtractorSpec:
    """Parse `--features` and check its files (Inception weights hash, classifier file) before any work starts."""
    if features == "inception":
        file, digest = inception_weights(inception_weights_path, inception_sha256)
        _import_inception_extractor()  # fail here, with the install line, rather than inside a worker
        return ExtractorSpec("inception", str(file), digest, f"inception-v3-{digest[:16]}", "eval/fid", "FID")
    if features.startswith("classifier:"):
        path = features.split(":", 1)[1]
        _, meta, digest = load_classifier(path)
        name = meta["dataset_name"]
        return ExtractorSpec("classifier", path, digest, f"classifier-{digest[:16]}", f"eval/fd_{name}",
                             f"FD in the features of a {name} classifier (not FID)")
    if features == "raw":
        return ExtractorSpec("raw")
    raise UserError(f"--features {features!r}: use inception, classifier:PATH (from `cdm train-features`) or raw")


def build_extractor(spec: ExtractorSpec, device: str = "cpu") -> Any:
    if spec.kind == "inception":
        return InceptionFeatures(spec.path, spec.sha256, device)
    if spec.kind == "classifier":
        extractor = ClassifierFeatures(spec.path, device)
        if extractor.id != spec.id:
            raise UserError(f"{spec.path}: the classifier file changed while the stage ran")
        return extractor
    return RawFeatures()


# --------------------------------------------------------------------------- cdm train-features


@dataclass
class TrainFeaturesConfig:
    dataset: str
    out: Optional[str] = None  # default outputs/features/<dataset name>/classifier.pt
    epochs: int = 8
    batch_size: int = 128
    lr: float = 3e-3
    seed: int = 0
    train_split: str = "train"
    test_split: str = "test"
    width_mult: int = 16
    device: Optional[str] = None
    threads: int = 1  # CPU: the network is too small to gain from more threads, and loses under load
    # tracking
    track: bool = True
    tracking_uri: Optional[str] = None
    workdir: str = "."
    experiment: str = "cdm"
    parent_run_id: Optional[str] = None


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


def accuracy(model: Any, x: np.ndarray, labels: np.ndarray, device: str, batch: int = 512) -> float:
    import torch

    model.eval()
    correct = 0
    with torch.no_grad():
        for s in range(0, len(x), batch):
            xb = torch.from_numpy(x[s:s + batch]).to(device)
            correct += int((model(xb).argmax(1).cpu().numpy() == labels[s:s + batch]).sum())
    return correct / max(1, len(x))


def train_features(config: TrainFeaturesConfig) -> TrainFeaturesResult:
    """Train the feature classifier on the train split; report its accuracy on the test split; save it."""
    import torch
    import torch.nn.functional as F

    from pipelines.feature_classifier import FeatureClassifier
    from pipelines.readers import LocalReader

    ds = sh.open_dataset(config.dataset)
    spec = ds.spec
    if spec.kind != "image":
        raise UserError(f"{ds.loc.uri}: holds vectors; the feature classifier is for images (use --features raw for vectors)")
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
    device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")

    if device == "cpu":
        torch.set_num_threads(max(1, config.threads))
    torch.manual_seed(config.seed)
    train = LocalReader(config.dataset, config.train_split)
    test = LocalReader(config.dataset, config.test_split)
    x_test = test.inputs(np.arange(len(test)))
    h, w, c = spec.shape
    model = FeatureClassifier(c, h, w, spec.num_classes, width_mult=config.width_mult).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=config.lr)
    steps_per_epoch = -(-len(train) // config.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=config.lr, total_steps=config.epochs * steps_per_epoch)
    losses = []
    start = time.perf_counter()
    for epoch in range(config.epochs):
        model.train()
        total, seen = 0.0, 0
        for batch in train.batches(config.batch_size, shuffle=True, seed=config.seed, epoch=epoch):
            x, y = batch["x"].to(device), batch["label"].to(device)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(y)
            seen += len(y)
        losses.append(total / seen)
    seconds = time.perf_counter() - start
    test_acc = accuracy(model, x_test, test.labels, device)

    ckpt = {
        "format": CLASSIFIER_FORMAT,
        "version": 1,
        "config": model.config,
        "state_dict": {k: v.cpu() for k, v in model.state_dict().items()},
        "dataset_name": name,
        "dataset": ds.loc.uri,
        "dataset_fingerprint": ds.meta.get("fingerprint"),
        "test_accuracy": test_acc,
        "test_count": len(test),
        "epochs": config.epochs,
        "train_losses": losses,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save(ckpt, buf)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, out)
    result = TrainFeaturesResult(str(out), test_acc, seconds, name)
    if not config.track:
        return result

    import mlflow

    from pipelines.tracking import default_tracking_uri, mlflow_run

    uri = config.tracking_uri or default_tracking_uri(config.workdir)
    params = {"dataset": ds.loc.uri, "epochs": config.epochs, "batch_size": config.batch_size, "lr": config.lr,
              "seed": config.seed, "width_mult": config.width_mult, "feature_dim": model.feature_dim, "device": device}
    tags = {"cdm.stage": "train-features", "cdm.dataset": ds.loc.uri, "cdm.output": str(out)}
    with mlflow_run(config.experiment, f"train-features-{name}", uri, params, tags, config.parent_run_id) as active:
        for epoch, loss in enumerate(losses):
            mlflow.log_metric("features/train_loss", loss, step=epoch)
        mlflow.log_metrics({"features/test_accuracy": test_acc, "features/train_seconds": seconds})
        result.run_id = active.info.run_id
    return result


def train_features_command(
    dataset: str = typer.Argument(..., help="A labelled, prepared image dataset (e.g. `cdm prepare mnist5k` output)."),
    out: Optional[str] = typer.Option(None, "--out", help="Where to write classifier.pt (default outputs/features/<dataset>/)."),
    epochs: int = typer.Option(8, help="Training epochs."),
    batch_size: int = typer.Option(128, help="Batch size."),
    lr: float = typer.Option(3e-3, help="Peak learning rate (one-cycle schedule)."),
    seed: int = typer.Option(0, help="Seed for initialisation and shuffling."),
    tracking_uri: Optional[str] = typer.Option(None, help="MLflow tracking URI (default: MLFLOW_TRACKING_URI or ./mlflow.db)."),
    no_track: bool = typer.Option(False, "--no-track", help="Do not log to MLflow."),
) -> None:
    """Train a small classifier on a dataset; its penultimate features define `fd_<dataset>` for `cdm fid`.

    Example: cdm train-features data/mnist5k --out outputs/features/mnist5k
    """
    r = train_features(TrainFeaturesConfig(dataset=dataset, out=out, epochs=epochs, batch_size=batch_size, lr=lr,
                                           seed=seed, tracking_uri=tracking_uri, track=not no_track))
    typer.echo(f"test accuracy {r.test_accuracy:.4f} after {r.train_seconds:.1f} s of training → {r.path}")
    typer.echo(f"use it with: cdm fid SAMPLES REFERENCE --features classifier:{r.path}   (reported as eval/fd_{r.dataset_name})")
