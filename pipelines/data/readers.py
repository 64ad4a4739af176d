"""Readers for prepared datasets: a Ray Data reader for training/batch stages, a plain one for tests and notebooks.

Both yield the same columns:

    x      float32, images as (C, H, W) scaled to [-1, 1] (x/127.5 − 1); vectors (D,) and arrays (C, H, W)
           as stored, then normalized as dataset.json records (pipelines.data.normalization; a stage that feeds
           a trained model passes the model's normalization instead)
    label  int64, −1 for unlabeled data
    index  int64, the sample's position in its split (keys are `<split>-<index:08d>`)
    pad    bool, True for the padding rows described below

**Equal shares.** Distributed training needs every worker to see the same number
of rows per epoch, or the workers that run out first wait forever in the next
collective. Both readers therefore *pad* a split of N rows to a multiple of the
number of workers W by repeating the first (−N mod W) samples of the split (by
index, deterministically) with `pad=True`; nothing is dropped, so the union of
the shares is the whole split, and an evaluation can ignore the `pad` rows to
count every sample exactly once.

- Ray: `ray_dataset(uri, split, pad_to_multiple_of=W)` and hand it to a
  `TorchTrainer(datasets={...})`. Ray Train's default `DataConfig` splits it with
  `streaming_split(W, equal=True)`, which drops only `N mod W` rows — zero after
  padding — so each worker gets N'/W disjoint rows, whatever the shard sizes and
  even with more workers than shards. Inside the worker:
  `ray.train.get_dataset_shard("train").iter_torch_batches(batch_size=...)`.
- Plain: `LocalReader(uri, split).batches(batch_size, rank=r, world_size=W, epoch=e)`
  takes rows r, r+W, r+2W, … of the (optionally seeded-shuffled) padded order,
  like `torch.utils.data.DistributedSampler`.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import ray

from pipelines.common.errors import UserError
from pipelines.data import normalization as nz
from pipelines.data import shards as sh

COLUMNS = ("x", "label", "index", "pad")
DATASET = "dataset"  # normalization=DATASET: the one the dataset's own dataset.json records


def resolve_normalization(ds: sh.Dataset, normalization: Any) -> nz.Normalization | None:
    """The transform a reader applies: the dataset's own (DATASET), a given one (a model's), or None (as stored)."""
    if isinstance(normalization, str):
        if normalization != DATASET:
            raise ValueError(f"normalization must be {DATASET!r}, None or a Normalization, got {normalization!r}")
        return nz.of_dataset(ds.meta, ds.loc.where(sh.DATASET_JSON))
    if normalization is not None and ds.spec.kind == "image":
        raise UserError(
            f"{ds.loc.uri}: holds 8-bit images, and the model was trained on continuous data (normalization "
            f"{normalization.kind}); give it a dataset prepared like its training data (`cdm prepare arrays`)"
        )
    return normalization


def to_model_input(images: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W, C) → float32 (N, C, H, W) in [-1, 1]."""
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2), dtype=np.float32) / np.float32(127.5) - np.float32(1.0)


def from_model_input(x: Any) -> np.ndarray:
    """float (N, C, H, W) in [-1, 1] → uint8 (N, H, W, C), rounding to the nearest pixel value."""
    arr = np.asarray(x, dtype=np.float32)
    return np.clip(np.rint((arr + 1.0) * 127.5), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)


def padded_order(
    n: int, world_size: int, *, shuffle: bool = False, seed: int = 0, epoch: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """The epoch's global order of split indices padded to a multiple of world_size, and the pad mask."""
    if n < 1:
        raise UserError("the split is empty; nothing to read")
    if world_size < 1:
        raise ValueError(f"world_size must be ≥ 1, got {world_size}")
    order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
    pad = (-n) % world_size
    extra = np.arange(pad) % n  # the first samples of the split, repeated if W > N
    return np.concatenate([order, extra]), np.concatenate([np.zeros(n, bool), np.ones(pad, bool)])


def share(n: int, rank: int, world_size: int, **order_kw: Any) -> tuple[np.ndarray, np.ndarray]:
    """(indices, pad mask) of worker `rank`'s share: ceil(n / world_size) rows, disjoint across ranks."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside 0..{world_size - 1}")
    order, pad = padded_order(n, world_size, **order_kw)
    return order[rank::world_size], pad[rank::world_size]


# --------------------------------------------------------------------------- plain reader


class LocalReader:
    """Reads one split into memory (uint8) and serves batches; single process, no Ray.

    Checks the shards against dataset.json's SHA-256 first (verify=True; once per version of each shard
    file, `shards.check_shard_files`), then decodes every sample with the same checks as `cdm verify`.
    """

    def __init__(
        self,
        uri: str | os.PathLike | sh.Dataset,
        split: str,
        *,
        verify: bool = True,
        normalization: Any = DATASET,
        first: int | None = None,
    ):
        """`first`: only the split's first samples, in index order (an input example needs no more)."""
        self.dataset = sh.open_dataset(uri)
        self.split = split
        self.spec = self.dataset.spec
        self.normalization = resolve_normalization(self.dataset, normalization)
        n = self.dataset.count(split) if first is None else min(first, self.dataset.count(split))
        if verify:
            sh.require_valid_shards(self.dataset, [split])
        dtype = np.uint8 if self.spec.kind == "image" else np.float32
        self.data = np.empty((n, *self.spec.shape), dtype=dtype)
        self.labels = np.empty(n, dtype=np.int64)
        self.keys: list[str] = []
        seen = 0
        for key, index, data, label in sh.iter_split(self.dataset, split):
            if seen == n:  # shards hold consecutive indices, in order
                break
            self.data[index] = data
            self.labels[index] = label
            self.keys.append(key)
            seen += 1
        if seen != n:
            raise UserError(f"{self.dataset.loc.uri}: split {split} has {seen} samples, dataset.json says {n}")

    def __len__(self) -> int:
        return len(self.labels)

    def inputs(self, indices: np.ndarray) -> np.ndarray:
        """Model inputs for these indices: float32 (B, C, H, W) in [-1, 1] (vectors and arrays normalized)."""
        if self.spec.kind == "image":
            return to_model_input(self.data[indices])
        x = self.data[indices].astype(np.float32)
        return self.normalization.apply(x) if self.normalization is not None else x

    def batches(
        self,
        batch_size: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        epoch: int = 0,
        shuffle: bool = False,
        seed: int = 0,
        flip: bool = False,
        drop_last: bool = False,
        as_torch: bool = True,
    ) -> Iterator[dict[str, Any]]:
        """This rank's share of one epoch as dicts of `x`, `label`, `index`, `pad` (torch tensors by default).

        Flips are drawn per sample from (seed, epoch), so they are the same whichever
        worker reads a sample and change from epoch to epoch.
        """
        if batch_size < 1:
            raise ValueError("batch_size must be ≥ 1")
        idx, pad = share(len(self), rank, world_size, shuffle=shuffle, seed=seed, epoch=epoch)
        flips = np.random.default_rng([seed, epoch, 1]).random(len(self)) < 0.5 if flip else None
        stop = len(idx) - len(idx) % batch_size if drop_last else len(idx)
        for start in range(0, stop, batch_size):
            b_idx, b_pad = idx[start : start + batch_size], pad[start : start + batch_size]
            x = self.inputs(b_idx)
            if flips is not None and self.spec.kind == "image":
                f = flips[b_idx]
                x[f] = x[f][..., ::-1]
            batch = {"x": x, "label": self.labels[b_idx], "index": b_idx.astype(np.int64), "pad": b_pad}
            if as_torch:
                # Deferred: Ray Data's read tasks load this module for _decode_batch and need no torch (~1 s).
                import torch  # noqa: PLC0415

                batch = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in batch.items()}
            yield batch


def stream_batches(
    uri: str | os.PathLike | sh.Dataset,
    split: str,
    batch_size: int,
    *,
    shuffle: bool = False,
    seed: int = 0,
    epoch: int = 0,
    buffer: int = 8192,
    verify: bool = True,
) -> Iterator[dict[str, Any]]:
    """One pass over a split in torch batches of `x`, `label`, `index`, read shard by shard: memory holds one
    shard's samples and a shuffle buffer, whatever the split's size (LocalReader holds the whole split).

    shuffle: the shard order and a buffer of `buffer` samples (WebDataset's shuffle), drawn from (seed, epoch).
    """
    import torch  # noqa: PLC0415 (deferred for Ray Data's read tasks, as in LocalReader.batches)

    if batch_size < 1:
        raise ValueError("batch_size must be ≥ 1")
    ds = sh.open_dataset(uri)
    norm = resolve_normalization(ds, DATASET)
    if verify:
        sh.require_valid_shards(ds, [split])
    rng = np.random.default_rng([seed, epoch, 2])
    shards = ds.shards(split)
    order = rng.permutation(len(shards)) if shuffle else range(len(shards))
    samples = ((index, data, label) for i in order for _, index, data, label in sh.iter_shard(ds, split, shards[i]))

    def collate(rows: list[tuple[int, np.ndarray, int]]) -> dict[str, Any]:
        data = np.stack([r[1] for r in rows])
        if ds.spec.kind == "image":
            x = to_model_input(data)
        else:
            x = norm.apply(data.astype(np.float32)) if norm is not None else data.astype(np.float32)
        return {
            "x": torch.from_numpy(np.ascontiguousarray(x)),
            "label": torch.tensor([r[2] for r in rows], dtype=torch.int64),
            "index": torch.tensor([r[0] for r in rows], dtype=torch.int64),
        }

    batch: list[tuple[int, np.ndarray, int]] = []
    for row in _buffer_shuffled(samples, buffer, rng) if shuffle else samples:
        batch.append(row)
        if len(batch) == batch_size:
            yield collate(batch)
            batch = []
    if batch:
        yield collate(batch)


def _buffer_shuffled(items: Iterator[Any], size: int, rng: np.random.Generator) -> Iterator[Any]:
    """Items in random order, drawn from a buffer of `size` that the stream keeps full."""
    pool: list[Any] = []
    for item in items:
        if len(pool) < size:
            pool.append(item)
            continue
        i = int(rng.integers(size))
        yield pool[i]
        pool[i] = item
    rng.shuffle(pool)
    yield from pool


def load_split(uri: str | os.PathLike, split: str, *, verify: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(data, labels) of a whole split in index order: uint8 (N, H, W, C) images or float32 (N, D) vectors."""
    reader = LocalReader(uri, split, verify=verify)
    return reader.data, reader.labels


# --------------------------------------------------------------------------- Ray Data reader


def _decode_batch(
    batch: dict[str, np.ndarray],
    *,
    spec: sh.SampleSpec,
    flip: bool,
    pad: bool,
    keep_below: int | None,
    normalization: nz.Normalization | None = None,
) -> dict[str, np.ndarray]:
    """Raw WebDataset rows (key, url, png/npy bytes, cls bytes) → the reader's columns."""
    keys = [str(k) for k in batch["__key__"]]
    urls = [str(u) for u in batch.get("__url__", ["?"] * len(keys))]
    index = np.array([sh.index_from_key(k) for k in keys], dtype=np.int64)
    rows = np.arange(len(keys)) if keep_below is None else np.flatnonzero(index < keep_below)
    enc = spec.encoding
    payload = batch.get(enc)
    labels_raw = batch.get("cls")
    xs, labels = [], []
    for r in rows:
        where = f"{urls[r]}: sample {keys[r]}"
        members: dict[str, bytes] = {}
        if payload is not None and isinstance(payload[r], (bytes, bytearray)):
            members[enc] = bytes(payload[r])
        if labels_raw is not None and isinstance(labels_raw[r], (bytes, bytearray)):
            members["cls"] = bytes(labels_raw[r])
        data, label = sh.decode_sample(members, spec, where)
        xs.append(data)
        labels.append(label)
    if spec.kind == "image":
        x = to_model_input(np.stack(xs)) if xs else np.zeros((0, spec.shape[2], *spec.shape[:2]), np.float32)
        if flip and len(x):
            f = np.random.default_rng().random(len(x)) < 0.5  # fresh entropy: different flips each epoch
            x[f] = x[f][..., ::-1]
    else:
        x = np.stack(xs).astype(np.float32) if xs else np.zeros((0, *spec.shape), np.float32)
        if normalization is not None:
            x = normalization.apply(x)
    return {
        "x": x,
        "label": np.asarray(labels, dtype=np.int64),
        "index": index[rows],
        "pad": np.full(len(rows), pad, dtype=bool),
    }


def ray_dataset(
    uri: str | os.PathLike,
    split: str,
    *,
    flip: bool = False,
    pad_to_multiple_of: int = 1,
    verify: bool = True,
    shuffle: str | None = None,
    normalization: Any = DATASET,
) -> Any:
    """A `ray.data.Dataset` of one split with columns x, label, index, pad (see module docstring).

    normalization: of continuous data, the dataset's own (DATASET, the default), a model's
    (`pipelines.data.normalization.of_model`), or None (the values as stored).

    Pass `pad_to_multiple_of=num_workers` when Ray Train splits it across workers.
    verify=True checks every shard's size and SHA-256 against dataset.json first (the SHA-256 once per
    version of each shard file), so a corrupt or swapped shard is a clear error here rather than inside a Ray task.
    shuffle: None keeps index order; "files" shuffles the shard order; "rows" is a
    full `random_shuffle` (an all-to-all, new order every epoch). A cheaper middle
    ground is `iter_torch_batches(local_shuffle_buffer_size=...)` in the worker.
    """
    if pad_to_multiple_of < 1:
        raise ValueError("pad_to_multiple_of must be ≥ 1")
    if shuffle not in (None, "files", "rows"):
        raise ValueError(f"shuffle must be None, 'files' or 'rows', got {shuffle!r}")
    ds_meta = sh.open_dataset(uri)
    spec = ds_meta.spec
    shard_list = ds_meta.shards(split)
    n = ds_meta.count(split)
    if n < 1:
        raise UserError(f"{ds_meta.loc.uri}: split {split} is empty")
    if verify:
        sh.require_valid_shards(ds_meta, [split])
    loc = ds_meta.loc
    norm = resolve_normalization(ds_meta, normalization)

    def read(shards: list[dict[str, Any]], *, pad: bool, keep_below: int | None, shuffle: bool) -> Any:
        paths = [loc.path(s["name"]) for s in shards]
        raw = ray.data.read_webdataset(
            paths,
            filesystem=loc.fs,
            decoder=None,
            suffixes=[spec.encoding, "cls"],
            shuffle="files" if shuffle else None,
            override_num_blocks=len(paths),
        )
        fn = functools.partial(_decode_batch, spec=spec, flip=flip, pad=pad, keep_below=keep_below, normalization=norm)
        return raw.map_batches(fn, batch_format="numpy")

    ds = read(shard_list, pad=False, keep_below=None, shuffle=shuffle == "files")
    remaining = (-n) % pad_to_multiple_of
    while remaining > 0:  # more than one round only when there are more workers than samples
        take = min(n, remaining)
        needed = [s for s in shard_list if int(s["first_index"]) < take]
        ds = ds.union(read(needed, pad=True, keep_below=take, shuffle=False))
        remaining -= take
    return ds.random_shuffle() if shuffle == "rows" else ds
