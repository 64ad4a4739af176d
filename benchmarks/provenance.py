"""The commit and date a benchmark's JSON records beside its figures (the docs' results pages show them)."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def stamp() -> dict[str, str]:
    """{"commit": HEAD, "+uncommitted" when the tree has changes; "date": UTC}: what the figures ran on."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True).stdout
    except OSError:  # no git: say so rather than guess
        head, dirty = "", ""
    commit = (head + ("+uncommitted" if dirty.strip() else "")) if head else "unknown (no git)"
    return {"commit": commit, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
