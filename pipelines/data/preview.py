"""Pictures of data: a grid of images (or a scatter plot of 2-D points) as a PNG, for MLflow and the console.

Used for a prepared dataset's preview, a sample stage's grid.png and the sample
grids logged during training. matplotlib's object API (no pyplot) needs no
display backend, so this works the same in a Ray worker as on a laptop.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from pipelines.data import shards as sh


def image_grid(images: np.ndarray | list[np.ndarray], cols: int | None = None) -> np.ndarray:
    """uint8 (N, H, W, C) images as one uint8 (rows·(H+1)+1, cols·(W+1)+1, C) grid, 1-pixel black lines between.

    `cols` images a row (default: a square grid).
    """
    n = len(images)
    h, w, c = images[0].shape
    cols = cols or int(math.ceil(math.sqrt(n)))
    rows = int(math.ceil(n / cols))
    grid = np.zeros((rows * (h + 1) + 1, cols * (w + 1) + 1, c), dtype=np.uint8)
    for i, im in enumerate(images):
        r, q = divmod(i, cols)
        grid[r * (h + 1) + 1 : r * (h + 1) + 1 + h, q * (w + 1) + 1 : q * (w + 1) + 1 + w] = im
    return grid


def enlarged(grid: np.ndarray, min_side: int = 512) -> np.ndarray:
    """The picture enlarged by a whole factor (nearest neighbour, so pixels stay sharp) to at least `min_side`.

    512 px: a grid of 64 MNIST digits (233 px as sampled) is too small to judge by eye at its own size.
    """
    scale = max(1, math.ceil(min_side / max(grid.shape[:2])))
    return grid.repeat(scale, axis=0).repeat(scale, axis=1)


def labelled_rows(grid: np.ndarray, labels: list[str], min_side: int = 512) -> np.ndarray:
    """The grid enlarged as `enlarged` does, with each row's label (its class) written in a band on its left."""
    big = enlarged(grid, min_side)
    rows = len(labels)
    img = Image.fromarray(big[:, :, 0] if big.shape[2] == 1 else big)
    font = ImageFont.load_default(size=max(12, min(32, img.height // rows // 2)))
    band = int(max(ImageDraw.Draw(img).textlength(t, font=font) for t in labels)) + 16
    out = Image.new(img.mode, (img.width + band, img.height), 255 if img.mode == "L" else (255, 255, 255))
    out.paste(img, (band, 0))
    draw = ImageDraw.Draw(out)
    for r, text in enumerate(labels):
        middle = (r + 0.5) * img.height / rows
        draw.text((band - 8, middle), text, fill=0 if img.mode == "L" else (0, 0, 0), font=font, anchor="rm")
    arr = np.asarray(out)
    return arr[:, :, None] if arr.ndim == 2 else arr


def save_png(grid: np.ndarray, path: str | Path, min_side: int = 512) -> None:
    """A uint8 (H, W, C) picture as PNG, enlarged (`enlarged`) to at least `min_side`."""
    big = enlarged(grid, min_side)
    Image.fromarray(big[:, :, 0] if big.shape[2] == 1 else big).save(path)


def save_preview(ds: sh.Dataset, path: Path, n: int = 64) -> None:
    """A PNG grid of the first n training images (a scatter plot for vector data)."""
    split = "train" if "train" in ds.splits else ds.splits[0]
    if ds.spec.kind == "vector" and len(ds.spec.shape) == 3:
        save_png(image_grid([array_picture(x) for _, _, x, _ in _take(ds, split, n)]), path)
        return
    if ds.spec.kind == "vector":
        # Deferred: matplotlib is ~1 s of import that a training worker (save_png only) never needs.
        from matplotlib.figure import Figure  # noqa: PLC0415

        pts = np.stack([x for _, _, x, _ in _take(ds, split, 5000)])
        fig = Figure(figsize=(4, 4), dpi=100)
        ax = fig.subplots()
        if pts.shape[1] >= 2:
            ax.scatter(pts[:, 0], pts[:, 1], s=1, alpha=0.5)
            ax.set_aspect("equal")
            what = "points" if pts.shape[1] == 2 else f"points, dimensions 0 and 1 of {pts.shape[1]}"
        else:
            ax.hist(pts[:, 0], bins=50)
            what = "values"
        ax.set_title(f"{ds.meta['source']} {ds.meta.get('toy', {}).get('name', '')} ({split}, {len(pts)} {what})")
        fig.savefig(path)
        return
    save_png(image_grid([x for _, _, x, _ in _take(ds, split, n)]), path)


def array_picture(x: np.ndarray) -> np.ndarray:
    """A float (C, H, W) array as a uint8 (H, W, 1|3) picture: its own min..max stretched to 0..255
    (3 channels as RGB, otherwise the first channel in grey). For looking at, not for measuring."""
    a = np.asarray(x, dtype=np.float64)
    a = a if a.shape[0] in (1, 3) else a[:1]
    lo, hi = float(a.min()), float(a.max())
    scaled = (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)
    return np.rint(scaled * 255).astype(np.uint8).transpose(1, 2, 0)


def _take(ds: sh.Dataset, split: str, n: int) -> list[tuple[str, int, Any, int]]:
    out = []
    for item in sh.iter_split(ds, split):
        out.append(item)
        if len(out) >= n:
            break
    return out
