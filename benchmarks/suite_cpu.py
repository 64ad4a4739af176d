"""Where the test suite's CPU goes: every process's CPU seconds while `make test` runs, by kind of process and by
the Ray-using module that was running when it started → benchmarks/results/suite_cpu.json.

    python benchmarks/suite_cpu.py                 # runs `make test` (~27 min on 2 cores) while it samples
    python benchmarks/suite_cpu.py --capture DIR   # the summary of a capture an earlier run left in DIR

On 2 cores the Ray-using modules run one at a time and are the suite's wall time (tests/conftest.py); when the
machine is busy while they run, only less CPU work makes them faster. Each process is read from /proc every
0.5 s: its CPU time, and its command line, which a Ray worker rewrites to the actor it became (`ray::IDLE` =
never used). A process that lives under 0.5 s is missed; a process's CPU counts in full even where it outlived
its module, and the suite's own Ray (its raylet, GCS, agents) counts in the module that started it.
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import platform
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

from provenance import stamp  # benchmarks/provenance.py: run as `python benchmarks/NAME.py`

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "suite_cpu.json"
HZ = os.sysconf("SC_CLK_TCK")


def sample(out: Path, stop: threading.Event) -> None:
    """Every 0.5 s until `stop`: each process's CPU seconds, latest command line and first-seen time, in `out`."""
    seen: dict[tuple[int, int], list] = {}
    t0 = time.time()
    while not stop.is_set():
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                fields = Path(f"/proc/{entry}/stat").read_text()
                fields = fields[fields.rfind(")") + 2 :].split()
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            cpu, key = (int(fields[11]) + int(fields[12])) / HZ, (int(entry), int(fields[19]))
            known = seen.setdefault(key, [0.0, "", time.time() - t0, int(fields[1])])
            if cpu >= known[0]:
                known[0], known[1] = cpu, cmdline.strip()[:200] or known[1]
        time.sleep(0.5)
    rows = [
        {"pid": k[0], "cpu_s": v[0], "cmdline": v[1], "first_seen": t0 + v[2], "ppid": v[3]} for k, v in seen.items()
    ]
    out.write_text(json.dumps(rows))


def kind(cmdline: str) -> str:
    if cmdline.startswith("ray::"):
        return cmdline.split()[0].split(".")[0]
    for needle, name in (
        ("raylet", "raylet"),
        ("gcs_server", "gcs_server"),
        ("dashboard/agent.py", "dashboard agent"),
        ("log_monitor", "log monitor"),
        ("exec(eval(sys.stdin", "pytest process (xdist)"),
        ("import atexit, json, os, sys, threading", "cdm (forked by cdm_forks)"),
        ("chrom", "chromium"),
        ("moto.server", "moto S3 server"),
    ):
        if needle in cmdline:
            return name
    if "/bin/cdm " in cmdline:
        return "cdm " + (cmdline.split("/bin/cdm ")[1].split() or ["?"])[0]
    return "other"


def modules(timeline: Path) -> list[tuple[float, float, str]]:
    """(start, end, module) of each module in the order one pytest process ran them."""
    spans: list[list] = []
    for line in timeline.read_text().splitlines():
        at, what, test = line.split(" ", 2)
        module = test.split("::")[0].split("/")[-1]
        if what == "start" and not (spans and spans[-1][2] == module):
            spans.append([float(at), float(at), module])
        elif spans:
            spans[-1][1] = float(at)
    return [tuple(s) for s in spans]


def summarise(capture: Path) -> dict:
    processes = json.loads((capture / "processes.json").read_text())
    timelines = {p.stem.split(".")[-1]: modules(p) for p in capture.glob("timeline.gw*.log")}
    ray = next(g for g, spans in timelines.items() if any(m == "test_tune.py" for _, _, m in spans))
    ray_spans = timelines[ray]
    lane_spans = next((spans for g, spans in timelines.items() if g != ray), [])
    started = [s for s, _, _ in ray_spans]
    by_kind, count, by_module = defaultdict(float), Counter(), defaultdict(float)
    for p in processes:
        if p["pid"] < 1000 or not p["cmdline"] or "suite_cpu.py" in p["cmdline"]:
            continue  # the kernel's threads, the machine's own daemons, this sampler
        name = kind(p["cmdline"])
        by_kind[name] += p["cpu_s"]
        count[name] += 1
        if name != "pytest process (xdist)":
            i = bisect.bisect_right(started, p["first_seen"]) - 1
            by_module[ray_spans[i][2] if i >= 0 else "(before the Ray modules)"] += p["cpu_s"]
    machine = capture / "machine.json"  # a capture made by hand may lack the machine's totals: then they are null
    busy = json.loads(machine.read_text()) if machine.exists() else {"wall_s": None, "busy_cpu_s": None}
    return {
        "wall_s": busy["wall_s"] and round(busy["wall_s"], 1),
        "machine_busy_cpu_s": busy["busy_cpu_s"] and round(busy["busy_cpu_s"], 1),
        "machine_utilisation": busy["wall_s"] and round(busy["busy_cpu_s"] / busy["wall_s"] / (os.cpu_count() or 1), 3),
        "processes_cpu_s": round(sum(by_kind.values()), 1),
        "ray_group_s": round(ray_spans[-1][1] - ray_spans[0][0], 1),
        "lane_ends_after_s": round(lane_spans[-1][1] - min(ray_spans[0][0], lane_spans[0][0]), 1)
        if lane_spans
        else None,
        "by_process_kind": {
            k: {"cpu_s": round(v, 1), "processes": count[k]} for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])
        },
        "ray_modules": {
            m: {"wall_s": round(e - s, 1), "cpu_s_of_processes_started": round(by_module.get(m, 0.0), 1)}
            for s, e, m in sorted(ray_spans, key=lambda span: span[0] - span[1])
        },
    }


def capture_make_test(capture: Path) -> None:
    capture.mkdir(parents=True, exist_ok=True)
    stop = threading.Event()
    sampler = threading.Thread(target=sample, args=(capture / "processes.json", stop))
    before, t0 = _busy(), time.time()
    sampler.start()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent), "CDM_TIMELINE_DIR": str(capture)}
    args = "-q -p no:cacheprovider -p timeline_plugin"
    subprocess.run(["make", "test", f"PYTEST_ARGS={args}"], cwd=ROOT, env=env, check=True)
    stop.set()
    sampler.join()
    (capture / "machine.json").write_text(json.dumps({"wall_s": time.time() - t0, "busy_cpu_s": _busy() - before}))


def _busy() -> float:
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / HZ  # all but idle and iowait


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--capture", type=Path, help="summarise the capture in this folder instead of running")
    parser.add_argument("--commit", default="", help="the commit the captured run tested (default: this tree)")
    parser.add_argument("--note", default="", help="what the reader should know about this capture")
    args = parser.parse_args()
    capture = args.capture or Path(os.environ.get("TMPDIR", "/tmp")) / f"cdm-suite-cpu-{os.getpid()}"
    if args.capture is None:
        capture_make_test(capture)
    result = {
        "what": "CPU seconds of every process while `make test` ran (2 pytest processes), by kind and by module",
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        **stamp(),
        **({"commit": args.commit} if args.commit else {}),
        "note": args.note,
        **summarise(capture),
    }
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"wall {result['wall_s']} s, machine busy {result['machine_utilisation']}, Ray group {result['ray_group_s']} s"
    )
    print(f"{'process kind':48s} {'CPU s':>8s} {'processes':>9s}")
    for name, row in list(result["by_process_kind"].items())[:25]:
        print(f"{name:48s} {row['cpu_s']:8.1f} {row['processes']:9d}")
    print(f"\n{'Ray-using module':32s} {'wall s':>7s} {'CPU s':>7s}")
    for name, row in result["ray_modules"].items():
        print(f"{name:32s} {row['wall_s']:7.1f} {row['cpu_s_of_processes_started']:7.1f}")
    print(f"wrote {RESULTS}", file=sys.stderr)


if __name__ == "__main__":
    main()
