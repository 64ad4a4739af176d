"""Checkpoint upload and download seconds on a local S3-compatible server, for the cifar10 preset's state.

Starts a moto server on 127.0.0.1 (what tests/test_s3.py uses), builds the state `cdm train` writes for
`configs/cifar10.toml` (network, EMA copy, Adam's moments after a step, scheduler; the cdm_core
checkpoint format), saves it to a local folder as a Ray Train worker does, then copies the folder to
`s3://bench/runs/…` the way Ray Train V2 persists a checkpoint (pyarrow.fs.copy_files, one thread,
64 MiB chunks: ray.train.v2's _pyarrow_fs_copy_files) and back. Prints a table and writes
benchmarks/results/s3_checkpoint.json.

    python benchmarks/s3_checkpoint.py [--preset cifar10] [--reps 3]

On a real bucket the figure is set by the network, not by this machine; this one measures cdm's and
pyarrow's side of the work (serialisation, the S3 protocol, multipart upload) on the loopback.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import pyarrow.fs as pafs
import torch
from fixtures import moto_server  # benchmarks/fixtures.py
from provenance import stamp  # benchmarks/provenance.py: run as `python benchmarks/NAME.py`

from cdm_core.checkpoint import save_checkpoint
from cdm_core.ema import EMA
from pipelines.common import config as cfg
from pipelines.train.config import TrainConfig
from pipelines.train.step import build_network

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "s3_checkpoint.json"


def _state(preset: str):
    config = cfg.load(TrainConfig, ROOT / "configs" / f"{preset}.toml", ["data.uri=unused"])
    model = build_network(config, 3, 32)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    sum(p.square().sum() for p in model.parameters()).backward()  # Adam's moments exist after one step
    optimizer.step()
    return config, model, EMA(model, decay=0.9999), optimizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="cifar10")
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()

    with moto_server(Path(tempfile.gettempdir()) / "cdm-bench-moto.log") as endpoint:
        os.environ.update(
            {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}
        )
        s3 = pafs.S3FileSystem(endpoint_override=endpoint, allow_bucket_creation=True)
        s3.create_dir("bench")
        local = pafs.LocalFileSystem()
        config, model, ema, optimizer = _state(args.preset)
        params = sum(p.numel() for p in model.parameters())
        rows = {"save_local_s": [], "upload_s": [], "download_s": []}
        size = 0
        for rep in range(args.reps):
            with tempfile.TemporaryDirectory() as folder, tempfile.TemporaryDirectory() as back:
                t0 = time.perf_counter()
                save_checkpoint(
                    Path(folder) / "checkpoint.pt",
                    model=model,
                    step=1,
                    config=cfg.to_dict(config),
                    ema=ema,
                    optimizer=optimizer,
                )
                t1 = time.perf_counter()
                size = (Path(folder) / "checkpoint.pt").stat().st_size
                dest = f"bench/runs/r/checkpoint_{rep:08d}"
                s3.create_dir(dest)
                pafs.copy_files(
                    folder, dest, source_filesystem=local, destination_filesystem=s3,
                    use_threads=False, chunk_size=64 * 1024 * 1024,
                )  # fmt: skip
                t2 = time.perf_counter()
                pafs.copy_files(
                    dest, back, source_filesystem=s3, destination_filesystem=local, chunk_size=64 * 1024 * 1024
                )
                t3 = time.perf_counter()
                assert (Path(back) / "checkpoint.pt").stat().st_size == size
                rows["save_local_s"].append(t1 - t0)
                rows["upload_s"].append(t2 - t1)
                rows["download_s"].append(t3 - t2)
    mib = size / 2**20
    result = {
        "preset": args.preset,
        "parameters": params,
        "checkpoint_mib": round(mib, 1),
        "reps": args.reps,
        **{f"{k}_median": round(statistics.median(v), 3) for k, v in rows.items()},
        "upload_mib_per_s": round(mib / statistics.median(rows["upload_s"]), 1),
        "download_mib_per_s": round(mib / statistics.median(rows["download_s"]), 1),
        "all": {k: [round(x, 3) for x in v] for k, v in rows.items()},
        "server": "moto (python -m moto.server) on 127.0.0.1",
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}",
        **stamp(),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{args.preset}: {params / 1e6:.2f} M parameters, checkpoint {mib:.0f} MiB (model, EMA, Adam)")
    for k in rows:
        print(f"  {k:14s} {result[k + '_median']:8.2f} s (median of {args.reps})")
    print(f"  upload {result['upload_mib_per_s']} MiB/s, download {result['download_mib_per_s']} MiB/s -> {RESULTS}")


if __name__ == "__main__":
    main()
