"""The prepare stage's config: which source, its options, where the shards go, MLflow.

Light on purpose (no numpy, no pyarrow): the CLI reads the help texts and
defaults from these fields before any stage module is imported.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from pipelines.common.config import TrackingSection, option

SOURCES = ("mnist5k", "digits", "cifar10", "imagefolder", "toy2d", "arrays")
TOY_NAMES = ("gmm", "gmm8", "gmm25", "checkerboard", "two_moons")


@dataclass
class SourceOptions:
    """Everything that determines a source's content (and so its fingerprint)."""

    path: Optional[str] = option(
        None, doc="Input for cifar10 (tar.gz or folder), imagefolder (folder) and arrays (.npy or .npz file)."
    )
    name: Optional[str] = option(None, doc=f"toy2d distribution: {', '.join(TOY_NAMES)}.")
    test_fraction: Optional[float] = option(
        None, doc="Held-out fraction, stratified by class (mnist5k/digits default 0.1, imagefolder 0)."
    )
    seed: int = option(0, doc="Seed for the split and the sample order.")
    size: Optional[int] = option(None, doc="Resize to SIZE×SIZE (shorter side, then center crop).")
    crop: Optional[int] = option(None, doc="imagefolder: center-crop CROP×CROP before resizing.")
    channels: Optional[int] = option(None, doc="imagefolder: 1 (grayscale) or 3 (RGB, default).")
    preset: Optional[str] = option(None, doc="imagefolder: 'celeba' (128×128 crop at (89, 121) → 64×64).")
    labels: str = option(
        "auto",
        doc="imagefolder: auto | folder (class subfolders) | none. arrays: a .npy file of N integer labels, "
        "or the name of an array in the --path .npz (auto/none: unlabeled).",
    )
    key: Optional[str] = option(None, doc="arrays: which array of the --path .npz holds the data.")
    normalize: Optional[str] = option(
        None,
        doc="arrays: standardize (default; per-channel mean/std of the train split, recorded in dataset.json and "
        "undone in likelihoods and samples) | none (the model sees the data as given).",
    )
    num_train: Optional[int] = option(None, doc="toy2d: training points (default 10000).")
    num_test: Optional[int] = option(None, doc="toy2d: test points (default 2000).")


@dataclass(kw_only=True)
class PrepareConfig(SourceOptions):
    """A source and its options (a `SourceOptions`), where the shards go, and MLflow."""

    source: str = option(doc=f"One of: {', '.join(SOURCES)}.")
    out: str = option(doc="Output directory or URI (file://, s3://, gs://, …).")
    samples_per_shard: int = option(1000, doc="Samples per tar shard.")
    skip_bad: bool = option(False, doc="Skip unreadable/mismatched inputs with a warning (counted in dataset.json).")
    force: bool = option(False, doc="Rewrite even if an intact identical dataset is already there.")
    track: bool = option(True, doc="Log an MLflow run.")
    tracking: TrackingSection = field(default_factory=TrackingSection)
