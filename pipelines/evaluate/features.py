"""Feature extractors for Fréchet distances.

Three extractors, each with an `id` that names exactly which network (and
weights) made the features, so cached statistics can never be mixed up:

* `inception` — Inception-v3 pool features (2048-D) through torch-fidelity's
  `FeatureExtractorInceptionV3`, the network FID is defined with. The weights
  come from a local file whose SHA-256 is checked *before* it is loaded; cdm
  never downloads anything at run time. The distance is reported as FID.
* `classifier:PATH` — the penultimate layer of a small classifier trained on
  the dataset itself by `cdm train-features` (pipelines.evaluate.feature_classifier; for datasets far from ImageNet,
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

import dataclasses
import hashlib
import importlib
import importlib.util
import os
import re
import sys
import tempfile
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from pipelines.common.errors import UserError
from pipelines.common.storage import sha256_file
from pipelines.data.readers import to_model_input
from pipelines.evaluate.feature_classifier import load_classifier

# The FID Inception weights (TensorFlow's 2015-12-05 Inception converted to PyTorch), as published by
# pytorch-fid and torch-fidelity. The file names carry the first 8 hex digits of the file's SHA-256
# (torch.hub's convention); that prefix is what the published name lets us check.
INCEPTION_FILENAMES = ("pt_inception-2015-12-05-6726825d.pth", "weights-inception-2015-12-05-6726825d.pth")
INCEPTION_SHA256_PREFIX = "6726825d"
INCEPTION_DIM = 2048
TORCH_FIDELITY_INSTALL = 'pip install --no-deps "torch-fidelity==0.4.0"'


def weights_dir() -> Path:
    """Where cdm looks for downloaded weights: $CDM_WEIGHTS_DIR, else ~/.cache/cdm/weights."""
    return Path(os.environ.get("CDM_WEIGHTS_DIR") or Path.home() / ".cache" / "cdm" / "weights")


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
    """torch-fidelity's FeatureExtractorInceptionV3, importable even when torchvision is not installed.

    Imported here, not at the top: torch-fidelity is optional (`--features inception` only), and how it is
    imported depends on whether torchvision is there.
    """
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3  # noqa: PLC0415

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
        # Checked again here: a worker may sit on another machine than the driver that checked it.
        file, digest = inception_weights(weights, sha256)
        extractor_cls = _import_inception_extractor()
        self.net = extractor_cls("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(file)).to(device)
        self.device = device
        self.id = f"inception-v3-{digest[:16]}"
        self.dim = INCEPTION_DIM

    def __call__(self, images: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))).to(self.device)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        with torch.no_grad():
            return self.net(x)[0].double().cpu().numpy()


# --------------------------------------------------------------------------- a classifier trained on the dataset


class ClassifierFeatures:
    """Penultimate-layer features of a `cdm train-features` classifier, for uint8 images (N, H, W, C)."""

    def __init__(self, path: str, device: str = "cpu"):
        self.model, self.meta, digest = load_classifier(path, device)
        self.device = device
        self.id = f"classifier-{digest[:16]}"
        self.dim = self.model.feature_dim
        self.dataset_name = self.meta["dataset_name"]

    def __call__(self, images: np.ndarray) -> np.ndarray:
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


def resolve_extractor(
    features: str, inception_weights_path: Optional[str] = None, inception_sha256: Optional[str] = None
) -> ExtractorSpec:
    """Parse `--features` and check its files (Inception weights hash, classifier file) before any work starts."""
    if features == "inception":
        file, digest = inception_weights(inception_weights_path, inception_sha256)
        _import_inception_extractor()  # fail here, with the install line, rather than inside a worker
        return ExtractorSpec("inception", str(file), digest, f"inception-v3-{digest[:16]}", "eval/fid", "FID")
    if features.startswith("classifier:"):
        path = features.split(":", 1)[1]
        _, meta, digest = load_classifier(path)
        name = meta["dataset_name"]
        return ExtractorSpec(
            "classifier",
            path,
            digest,
            f"classifier-{digest[:16]}",
            f"eval/fd_{name}",
            f"FD in the features of a {name} classifier (not FID)",
        )
    if features == "raw":
        return ExtractorSpec("raw")
    raise UserError(f"--features {features!r}: use inception, classifier:PATH (from `cdm train-features`) or raw")


def extractor_file(spec: ExtractorSpec) -> bytes | None:
    """The bytes of the extractor's weights file (None for raw features), read once on the driver.

    A worker on another node need not see the driver's file (`~/.cache/cdm/weights`, a
    local `--inception-weights`), so the file travels with the job, through Ray's object store.
    """
    return None if spec.kind == "raw" else Path(spec.path).read_bytes()


def _local_copy(spec: ExtractorSpec, data: bytes) -> str:
    """`data` as a file in this machine's temp folder, after checking it is the file the driver checked."""
    digest = hashlib.sha256(data).hexdigest()
    if digest != spec.sha256:
        raise UserError(
            f"{spec.path}: the weights that reached this worker have SHA-256 {digest[:16]}…, "
            f"not the driver's {spec.sha256[:16]}…; run the stage again"
        )
    path = Path(tempfile.gettempdir()) / f"cdm-{spec.kind}-{digest[:16]}{Path(spec.path).suffix}"
    if not path.is_file() or path.stat().st_size != len(data):
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_bytes(data)
        os.replace(tmp, path)
    return str(path)


def build_extractor(spec: ExtractorSpec, device: str = "cpu", file_data: bytes | None = None) -> Any:
    """The extractor `spec` names; `file_data` (from `extractor_file`) stands in for a weights file not on this node."""
    if file_data is not None and spec.kind != "raw":
        spec = dataclasses.replace(spec, path=_local_copy(spec, file_data))
    if spec.kind == "inception":
        return InceptionFeatures(spec.path, spec.sha256, device)
    if spec.kind == "classifier":
        extractor = ClassifierFeatures(spec.path, device)
        if extractor.id != spec.id:
            raise UserError(f"{spec.path}: the classifier file changed while the stage ran")
        return extractor
    return RawFeatures()
