"""A pytest plugin for benchmarks/suite_cpu.py: when each test starts and ends, per pytest process, in
$CDM_TIMELINE_DIR/timeline.<xdist worker>.log (`-p timeline_plugin` with benchmarks/ on PYTHONPATH)."""

from __future__ import annotations

import os
import time
from pathlib import Path

_LOG = None


def _write(what: str, nodeid: str) -> None:
    global _LOG
    if _LOG is None:
        worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
        _LOG = (Path(os.environ["CDM_TIMELINE_DIR"]) / f"timeline.{worker}.log").open("a", buffering=1)
    _LOG.write(f"{time.time():.1f} {what} {nodeid}\n")


def pytest_runtest_logstart(nodeid, location):
    _write("start", nodeid)


def pytest_runtest_logfinish(nodeid, location):
    _write("end", nodeid)
