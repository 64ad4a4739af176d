"""What one Ray Train fit costs before any training: a no-op `TorchTrainer.fit()` on a local Ray.

Each fit of the test suite pays this, whatever it trains. Three ways, each in a fresh process with its own
local Ray (the poll interval is read when Ray Train's controller starts), alternated so that machine noise
hits all alike:

    workers-2s    one worker, Ray Train's default health-check poll interval (2 s)
    workers-0.25s one worker, RAY_TRAIN_HEALTH_CHECK_INTERVAL_S=0.25 (what tests/conftest.py sets)
    local         ScalingConfig(num_workers=0): the function runs in the calling process

Prints a table and writes benchmarks/results/fit_overhead.json.

    python benchmarks/fit_overhead.py [--rounds 2] [--fits 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from provenance import stamp  # benchmarks/provenance.py: run as `python benchmarks/NAME.py`

RESULTS = Path(__file__).parent / "results" / "fit_overhead.json"
WAYS = {
    "workers-2s": ({"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "2.0"}, 1),
    "workers-0.25s": ({"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25"}, 1),
    "local": ({}, 0),
}


def _fits(workers: int, fits: int) -> list[float]:
    import tempfile

    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    def noop(config):
        import ray.train

        ray.train.report({"x": 1})

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    seconds = []
    with tempfile.TemporaryDirectory() as storage:
        for i in range(fits):
            started = time.perf_counter()
            TorchTrainer(
                noop,
                scaling_config=ScalingConfig(num_workers=workers),
                run_config=RunConfig(storage_path=storage, name=f"fit{i}"),
            ).fit()
            seconds.append(time.perf_counter() - started)
    ray.shutdown()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--fits", type=int, default=3)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_fits(WAYS[args.child][1], args.fits)))
        return
    seconds: dict[str, list[float]] = {way: [] for way in WAYS}
    for _ in range(args.rounds):
        for way, (env, _workers) in WAYS.items():
            out = subprocess.run(
                [sys.executable, __file__, "--child", way, "--fits", str(args.fits)],
                env={**os.environ, **env},
                capture_output=True,
                text=True,
                check=True,
            )
            seconds[way] += json.loads(out.stdout.strip().splitlines()[-1])
    # The first fit of each Ray also starts Ray Train's shared actors; the later ones are what a suite pays.
    rows = {
        way: {
            "first_fit_s": [round(s[i], 2) for i in range(0, len(s), args.fits)],
            "later_fits_median_s": round(statistics.median([x for i, x in enumerate(s) if i % args.fits]), 2),
        }
        for way, s in seconds.items()
    }
    print(f"{'way':<15}{'first fit (s)':>22}{'later fits, median (s)':>26}")
    for way, row in rows.items():
        print(f"{way:<15}{', '.join(map(str, row['first_fit_s'])):>22}{row['later_fits_median_s']:>26}")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "what": "seconds of one no-op TorchTrainer.fit() on a local Ray (4 logical CPUs)",
                "machine": f"{platform.machine()}, {os.cpu_count()} cores",
                **stamp(),
                "rounds": args.rounds,
                "fits_per_ray": args.fits,
                "ways": rows,
                "raw_s": {way: [round(x, 2) for x in s] for way, s in seconds.items()},
            },
            indent=2,
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
