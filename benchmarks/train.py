"""Training benchmark: CDM training images/s through Ray Train with 1 and 2 workers, and Ray's overhead.

The same model (the `tiny` U-Net preset, 32 channels), the same data (sklearn's
8×8 digits, prepared here) and the same step (`pipelines.train_step.TrainStep`:
CDM loss with its double backward, clipping, Adam, EMA) run

- in a plain single-process loop over an in-memory `LocalReader` (all cores in one process),
- through `cdm train` (`pipelines.train.run`) with 1 worker holding all cores,
- through `cdm train` with 2 workers of 1 core each (DDP over gloo), same global batch.

Throughput is steady state: images between the 10th and the last step divided by
the wall time between them (the MLflow timestamps of `train/loss` for Ray runs), so
it includes data loading, logging and, for 2 workers, the gradient all-reduce.
Start-up (Ray workers, process group, datasets) is reported separately.
`ray_overhead_fraction_1worker` = 1 − Ray(1 worker) / plain. Target ≤ 0.10.

    python benchmarks/train.py [--steps 80] [--batch 64] [--reps 1]

Prints a table and writes benchmarks/results/train.json (a flat object).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "results" / "train.json"
TARGET = 0.10
WARMUP_STEPS = 10


def bench_config(dataset: Path, work: Path, name: str, steps: int, batch: int, workers: int, threads: int):
    from pipelines import config as cfg
    from pipelines.train_config import TrainConfig

    return cfg.load(TrainConfig, ROOT / "configs" / "train_tiny.toml", [
        f"data.uri={dataset}", f"run.storage_path={work / 'runs'}", f"run.name={name}",
        f"tracking.tracking_uri=sqlite:///{work / 'mlflow.db'}",
        "model.base_channels=32", "schedule.T=1000", f"train.steps={steps}", f"train.batch_size={batch}",
        "train.log_every=10", f"validation.every={steps}", f"checkpoint.every={steps}", "validation.max_samples=64",
        "sampling.every=0", "run.log_model=false", f"scaling.num_workers={workers}", f"scaling.cpus_per_worker={threads}",
    ])


def plain_loop(config, dataset: Path, threads: int) -> dict:
    """The training step alone: one process, data already in memory."""
    import torch

    from cdm_core.ema import EMA
    from pipelines.readers import LocalReader
    from pipelines.train_step import TrainStep, build_network, build_optimizer, build_prior, build_schedule

    torch.set_num_threads(threads)
    reader = LocalReader(dataset, "train")
    torch.manual_seed(0)
    model = build_network(config, 1, 8)
    opt, sched = build_optimizer(model, config.optim)
    step = TrainStep(config, model, EMA(model, config.ema.decay), opt, sched, build_schedule(config),
                     build_prior(config), torch.device("cpu"), torch.Generator().manual_seed(0))
    done, epoch, start = 0, 0, None
    while done < config.train.steps:
        for batch in reader.batches(config.train.batch_size, shuffle=True, epoch=epoch, drop_last=True):
            result = step(batch["x"])
            assert result.finite
            float(result.loss)  # what the Ray loop reads back every step
            done += 1
            if done == WARMUP_STEPS:
                start = time.perf_counter()
            if done == config.train.steps:
                break
        epoch += 1
    seconds = time.perf_counter() - start
    return {"images_per_s": (config.train.steps - WARMUP_STEPS) * config.train.batch_size / seconds}


def ray_run(config) -> dict:
    from mlflow.tracking import MlflowClient

    from pipelines.train import run

    started = time.time()
    result = run(config)
    client = MlflowClient(config.tracking.tracking_uri)
    history = {m.step: m.timestamp / 1000 for m in client.get_metric_history(result.mlflow_run_id, "train/loss")}
    first_step_at = min(history.values())  # step log_every; the time to reach it is mostly start-up
    steps = config.train.steps
    images = (steps - WARMUP_STEPS) * config.train.batch_size
    return {
        "images_per_s": images / (history[steps] - history[WARMUP_STEPS]),
        "startup_s": first_step_at - started,
        "end_to_end_s": time.time() - started,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--reps", type=int, default=1, help="repeat each measurement, keep the best (the machine may be shared)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    import ray
    import torch

    from pipelines.prepare import PrepareConfig, run as prepare

    cores = os.cpu_count() or 1
    work = Path(tempfile.mkdtemp(prefix="cdm-bench-train-"))
    dataset = work / "digits"
    prepare(PrepareConfig(source="digits", out=str(dataset), track=False))
    # One logical CPU more than the workers take: Ray Data reads with it (see pipelines.train._fit).
    ray.init(num_cpus=cores + 1, include_dashboard=False, log_to_driver=False, configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False

    runs: dict[str, list[dict]] = {"plain": [], "ray1": [], "ray2": []}
    for rep in range(args.reps):  # interleaved, so a burst of load elsewhere hits every variant alike
        runs["plain"].append(plain_loop(bench_config(dataset, work, f"plain-{rep}", args.steps, args.batch, 1, cores), dataset, cores))
        runs["ray1"].append(ray_run(bench_config(dataset, work, f"ray1-{rep}", args.steps, args.batch, 1, cores)))
        runs["ray2"].append(ray_run(bench_config(dataset, work, f"ray2-{rep}", args.steps, args.batch, 2, max(1, cores // 2))))
    ray.shutdown()

    best = {k: max(v, key=lambda r: r["images_per_s"]) for k, v in runs.items()}
    plain, ray1, ray2 = best["plain"]["images_per_s"], best["ray1"]["images_per_s"], best["ray2"]["images_per_s"]
    overhead = 1 - ray1 / plain
    results = {
        "machine": platform.machine(),
        "cpu_cores": cores,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "ray": ray.__version__,
        "model": "cdm tiny U-Net (32 ch, mult 1,2), T=1000",
        "data": "sklearn digits 8x8x1",
        "global_batch": args.batch,
        "steps": args.steps,
        "reps": args.reps,
        "plain_images_per_s": round(plain, 1),
        "ray_1worker_images_per_s": round(ray1, 1),
        "ray_2workers_images_per_s": round(ray2, 1),
        "ray_overhead_fraction_1worker": round(overhead, 3),
        "scaling_2workers_vs_1worker": round(ray2 / ray1, 3),
        "ray_startup_s_1worker": round(best["ray1"]["startup_s"], 1),
        "ray_startup_s_2workers": round(best["ray2"]["startup_s"], 1),
        "ray_end_to_end_s_1worker": round(best["ray1"]["end_to_end_s"], 1),
        "ray_end_to_end_s_2workers": round(best["ray2"]["end_to_end_s"], 1),
        "images_per_s_spread_plain": [round(r["images_per_s"], 1) for r in runs["plain"]],
        "images_per_s_spread_ray1": [round(r["images_per_s"], 1) for r in runs["ray1"]],
        "images_per_s_spread_ray2": [round(r["images_per_s"], 1) for r in runs["ray2"]],
        "load_average_1min_at_end": round(os.getloadavg()[0], 2),
        "target_overhead_fraction": TARGET,
        "meets_target": overhead <= TARGET,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    _print_table(results)
    print(f"\nwrote {args.out}")
    return results


def _print_table(r: dict) -> None:
    print(f"\nCDM training, {r['model']}, {r['data']}, global batch {r['global_batch']}, {r['cpu_cores']} cores")
    print(f"{'':34} {'images/s':>9} {'start-up s':>11} {'total s':>8}")
    print(f"{'plain loop, 1 process':34} {r['plain_images_per_s']:>9}")
    print(f"{'Ray Train, 1 worker':34} {r['ray_1worker_images_per_s']:>9} {r['ray_startup_s_1worker']:>11} {r['ray_end_to_end_s_1worker']:>8}")
    print(f"{'Ray Train, 2 workers (DDP, gloo)':34} {r['ray_2workers_images_per_s']:>9} {r['ray_startup_s_2workers']:>11} {r['ray_end_to_end_s_2workers']:>8}")
    print(f"Ray overhead at 1 worker: {r['ray_overhead_fraction_1worker']:.1%} (target ≤ {r['target_overhead_fraction']:.0%})"
          f"; best of {r['reps']} rep(s); load average {r['load_average_1min_at_end']}")


if __name__ == "__main__":
    main()
