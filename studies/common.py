"""What every study shares: the real `cdm` command, a results JSON with its provenance, a markdown table.

A study runs the product's own commands (`cdm run`, `cdm classify`, …) in a subprocess, exactly as a
user would, into a work folder outside the repository (default /tmp/cdm-studies/NAME; its MLflow store
is there too: `cdm ui --workdir …` opens it). What it commits is `results.json` (every figure, its
convention, the commands, seconds, machine and commit), a figure and `table.md`.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]


def workdir(name: str) -> Path:
    base = Path(os.environ.get("CDM_STUDIES_WORKDIR", "/tmp/cdm-studies"))
    path = base / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def cdm(*args: str, log: Path) -> float:
    """Run `cdm ARGS` (this interpreter's package), its output appended to `log`; the seconds it took.

    A failure stops the study with the command's last lines.
    """
    command = [sys.executable, "-m", "pipelines", *args]
    start = time.perf_counter()
    with log.open("a") as f:
        f.write(f"$ cdm {' '.join(args)}\n")
        f.flush()
        code = subprocess.call(command, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    seconds = time.perf_counter() - start
    if code:
        tail = "".join(log.read_text().splitlines(keepends=True)[-30:])
        raise SystemExit(f"cdm {' '.join(args)} failed (exit {code}); the end of {log}:\n{tail}")
    return seconds


def provenance() -> dict[str, Any]:
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True).stdout)
    return {
        "commit": commit + ("+uncommitted" if dirty else ""),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()}",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def write_results(folder: Path, results: dict[str, Any], table: str) -> None:
    """`results.json` (with provenance) and `table.md` next to the study's script; prints the table."""
    (folder / "results.json").write_text(json.dumps({**results, "provenance": provenance()}, indent=2) + "\n")
    (folder / "table.md").write_text(table + "\n")
    print(table)
    print(f"\nwrote {folder / 'results.json'} and {folder / 'table.md'}")


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
