"""The plain single-process reader and the share arithmetic both readers rely on."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import prepare_quick

from pipelines.data.readers import LocalReader, from_model_input, padded_order, share, stream_batches, to_model_input


@pytest.mark.parametrize("n", [1, 2, 5, 7, 17, 100])
@pytest.mark.parametrize("world", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("shuffle", [False, True])
def test_shares_are_disjoint_equal_and_cover_the_split(n, world, shuffle):
    shares = [share(n, r, world, shuffle=shuffle, seed=1, epoch=2) for r in range(world)]
    lengths = {len(idx) for idx, _ in shares}
    assert lengths == {-(-n // world)}  # equal: ceil(n / world) each
    real = np.concatenate([idx[~pad] for idx, pad in shares])
    assert sorted(real.tolist()) == list(range(n))  # disjoint and the whole split
    pads = np.concatenate([idx[pad] for idx, pad in shares])
    assert len(pads) == (-n) % world
    # Padding repeats the first samples of the split, deterministically.
    assert sorted(pads.tolist()) == sorted((np.arange((-n) % world) % n).tolist())


def test_order_changes_per_epoch_and_is_reproducible():
    a, _ = padded_order(50, 3, shuffle=True, seed=0, epoch=0)
    b, _ = padded_order(50, 3, shuffle=True, seed=0, epoch=1)
    c, _ = padded_order(50, 3, shuffle=True, seed=0, epoch=0)
    assert not np.array_equal(a, b) and np.array_equal(a, c)
    assert np.array_equal(padded_order(50, 3)[0][:50], np.arange(50))


def test_model_input_scaling():
    images = np.array([[[[0], [255]], [[128], [1]]]], dtype=np.uint8)  # (1, 2, 2, 1)
    x = to_model_input(images)
    assert x.dtype == np.float32 and x.shape == (1, 1, 2, 2)
    assert x.min() == -1.0 and x.max() == 1.0 and x[0, 0, 1, 0] == pytest.approx(128 / 127.5 - 1, abs=1e-6)
    assert np.array_equal(from_model_input(x), images)


def test_round_trip_pixels_and_labels(digits_dataset):
    from sklearn.datasets import load_digits

    reader = LocalReader(digits_dataset, "test")
    assert len(reader) == 179 and reader.data.dtype == np.uint8 and reader.data.shape == (179, 8, 8, 1)
    batches = list(reader.batches(64))
    assert [len(b["x"]) for b in batches] == [64, 64, 51]
    b = batches[0]
    assert b["x"].dtype == torch.float32 and b["x"].shape == (64, 1, 8, 8)
    assert b["label"].dtype == torch.int64 and b["index"].dtype == torch.int64 and b["pad"].dtype == torch.bool
    assert float(b["x"].min()) >= -1 and float(b["x"].max()) <= 1
    x = torch.cat([b["x"] for b in batches]).numpy()
    assert np.array_equal(from_model_input(x), reader.data)  # exact pixels back
    # And those are the original sklearn digits, 0..16 scaled to 0..255.
    import pyarrow.parquet as pq

    rows = pq.read_table(digits_dataset / "manifest.parquet").to_pandas().query("split == 'test'").sort_values("index")
    orig = [int(s.split(":")[1]) for s in rows.source_id]
    bunch = load_digits()
    assert np.array_equal(reader.data[..., 0], np.round(bunch.images[orig] * 255 / 16))
    assert torch.equal(torch.cat([b["label"] for b in batches]), torch.as_tensor(bunch.target[orig]))


def test_distributed_batches_cover_split(digits_dataset):
    reader = LocalReader(digits_dataset, "test")
    for world in (1, 2, 3, 4):
        seen, sizes = [], []
        for rank in range(world):
            idx = torch.cat(
                [b["index"][~b["pad"]] for b in reader.batches(16, rank=rank, world_size=world, shuffle=True, epoch=3)]
            )
            n = sum(len(b["x"]) for b in reader.batches(16, rank=rank, world_size=world, shuffle=True, epoch=3))
            seen += idx.tolist()
            sizes.append(n)
        assert sorted(seen) == list(range(179)) and len(set(sizes)) == 1
    # drop_last keeps only whole batches (equal per rank, so still no waiting).
    assert all(len(b["x"]) == 16 for b in reader.batches(16, rank=1, world_size=3, drop_last=True))


def test_flips_are_per_sample_per_epoch(digits_dataset):
    reader = LocalReader(digits_dataset, "test")
    plain = torch.cat([b["x"] for b in reader.batches(200)])

    def flipped(epoch, world=1):
        out = torch.empty_like(plain)
        for rank in range(world):
            for b in reader.batches(50, flip=True, seed=7, epoch=epoch, rank=rank, world_size=world):
                out[b["index"]] = b["x"]
        return out

    e0 = flipped(0)
    mirrored = torch.all(e0 == plain.flip(-1), dim=(1, 2, 3))
    same = torch.all(e0 == plain, dim=(1, 2, 3))
    assert torch.all(mirrored | same)
    symmetric = torch.all(plain == plain.flip(-1), dim=(1, 2, 3))
    assert 40 < int((mirrored & ~symmetric).sum()) < 140  # about half
    assert torch.equal(flipped(0), e0) and torch.equal(flipped(0, world=3), e0)  # same flips whoever reads
    assert not torch.equal(flipped(1), e0)  # new flips next epoch


def test_vectors_are_not_rescaled(tmp_path):
    out = tmp_path / "toy"
    prepare_quick("toy2d", out, name="gmm8", num_train=30, num_test=0)
    reader = LocalReader(out, "train")
    b = next(reader.batches(30, flip=True))
    assert b["x"].shape == (30, 2) and b["x"].dtype == torch.float32
    assert torch.equal(b["x"], torch.from_numpy(reader.data))
    assert float(b["x"].abs().max()) > 1.5  # the ring has radius 2


def test_a_streamed_split_is_the_split_in_batches_shuffled_per_epoch(digits_dataset):
    """stream_batches (shard by shard, for splits too large to hold) gives LocalReader's samples, each once."""
    whole = LocalReader(digits_dataset, "train")

    def epoch(e: int, shuffle: bool = True) -> list[dict]:
        return list(stream_batches(digits_dataset, "train", 100, shuffle=shuffle, seed=3, epoch=e, buffer=300))

    plain = epoch(0, shuffle=False)
    assert [len(b["index"]) for b in plain] == [100] * 16 + [18]
    index = torch.cat([b["index"] for b in plain]).numpy()
    assert np.array_equal(index, np.arange(len(whole)))
    assert torch.equal(torch.cat([b["x"] for b in plain]), torch.from_numpy(whole.inputs(index)))
    first, second, again = epoch(0), epoch(1), epoch(0)
    order = [torch.cat([b["index"] for b in run]).numpy() for run in (first, second, again)]
    assert sorted(order[0]) == list(range(len(whole))) and sorted(order[1]) == list(range(len(whole)))
    assert not np.array_equal(order[0], order[1]) and np.array_equal(order[0], order[2])
    assert not np.array_equal(order[0], np.sort(order[0]))
    for b in first:  # each row keeps its own label and pixels
        assert torch.equal(b["label"], torch.from_numpy(whole.labels[b["index"].numpy()]))
        assert torch.equal(b["x"], torch.from_numpy(whole.inputs(b["index"].numpy())))
