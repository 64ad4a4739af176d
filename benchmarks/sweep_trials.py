"""What a sweep's trial costs with a Ray Train worker and in its own Tune actor (`scaling.num_workers=0`).

A 4-trial FIFO sweep (two schedules × two CE weights) of `configs/train_tiny.toml` on sklearn's digits, 20 steps
per trial, 2 trials at a time, on a local Ray of 4 logical CPUs; each way in a fresh process with its own Ray,
the ways alternated so that machine noise hits both alike. Seconds from `tune.run`'s call to its return, and each
trial's MLflow run from its start to its end (the fit's start and end included).

Prints a table and writes benchmarks/results/sweep_trials.json.

    python benchmarks/sweep_trials.py [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from provenance import stamp  # benchmarks/provenance.py: run as `python benchmarks/NAME.py`

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results" / "sweep_trials.json"
WAYS = {"one worker": 1, "in the trial's actor": 0}
STEPS = 20


def _sweep(workers: int) -> dict:
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")  # as the test suite runs its fits
    import ray
    from mlflow.tracking import MlflowClient

    sys.path.insert(0, str(ROOT))
    from pipelines.common import config as cfg
    from pipelines.common.config import nest
    from pipelines.data.config import PrepareConfig
    from pipelines.data.prepare import run as prepare
    from pipelines.train.config import TrainConfig
    from pipelines.tune import space as tune_space
    from pipelines.tune import sweep as tune

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "digits"
        prepare(nest(PrepareConfig, source="digits", out=str(data), samples_per_shard=500, track=False))
        config = cfg.load(
            TrainConfig,
            ROOT / "configs" / "train_tiny.toml",
            [
                f"data.uri={data}",
                f"run.storage_path={Path(tmp) / 'sweeps'}",
                f"tracking.tracking_uri=sqlite:///{Path(tmp) / 'mlflow.db'}",
                f"train.steps={STEPS}",
                "validation.every=10",
                "checkpoint.every=10",
                f"scaling.num_workers={workers}",
            ],
        )
        space = {"schedule.name": {"grid": ["linear", "ot"]}, "loss.w_ce": {"grid": [1e-3, 1e-2]}}
        settings = {"name": "bench", "scheduler": "fifo", "max_concurrent": 2}
        sweep = tune_space.parse({"space": space, "tune": settings}, config)
        started = time.perf_counter()
        result = tune.run(config, sweep, config_name="tiny")
        wall = time.perf_counter() - started
        client = MlflowClient(f"sqlite:///{Path(tmp) / 'mlflow.db'}")
        infos = [client.get_run(r.run_id).info for r in result.rows]
        trial_s = [(i.end_time - i.start_time) / 1000 for i in infos]
        statuses = sorted(r.status for r in result.rows)
    ray.shutdown()
    return {"sweep_s": round(wall, 2), "trial_run_s": [round(t, 2) for t in trial_s], "statuses": statuses}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(_sweep(args.child)))
        return
    runs: dict[str, list[dict]] = {way: [] for way in WAYS}
    for _ in range(args.rounds):
        for way, workers in WAYS.items():
            out = subprocess.run(
                [sys.executable, __file__, "--child", str(workers)], capture_output=True, text=True, check=True
            )
            runs[way].append(json.loads(out.stdout.strip().splitlines()[-1]))
    rows = {
        way: {
            "sweep_s": [r["sweep_s"] for r in rs],
            "sweep_median_s": round(statistics.median(r["sweep_s"] for r in rs), 2),
            "trial_median_s": round(statistics.median(t for r in rs for t in r["trial_run_s"]), 2),
            "statuses": sorted({s for r in rs for s in r["statuses"]}),
        }
        for way, rs in runs.items()
    }
    print(f"{'trials train':<24}{'sweep (s), each run':>24}{'median':>9}{'trial median (s)':>18}")
    for way, row in rows.items():
        sweeps = ", ".join(map(str, row["sweep_s"]))
        print(f"{way:<24}{sweeps:>24}{row['sweep_median_s']:>9}{row['trial_median_s']:>18}")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "what": f"a 4-trial FIFO sweep of the tiny preset on digits ({STEPS} steps a trial, 2 at a time) on "
                "a local Ray of 4 logical CPUs: trials on one Ray Train worker each, or in their Tune actors",
                "machine": f"{platform.machine()}, {os.cpu_count()} cores",
                **stamp(),
                "rounds": args.rounds,
                "ways": rows,
                "raw": runs,
            },
            indent=2,
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
