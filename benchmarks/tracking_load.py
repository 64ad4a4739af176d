"""Load on one SQLite MLflow store: N processes logging metrics at once, as `cdm tune`'s trials do.

Each writer is a process with its own MLflow run that logs `--batches` batches of 8 metrics
(one training log step each) as fast as it can, through cdm's own `RunLogger` (which retries a
write that SQLite refused as locked) or through a bare `MlflowClient.log_batch` (no retry).
Counted afterwards from the store: what arrived, against what was sent; the writes that raised;
metrics per second over all writers. Prints a table, writes benchmarks/results/tracking_load.json.

    python benchmarks/tracking_load.py [--writers 1 2 4 8 16] [--batches 100]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import tempfile
import time
from pathlib import Path

from provenance import stamp  # benchmarks/provenance.py: run as `python benchmarks/NAME.py`

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

METRICS = (
    "train/loss",
    "train/ce",
    "train/mse",
    "train/grad_norm",
    "train/lr",
    "train/epoch",
    "train/images_per_s",
    "val/nll_bpd",
)


def _writer(uri: str, run_id: str, batches: int, retry: bool, start: float, out) -> None:
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    from pipelines.train.run_logger import RunLogger

    while time.time() < start:  # all writers begin together
        time.sleep(0.001)
    logger = RunLogger(uri, run_id) if retry else None
    client = MlflowClient(uri)
    failed = 0
    for step in range(1, batches + 1):
        values = {k: float(step) for k in METRICS}
        try:
            if logger:
                logger.metrics(values, step)
            else:
                now = int(time.time() * 1000)
                client.log_batch(run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])
        except Exception:  # noqa: BLE001 -- counted: this is what the benchmark measures
            failed += 1
    out.put(failed)


def measure(writers: int, batches: int, retry: bool) -> dict:
    from mlflow.tracking import MlflowClient

    folder = Path(tempfile.mkdtemp(prefix="cdm-tracking-load-"))
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("load", artifact_location=(folder / "art").as_uri())
    runs = [client.create_run(exp).info.run_id for _ in range(writers)]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    start = time.time() + 3.0 + 0.3 * writers
    procs = [ctx.Process(target=_writer, args=(uri, r, batches, retry, start, out)) for r in runs]
    for p in procs:
        p.start()
    failed = sum(out.get() for _ in procs)
    for p in procs:
        p.join()
    seconds = time.time() - start
    arrived = sum(len(client.get_metric_history(r, k)) for r in runs for k in METRICS)
    sent = writers * batches * len(METRICS)
    return {
        "writers": writers,
        "retry": retry,
        "sent": sent,
        "arrived": arrived,
        "lost": sent - arrived,
        "failed_writes": failed,
        "seconds": round(seconds, 2),
        "metrics_per_s": round(arrived / seconds, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--writers", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--batches", type=int, default=100)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "tracking_load.json")
    args = parser.parse_args()
    rows = [measure(n, args.batches, retry) for n in args.writers for retry in (False, True)]
    print(
        f"{'writers':>7} {'retry':>6} {'sent':>7} {'arrived':>8} {'lost':>6} {'failed':>7} {'s':>7} {'metrics/s':>10}"
    )
    for r in rows:
        print(
            f"{r['writers']:>7} {r['retry']!s:>6} {r['sent']:>7} {r['arrived']:>8} {r['lost']:>6} "
            f"{r['failed_writes']:>7} {r['seconds']:>7} {r['metrics_per_s']:>10}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()
    args.out.write_text(
        json.dumps(
            {
                "batches_per_writer": args.batches,
                "metrics_per_batch": len(METRICS),
                "cpus": os.cpu_count(),
                **stamp(),
                "load_average": [round(v, 2) for v in load],
                "rows": rows,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
