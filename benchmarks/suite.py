"""Where the test suite's time goes: a pytest log with `--durations=0` → per-module seconds in
benchmarks/results/suite.json, and a table beside an earlier run's.

    make test PYTEST_ARGS="-q --durations=0" 2>&1 | tee suite.log
    python benchmarks/suite.py suite.log --label "after: …" --commit HEAD [--wall-s 1234] [--compare LABEL]

A module's seconds are the sum of its tests' setup, call and teardown. With `make test`'s two processes
(pytest-xdist) the sum over modules is more than the wall time: the lane of modules that start no Ray runs
beside the Ray-using ones (tests/conftest.py), so `--wall-s` and pytest's own total are recorded too.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import subprocess
from collections import defaultdict
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "suite.json"
DURATION = re.compile(r"^\s*([0-9.]+)s (setup|call|teardown)\s+(\S+)")
TOTALS = re.compile(r"(?:(\d+) failed, )?(\d+) passed\b.* in ([0-9.]+)s")


def parse(log: str) -> dict:
    listed, per_module = [], defaultdict(float)
    for line in log.splitlines():
        found = DURATION.match(line)
        if found:
            seconds, phase, test = float(found[1]), found[2], found[3]
            listed.append({"seconds": seconds, "phase": phase, "test": test})
            per_module[test.split("::")[0]] += seconds
    totals = {}
    for line in log.splitlines():
        found = TOTALS.search(line)
        if found:
            totals = {"failed": int(found[1] or 0), "passed": int(found[2]), "pytest_seconds": float(found[3])}
    return {
        "totals": totals,
        "per_module_seconds": {k: round(v, 2) for k, v in sorted(per_module.items(), key=lambda kv: -kv[1])},
        "durations_listed": listed,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("log", type=Path)
    parser.add_argument("--label", required=True)
    parser.add_argument("--commit", default="HEAD")
    parser.add_argument("--note", default="")
    parser.add_argument("--wall-s", type=float, help="the whole command's wall time, installation included")
    parser.add_argument("--compare", help="the label of an earlier run in suite.json to set beside this one")
    args = parser.parse_args()

    run = parse(args.log.read_text(errors="replace"))
    commit = subprocess.run(["git", "rev-parse", "--short", args.commit], capture_output=True, text=True).stdout
    entry = {"run": args.label, "commit": commit.strip() or args.commit, "note": args.note, **run}
    if args.wall_s:
        entry["wall_seconds_with_installation"] = args.wall_s
    data = json.loads(RESULTS.read_text()) if RESULTS.exists() else {"runs": []}
    data.update(what="the test suite's time, from pytest logs (--durations=0)", machine=f"{platform.machine()}")
    data["runs"] = [r for r in data["runs"] if r["run"] != args.label] + [entry]
    RESULTS.write_text(json.dumps(data, indent=1) + "\n")

    before = next((r for r in data["runs"] if r["run"] == args.compare), None) if args.compare else None
    modules = list(entry["per_module_seconds"])
    if before:
        modules += [m for m in before["per_module_seconds"] if m not in entry["per_module_seconds"]]
    print(f"{'module':40s} {'s':>8s}" + (f" {'before s':>9s}" if before else ""))
    for module in modules:
        now = entry["per_module_seconds"].get(module, 0.0)
        row = f"{module:40s} {now:8.1f}"
        if before:
            row += f" {before['per_module_seconds'].get(module, 0.0):9.1f}"
        print(row)
    print(f"{'pytest total (wall)':40s} {run['totals'].get('pytest_seconds', 0):8.1f}")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
