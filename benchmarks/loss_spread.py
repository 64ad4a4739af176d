"""How far apart two tiny digits runs' loss curves land when only chance differs: the noise model behind
`tests/test_train.py::test_one_and_two_workers_give_close_loss_curves`.

`configs/train_tiny.toml`, 40 steps on sklearn's 8×8 digits, one run per seed and way of running:

    0   Ray Train's local mode (the loop in this process)
    1   one Ray Train worker
    2   two Ray Train workers (the same global batch of 32)

For each run it takes the means of train/loss over steps 11-40 and 31-40 and the validation NLL (bits/dim, the
179 test digits) at step 40, and reports their spread across runs (sample standard deviation). The steps within one run are not independent draws: a
run's whole trajectory moves with its seed and its data order, so the spread across runs, not the scatter within
a window, is what two runs' windows differ by.

Prints a table and writes benchmarks/results/loss_spread.json.

    python benchmarks/loss_spread.py [--seeds 6] [--local-seeds 24]
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

from provenance import stamp  # benchmarks/provenance.py: run as `python benchmarks/NAME.py`

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results" / "loss_spread.json"
WINDOWS = {"steps_11_40": slice(10, 40), "steps_31_40": slice(30, 40)}


def _curve(uri: str, run_id: str, key: str) -> list[float]:
    from mlflow.tracking import MlflowClient

    history = sorted(MlflowClient(uri).get_metric_history(run_id, key), key=lambda m: m.step)
    return [m.value for m in history]


def _spread(values: list[float]) -> dict[str, float]:
    return {"mean": round(statistics.fmean(values), 4), "sd_across_runs": round(statistics.stdev(values), 4)}


def _least(values: list[float]) -> dict[str, float]:
    return {"mean": round(statistics.fmean(values), 4), "min": round(min(values), 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=6, help="seeds for one and for two Ray Train workers")
    parser.add_argument("--local-seeds", type=int, default=24, help="seeds for local mode (seconds each)")
    args = parser.parse_args()
    os.environ["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] = "0"  # as the suite runs

    import ray

    from pipelines.common import config as cfg
    from pipelines.common.config import nest
    from pipelines.data.config import PrepareConfig
    from pipelines.data.prepare import run as prepare
    from pipelines.train.config import TrainConfig
    from pipelines.train.trainer import run

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)  # the suite's Ray has 4 logical CPUs
    runs: dict[str, list[list[float]]] = {"0": [], "1": [], "2": []}
    val: dict[str, list[list[float]]] = {way: [] for way in runs}  # val/nll_bpd at steps 10, 20, 30, 40
    seconds: dict[str, list[float]] = {way: [] for way in runs}
    with tempfile.TemporaryDirectory() as work:
        data, uri = Path(work) / "digits", f"sqlite:///{work}/mlflow.db"
        prepare(nest(PrepareConfig, source="digits", out=str(data), samples_per_shard=500, track=False))
        plan = [(seed, way) for seed in range(max(args.seeds, args.local_seeds)) for way in runs]
        for seed, way in plan:  # interleaved, so that machine noise hits all ways alike
            if seed >= (args.local_seeds if way == "0" else args.seeds):
                continue
            config = cfg.load(
                TrainConfig,
                ROOT / "configs" / "train_tiny.toml",
                [
                    f"data.uri={data}",
                    f"run.storage_path={Path(work) / 'runs'}",
                    f"run.name=seed{seed}-workers{way}",
                    f"tracking.tracking_uri={uri}",
                    "train.steps=40",
                    f"train.seed={seed}",
                    f"scaling.num_workers={way}",
                ],
            )
            started = time.perf_counter()
            run_id = run(config).mlflow_run_id
            runs[way].append(_curve(uri, run_id, "train/loss"))
            val[way].append(_curve(uri, run_id, "val/nll_bpd"))
            seconds[way].append(round(time.perf_counter() - started, 1))
    ray.shutdown()

    table = {}
    for way, curves in runs.items():
        row = {"runs": len(curves)}
        for name, window in WINDOWS.items():
            row[name] = _spread([statistics.fmean(c[window]) for c in curves])
        row["sd_within_steps_31_40"] = round(statistics.fmean(statistics.stdev(c[30:40]) for c in curves), 4)
        row["val_nll_bpd_at_40"] = _spread([v[-1] for v in val[way]])
        row["val_nll_bpd_drop_10_to_40"] = _least([v[0] - v[-1] for v in val[way]])
        row["train_loss_drop_1_10_to_31_40"] = _least(
            [statistics.fmean(c[:10]) - statistics.fmean(c[30:]) for c in curves]
        )
        table[way] = row
    print(
        f"{'workers':<9}{'runs':>6}{'loss 11-40':>12}{'sd':>8}{'loss 31-40':>12}{'sd':>8}{'sd within':>11}"
        f"{'val nll@40':>12}{'sd':>8}{'val drop min':>14}"
    )
    for way, row in table.items():
        a, b, v = row["steps_11_40"], row["steps_31_40"], row["val_nll_bpd_at_40"]
        print(
            f"{way:<9}{row['runs']:>6}{a['mean']:>12}{a['sd_across_runs']:>8}{b['mean']:>12}"
            f"{b['sd_across_runs']:>8}{row['sd_within_steps_31_40']:>11}{v['mean']:>12}{v['sd_across_runs']:>8}"
            f"{row['val_nll_bpd_drop_10_to_40']['min']:>14}"
        )
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "what": "train/loss window means of configs/train_tiny.toml (40 steps, digits) across seeds; "
                "workers 0 is Ray Train's local mode",
                "machine": f"{platform.machine()}, {os.cpu_count()} cores",
                **stamp(),
                "by_workers": table,
                "seconds_per_run": {way: s for way, s in seconds.items()},
                "train_loss": runs,
                "val_nll_bpd": val,
            },
            indent=2,
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
