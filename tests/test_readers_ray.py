"""The Ray Data reader on a real local Ray: round trip, and the per-epoch split guarantee.

Guarantee under test: in an epoch every training worker gets a disjoint share of
equal length, and the shares together are the whole split (padded by repeating the
first samples, marked pad=True) — with uneven shard sizes, with more workers than
shards, through Ray Data's streaming_split and through a real Ray Train TorchTrainer.
"""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
from conftest import prepare_quick, write_image_folder

ray = pytest.importorskip("ray")

from pipelines.common.errors import UserError  # noqa: E402
from pipelines.data.readers import LocalReader, from_model_input, ray_dataset  # noqa: E402


@pytest.fixture(scope="module")
def uneven(tmp_path_factory):
    """17 labeled 6×5 RGB images in shards of 7, 7, 3."""
    root = tmp_path_factory.mktemp("uneven")
    write_image_folder(root / "src", {"a": 8, "b": 9}, size=(5, 6))
    prepare_quick("imagefolder", root / "ds", path=str(root / "src"), samples_per_shard=7)
    return root / "ds"


@pytest.fixture(scope="module")
def one_shard(tmp_path_factory):
    """5 toy points in a single shard: more workers than shards for W ≥ 2."""
    out = tmp_path_factory.mktemp("one") / "ds"
    prepare_quick("toy2d", out, name="gmm8", num_train=5, num_test=0, samples_per_shard=8)
    return out


def _rows(ds) -> dict[str, np.ndarray]:
    batches = list(ds.iter_batches(batch_size=None, batch_format="numpy"))
    return {k: np.concatenate([b[k] for b in batches]) for k in ("x", "label", "index", "pad")}


def _check_shares(shares: list[dict[str, list]], n: int) -> None:
    world = len(shares)
    lengths = [len(s["index"]) for s in shares]
    assert lengths == [-(-n // world)] * world, lengths  # equal: ceil(n / W)
    real = sorted(i for s in shares for i, p in zip(s["index"], s["pad"]) if not p)
    assert real == list(range(n))  # disjoint, and together the whole split
    pads = sorted(i for s in shares for i, p in zip(s["index"], s["pad"]) if p)
    assert pads == sorted(np.arange((-n) % world) % n)  # the first samples, repeated


def test_round_trip_matches_plain_reader(ray_session, uneven):
    ds = ray_dataset(uneven, "train")
    rows = _rows(ds)
    order = np.argsort(rows["index"])
    local = LocalReader(uneven, "train")
    assert rows["x"].dtype == np.float32 and rows["x"].shape == (17, 3, 6, 5)
    assert rows["x"].min() >= -1 and rows["x"].max() <= 1
    assert np.array_equal(from_model_input(rows["x"][order]), local.data)
    assert np.array_equal(rows["label"][order], local.labels) and rows["label"].dtype == np.int64
    assert not rows["pad"].any() and sorted(rows["index"]) == list(range(17))
    # Straight into torch: only numeric columns, no key strings.
    import torch

    batch = next(iter(ds.iter_torch_batches(batch_size=8)))
    assert set(batch) == {"x", "label", "index", "pad"}
    assert (
        batch["x"].dtype == torch.float32 and batch["label"].dtype == torch.int64 and batch["pad"].dtype == torch.bool
    )


def test_flip(ray_session, uneven):
    plain = _rows(ray_dataset(uneven, "train"))
    flipped = _rows(ray_dataset(uneven, "train", flip=True))
    a = plain["x"][np.argsort(plain["index"])]
    b = flipped["x"][np.argsort(flipped["index"])]
    same = np.all(a == b, axis=(1, 2, 3))
    mirrored = np.all(a[..., ::-1] == b, axis=(1, 2, 3))
    assert np.all(same | mirrored)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("world, shuffle", [(1, None), (2, "files"), (3, None), (3, "rows")])
def test_streaming_split_equal_disjoint_complete(ray_session, uneven, one_shard, world, shuffle):
    for path, n in ((uneven, 17), (one_shard, 5)):
        ds = ray_dataset(path, "train", pad_to_multiple_of=world, shuffle=shuffle)
        its = ds.streaming_split(world, equal=True)
        for _epoch in range(2):
            shares: list = [None] * world

            def consume(rank):
                got = {"index": [], "pad": []}
                for b in its[rank].iter_batches(batch_size=4):  # noqa: B023
                    got["index"] += b["index"].tolist()
                    got["pad"] += b["pad"].tolist()
                shares[rank] = got  # noqa: B023

            threads = [threading.Thread(target=consume, args=(r,), daemon=True) for r in range(world)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=60)
            assert not any(t.is_alive() for t in threads), "a worker is stuck"
            _check_shares(shares, n)


def _make_train_loop():
    # Defined inside a function so cloudpickle ships it by value: Ray workers cannot import test modules.
    def train_loop(config):
        """Runs in each Ray Train worker: two epochs of every dataset; records what this rank saw."""
        import json as json_
        from pathlib import Path as Path_

        import ray.train
        import torch

        ctx = ray.train.get_context()
        rank = ctx.get_world_rank()
        for epoch in range(2):
            for name in ("images", "points"):
                shard = ray.train.get_dataset_shard(name)
                seen = {"index": [], "pad": [], "batches": 0}
                for batch in shard.iter_torch_batches(batch_size=4):
                    assert batch["x"].dtype == torch.float32 and batch["label"].dtype == torch.int64
                    assert float(batch["x"].abs().max()) <= (1.0 if name == "images" else 10.0)
                    seen["index"] += batch["index"].tolist()
                    seen["pad"] += batch["pad"].tolist()
                    seen["batches"] += 1
                Path_(config["out"], f"{name}-{epoch}-{rank}.json").write_text(json_.dumps(seen))

    return train_loop


# Through Ray Train's own split (its DataConfig), with 3 workers: both datasets need padding, and a share is not
# a half. 1, 2 and 3 ways are the streaming_split test's above; a trainer start costs ~25 s on 2 cores.
@pytest.mark.timeout(300)
def test_torch_trainer_workers_get_equal_disjoint_shares(ray_session, uneven, one_shard, tmp_path):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    world = 3

    out = tmp_path / "seen"
    out.mkdir()
    trainer = TorchTrainer(
        _make_train_loop(),
        train_loop_config={"out": str(out)},
        scaling_config=ScalingConfig(num_workers=world, use_gpu=False),
        run_config=RunConfig(name=f"split-{world}", storage_path=str(tmp_path / "ray")),
        datasets={
            "images": ray_dataset(uneven, "train", pad_to_multiple_of=world, flip=True),
            "points": ray_dataset(one_shard, "train", pad_to_multiple_of=world),
        },
    )
    trainer.fit()
    for name, n in (("images", 17), ("points", 5)):
        for epoch in range(2):
            shares = [json.loads((out / f"{name}-{epoch}-{r}.json").read_text()) for r in range(world)]
            _check_shares(shares, n)
            assert len({s["batches"] for s in shares}) == 1  # same number of steps: nobody waits


def test_checks_before_ray_runs(ray_session, uneven, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(uneven, bad)
    data = bytearray((bad / "train-000001.tar").read_bytes())
    data[700] ^= 0xFF
    (bad / "train-000001.tar").write_bytes(bytes(data))
    with pytest.raises(UserError, match=r"train-000001\.tar: SHA-256"):
        ray_dataset(bad, "train")
    with pytest.raises(UserError, match="no such directory"):
        ray_dataset(tmp_path / "nope", "train")


def test_bad_sample_fails_loudly_inside_ray(ray_session, uneven, tmp_path):
    """With verify=False a damaged sample still stops the pipeline with the file and key, never a silent drop."""
    import io
    import shutil
    import tarfile

    import webdataset as wds

    bad = tmp_path / "bad"
    shutil.copytree(uneven, bad)
    buf = io.BytesIO()
    with tarfile.open(bad / "train-000002.tar") as tar, wds.TarWriter(buf, encoder=False, mtime=0) as w:
        for info in tar:
            if info.name == "train-00000015.png":
                continue
            key, suffix = info.name.split(".", 1)
            w.write({"__key__": key, suffix: tar.extractfile(info).read()})
    (bad / "train-000002.tar").write_bytes(buf.getvalue())
    with pytest.raises(Exception, match=r"train-000002\.tar: sample train-00000015: sample has no \.png member"):
        ray_dataset(bad, "train", verify=False).materialize()
