"""What a Ray worker process spends importing our code before it does any work, this tree against an earlier commit.

Every Ray Train worker, Tune trial and batch-stage actor is a new Python process that imports its entry
module; on 2 cores that is on the critical path of every fit (a test suite runs ~40 of them). Each figure is
one fresh interpreter that has already imported what Ray's worker itself imports (ray.train.torch, ray.tune,
torch), timing `import MODULE` alone; trees are alternated so that machine noise hits all alike.

Prints a table and writes benchmarks/results/worker_imports.json.

    python benchmarks/worker_imports.py [--before REV] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from provenance import ROOT, stamp

RESULTS = Path(__file__).parent / "results" / "worker_imports.json"
# The entry modules of a training worker, a Tune trial and a batch-stage (NLL) actor.
MODULES = ("pipelines.train.loop", "pipelines.tune.trial", "pipelines.evaluate.nll")
TIMED = (
    "import time, ray.train.torch, ray.tune, torch; t = time.perf_counter(); import {module}; "
    "print(time.perf_counter() - t)"
)


def _seconds(tree: Path, module: str) -> float:
    out = subprocess.run(
        [sys.executable, "-c", TIMED.format(module=module)],
        cwd=tree,
        env={**os.environ, "PYTHONPATH": str(tree)},
        capture_output=True,
        text=True,
        check=True,
    )
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", default="HEAD~1", help="the earlier commit to compare with (default HEAD~1)")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    before = subprocess.run(
        ["git", "rev-parse", "--short", args.before], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()
    scratch = Path(tempfile.mkdtemp(prefix="cdm-imports-"))
    old = scratch / before
    subprocess.run(["git", "worktree", "add", "--detach", str(old), before], cwd=ROOT, capture_output=True, check=True)
    trees = {f"before ({before})": old, "this tree": ROOT}
    try:
        seconds = {label: {m: [] for m in MODULES} for label in trees}
        for _ in range(args.rounds):
            for module in MODULES:
                for label, tree in trees.items():
                    seconds[label][module].append(_seconds(tree, module))
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(old)], cwd=ROOT, capture_output=True)
        shutil.rmtree(scratch, ignore_errors=True)
    medians = {label: {m: round(statistics.median(s), 3) for m, s in per.items()} for label, per in seconds.items()}
    print(f"{'module':<24}" + "".join(f"{label:>22}" for label in trees) + f"{'saved (s)':>12}")
    for module in MODULES:
        row = [medians[label][module] for label in trees]
        print(f"{module:<24}" + "".join(f"{v:>22.2f}" for v in row) + f"{row[0] - row[1]:>12.2f}")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "what": "seconds a fresh interpreter (ray.train.torch, ray.tune, torch already imported) spends in "
                "`import MODULE`, median of the rounds",
                "machine": f"{platform.machine()}, {os.cpu_count()} cores",
                **stamp(),
                "before": before,
                "rounds": args.rounds,
                "median_s": medians,
                "raw_s": {
                    label: {m: [round(x, 3) for x in s] for m, s in per.items()} for label, per in seconds.items()
                },
            },
            indent=2,
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
