"""The evaluation stages' figures, and where they are written: beside a stage's outputs, on disk or at a URI."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from cdm_core.objective import LOG2_BIN_OFFSET
from pipelines.common import storage
from pipelines.common.stage import Record


def save_beside(out: str, name: str, draw: Callable[[Path], None], record: Record) -> str:
    """Figure `name`, drawn by `draw(path)`, in the output folder `out` and as an artifact of the stage's run;
    the local file, or its URI for an output in an object store (drawn in a scratch folder, then copied)."""
    loc = storage.resolve(out)
    if loc.is_local():
        path = Path(loc.root) / name
        draw(path)
        record.artifact(path)
        return str(path)
    with tempfile.TemporaryDirectory() as tmp:
        draw(Path(tmp) / name)
        loc.write_bytes(name, (Path(tmp) / name).read_bytes())
        record.artifact(Path(tmp) / name)
    return loc.where(name)


def save_method_scatter(scores: Any, path: Path) -> None:  # an nll.SplitScores
    """Per sample: the one-pass bits/dim on x, the ELBO's and the ODE's on y, and the diagonal."""
    one = scores.column("bpd")
    fig = Figure(figsize=(5.5, 5.0))
    ax = fig.subplots()
    ys = []
    if "elbo" in scores.methods.names:
        # The ELBO's discrete bits/dim compare with the standard convention: moved to this one's footing.
        ys.append(("ELBO", scores.column("bpd_elbo") + scores.offset - LOG2_BIN_OFFSET, "tab:orange"))
    if "ode" in scores.methods.names:
        ys.append(("ODE", scores.column("bpd_ode"), "tab:blue"))
    for name, y, color in ys:
        ax.scatter(one, y, s=8, alpha=0.6, color=color, label=f"{name} (mean {y.mean():.3f})")
    values = np.concatenate([one, *(y for _, y, _ in ys)])
    lo, hi = float(values.min()), float(values.max())
    pad = 0.02 * (hi - lo or 1.0)
    ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], color="black", lw=1, label="y = x")
    ax.set_xlabel(f"one-pass bits/dim (mean {one.mean():.3f})")
    ax.set_ylabel("bits/dim")
    deq = "dequantized" if scores.dequantized else "not dequantized"
    ax.set_title(f"{scores.count} samples of {scores.split}; convention {scores.convention}, {deq}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def save_histogram(
    in_bpd: np.ndarray, out_bpd: np.ndarray, names: tuple[str, str], auc: float, unit: str, path: Path
) -> None:
    both = np.concatenate([in_bpd, out_bpd])
    finite = both[np.isfinite(both)]
    lo, hi = np.percentile(finite, [0.5, 99.5]) if len(finite) else (0.0, 1.0)
    bins = np.linspace(lo, hi if hi > lo else lo + 1, 60)
    fig = Figure(figsize=(6, 4), dpi=100)
    ax = fig.subplots()
    ax.hist(np.clip(in_bpd, lo, hi), bins=bins, alpha=0.6, density=True, label=f"in: {names[0]} ({len(in_bpd)})")
    ax.hist(np.clip(out_bpd, lo, hi), bins=bins, alpha=0.6, density=True, label=f"out: {names[1]} ({len(out_bpd)})")
    ax.set_xlabel(f"NLL ({unit})")
    ax.set_ylabel("density")
    ax.set_title(f"Likelihood OOD detection, AUROC {auc:.3f}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


def save_confusion(confusion: np.ndarray, accuracy: float, title: str, path: Path) -> None:
    k = confusion.shape[0]
    fig = Figure(figsize=(1.6 + 0.45 * k, 1.2 + 0.45 * k), dpi=100)
    ax = fig.subplots()
    rates = confusion / np.maximum(confusion.sum(1, keepdims=True), 1)
    ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    if k <= 20:
        for i in range(k):
            for j in range(k):
                color = "white" if rates[i, j] > 0.5 else "black"
                ax.text(j, i, str(confusion[i, j]), ha="center", va="center", fontsize=7, color=color)
    ax.set_xticks(range(k))
    ax.set_yticks(range(k))
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(f"{title}\naccuracy {accuracy:.4f}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
