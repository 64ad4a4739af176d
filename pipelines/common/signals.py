"""One signal path: SIGTERM stops a command the way Ctrl-C does.

Kubernetes, Slurm, `ray job stop` and `kill` stop work with SIGTERM, so it must end as Ctrl-C ends:
one line, exit 130, the MLflow run KILLED, what was finished kept. The SIGTERM handler hands the
signal to whatever handles SIGINT at that moment: Python's own (a KeyboardInterrupt), or Ray Train's
abort of a running fit (which cdm's trainer turns into a KeyboardInterrupt once Ray is done).

`ray.init` replaces the SIGTERM handler twice (its Python one calls sys.exit(15), then the C++ core
worker installs abseil's failure handler, which aborts: exit 134 and no word), so `install` runs
again after every `ray.init` (pipelines.common.ray_session), besides once at the start of `cdm`.
"""

from __future__ import annotations

import signal
import threading


def as_ctrl_c(signum, frame) -> None:
    """The SIGTERM handler: what SIGINT's handler does now."""
    handler = signal.getsignal(signal.SIGINT)
    if callable(handler):
        handler(signal.SIGINT, frame)
    else:  # SIGINT ignored (a background job of a script) or default: SIGTERM still stops the command
        raise KeyboardInterrupt


def install() -> None:
    """SIGTERM from now on goes where Ctrl-C goes (only the main thread may set a handler)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, as_ctrl_c)
