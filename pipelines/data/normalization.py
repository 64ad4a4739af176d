"""The normalization of continuous (float) data: recorded in dataset.json, applied by the readers, undone downstream.

Shards hold continuous data as given. `cdm prepare arrays --normalize standardize` (its default) records
per-channel statistics of the training split in dataset.json; the readers then feed the model

    z = (x − μ_c) / σ_c           (c: the channel of each value; for (D,) vectors every dimension is a channel)

so the schedule's unit-variance assumption holds. The density of the data as given follows by the change of
variables, per sample of d values:

    log p_x(x) = log p_z(z) − Σ_{i=1..d} log σ_{c(i)}          (the Jacobian term, `log_det`)

`cdm nll` reports that (nats per sample, and bits/dim in the `continuous` convention, no bin offset);
`cdm sample` returns x = μ_c + σ_c·z. `--normalize none` records {"kind": "identity"}: z = x, log_det = 0
(toy2d vectors, which record nothing, read as identity too). The kind is never the word "none", which
the config machinery reads as an unset value.

The normalization belongs to the model as much as to the data: `cdm train` copies it into the config
(`data.normalization`, so every checkpoint carries it), and the evaluation stages transform any dataset
with the checkpoint's, never with another dataset's own. 8-bit images have none (they are mapped to
[-1, 1] and reported in the image conventions); a checkpoint without one is an image model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipelines.common.errors import UserError

KINDS = ("standardize", "identity")


@dataclass(frozen=True)
class Normalization:
    kind: str  # "standardize" | "identity"
    mean: tuple[float, ...] = ()  # per channel (axis 0 of a (C, H, W) sample; every dimension of a (D,) one)
    std: tuple[float, ...] = ()

    def to_json(self) -> dict[str, Any]:
        if self.kind == "identity":
            return {"kind": "identity"}
        return {
            "kind": self.kind,
            "axis": "channel (axis 0 of each sample; each dimension of a vector)",
            "statistics_of": "train split",
            "mean": list(self.mean),
            "std": list(self.std),
        }

    @classmethod
    def from_json(cls, meta: Any, where: str = "dataset.json") -> Normalization | None:
        """None for data without one (8-bit images, checkpoints of image models)."""
        if meta is None:
            return None
        if not isinstance(meta, dict) or meta.get("kind") not in KINDS:
            raise UserError(f"{where}: 'normalization' is {meta!r}, not one of kinds {KINDS}; re-run `cdm prepare`")
        if meta["kind"] == "identity":
            return cls("identity")
        try:
            mean = tuple(float(v) for v in meta["mean"])
            std = tuple(float(v) for v in meta["std"])
        except (KeyError, TypeError, ValueError):
            raise UserError(f"{where}: 'normalization' lacks numeric mean/std lists; re-run `cdm prepare`") from None
        if len(mean) != len(std) or not mean or not all(s > 0 and math.isfinite(s) for s in std):
            raise UserError(f"{where}: 'normalization' has unusable mean/std; re-run `cdm prepare`")
        return cls("standardize", mean, std)

    def _stats(self, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
        """mean and std broadcastable to a batch (B, *shape), float64."""
        channels = shape[0]
        if len(self.mean) != channels:
            raise UserError(
                f"the normalization has {len(self.mean)} channel(s), the data {channels} (shape {list(shape)}); "
                "score or sample data of the shape the model was trained on"
            )
        view = (1, channels) + (1,) * (len(shape) - 1)
        return np.asarray(self.mean).reshape(view), np.asarray(self.std).reshape(view)

    def apply(self, x: np.ndarray) -> np.ndarray:
        """Data as given (B, *shape) → model space z, float32."""
        if self.kind == "identity" or not len(x):
            return np.asarray(x, dtype=np.float32)
        mean, std = self._stats(tuple(x.shape[1:]))
        return ((np.asarray(x, dtype=np.float64) - mean) / std).astype(np.float32)

    def undo(self, z: np.ndarray) -> np.ndarray:
        """Model space (B, *shape) → data units, float32."""
        if self.kind == "identity" or not len(z):
            return np.asarray(z, dtype=np.float32)
        mean, std = self._stats(tuple(z.shape[1:]))
        return (np.asarray(z, dtype=np.float64) * std + mean).astype(np.float32)

    def log_det(self, shape: tuple[int, ...]) -> float:
        """Σ over a sample's values of log σ_c, in nats: log p_x(x) = log p_z(z) − log_det."""
        if self.kind == "identity":
            return 0.0
        _, std = self._stats(tuple(shape))
        per_value = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        return float(per_value * np.log(std).sum())


def of_dataset(meta: dict[str, Any], where: str = "dataset.json") -> Normalization | None:
    """The normalization a prepared dataset records (None: 8-bit images, or continuous data prepared as given)."""
    norm = Normalization.from_json(meta.get("normalization"), where)
    if norm is None and meta.get("sample", {}).get("kind") == "vector":
        return Normalization("identity")
    return norm


def of_model(config: dict[str, Any]) -> Normalization | None:
    """The normalization a checkpoint's training config records (`data.normalization`); None: an image model."""
    return Normalization.from_json((config.get("data") or {}).get("normalization"), "checkpoint config")
