"""Every use of Ray's private modules and methods, in one place.

cdm uses Ray's public API wherever one does the job. Where none does, the private use lives here,
with a line on what it relies on, and tests/test_ray_compat.py checks each assumption against the
installed Ray, so that a Ray release that moves one fails those tests rather than a user's run.
The versions this was checked on are the bounds in pyproject.toml (`ray[…]>=2.52,<2.61`); to move
them, install the new Ray and run tests/test_ray_compat.py first.

`grep -rn "_internal\\|_private" pipelines/` finds only this module.
"""

from __future__ import annotations

import copy
import hashlib
import os
import signal
from pathlib import Path
from typing import Any

import yaml
from ray._private import state as ray_state
from ray._private import worker as ray_worker
from ray._private.ray_logging import global_worker_stdstream_dispatcher
from ray.data._internal import logging as ray_data_logging
from ray.train.torch import TorchTrainer
from ray.train.v2._internal.execution.callback import WorkerGroupCallback as WorkerGroupCallback

# WorkerGroupCallback is imported from here too (the explicit re-export above), but it is Ray's class: make docs
# documents only what __all__ names.
__all__ = [
    "InterruptibleTorchTrainer",
    "actor_state",
    "is_train_v2",
    "placement_group_of",
    "quiet_ray_data_console",
    "ray_data_logging_config",
    "route_worker_output",
]

RAY_DATA_LOGGING_ENV = "RAY_DATA_LOGGING_CONFIG"


# --------------------------------------------------------------------------- Ray Data's console


def ray_data_logging_config() -> dict[str, Any]:
    """Ray Data's own default logging config, with its console handler at WARNING.

    Relies on `ray.data._internal.logging.DEFAULT_CONFIG` and its handler named "console". Ray Data's
    `DataContext` has no setting for this: its `enable_progress_bars`/`verbose_stats_logs` leave the
    "Execution finished" INFO lines on the console. Everything still goes to ray-data.log.
    """
    config = copy.deepcopy(ray_data_logging.DEFAULT_CONFIG)
    config["handlers"]["console"]["level"] = "WARNING"
    return config


def quiet_ray_data_console(folder: Path) -> None:
    """Point RAY_DATA_LOGGING_CONFIG at a file holding `ray_data_logging_config()` (unless the user set one).

    Each Ray Data process (the driver and the SplitCoordinator actor, where the driver's `logging`
    settings do not reach) reads the file the variable names; a local Ray's workers inherit the
    driver's environment. The file is named by its content, so concurrent commands write the same bytes.
    """
    if os.environ.get(RAY_DATA_LOGGING_ENV):
        return
    text = yaml.safe_dump(ray_data_logging_config(), sort_keys=True)
    path = folder / f"ray-data-logging-{hashlib.sha256(text.encode()).hexdigest()[:12]}.yaml"
    if not path.exists():
        partial = path.with_name(f".{path.name}.{os.getpid()}")
        partial.write_text(text)
        os.replace(partial, path)
    os.environ[RAY_DATA_LOGGING_ENV] = str(path)


# --------------------------------------------------------------------------- workers' output on the driver


def route_worker_output(stream: Any) -> bool:
    """Print Ray's copies of its workers' lines to `stream`; False if Ray prints none here.

    Relies on `ray._private.ray_logging.global_worker_stdstream_dispatcher` holding a handler named
    "ray_print_logs" (added by `ray.init(log_to_driver=True)`) and on `ray._private.worker.print_worker_logs`
    (data, file), which writes no colour codes under RAY_COLOR_PREFIX=0 (set by console capture). No public setting sends the lines anywhere but `sys.stdout`/`sys.stderr`.
    """
    dispatcher = global_worker_stdstream_dispatcher
    if not any(name == "ray_print_logs" for name, _ in dispatcher.handlers):
        return False

    def to_stream(data: dict) -> None:
        ray_worker.print_worker_logs(data, stream)

    dispatcher.remove_handler("ray_print_logs")
    dispatcher.add_handler("ray_print_logs", to_stream)
    return True


# --------------------------------------------------------------------------- actors and Ray Train


def actor_state(actor_id: str) -> str:
    """An actor's state in the GCS's actor table ("ALIVE", "DEAD", …; "DEAD" when the table has no entry).

    Relies on `ray._private.state.actors(actor_id=…)`, the accessor Ray Data uses too. The public
    `ray.util.state.get_actor` needs the dashboard's State API, which fails when several Ray instances
    run on one machine; calling the actor instead trips an internal Ray check while it exits.
    """
    info = ray_state.actors(actor_id=actor_id) or {}
    return str(info.get("State", "DEAD"))


def is_train_v2() -> bool:
    """Whether `ray.train.torch.TorchTrainer` is Ray Train V2's (RAY_TRAIN_V2_ENABLED=0 selects V1).

    Public: the class's module. Ray's own test, `ray.train.v2._internal.constants.is_v2_enabled`, is private.
    """
    return TorchTrainer.__module__.startswith("ray.train.v2.")


def placement_group_of(worker_group: Any) -> Any:
    """The placement group of the worker group a `WorkerGroupCallback.after_worker_group_start` receives.

    Relies on `WorkerGroup.get_worker_group_state().placement_group_handle.placement_group`. The callback
    interface itself is Train V2's internal one (`ray.train.v2._internal.execution.callback`); `RunConfig`
    passes callbacks that are not `UserCallback`s through to the controller for such uses.
    """
    return worker_group.get_worker_group_state().placement_group_handle.placement_group


class InterruptibleTorchTrainer(TorchTrainer):
    """A TorchTrainer whose Ctrl-C reaches cdm as a KeyboardInterrupt (a message, exit 130, the run KILLED).

    Ray Train installs its own SIGINT handler for the length of `fit()` (`_register_sigint_handler(controller)`,
    private): it aborts the workers, then exits the process with SystemExit (status 1, without a word). This
    keeps Ray's abort and notes the signal in `interrupted`, so that the caller can raise KeyboardInterrupt once
    Ray is done. tests/test_train_recovery.py sends the real signal to the real `cdm train`.
    """

    interrupted = False

    def _register_sigint_handler(self, controller) -> None:
        super()._register_sigint_handler(controller)
        ray_handler = signal.getsignal(signal.SIGINT)

        def note_then_abort(signum, frame):
            self.interrupted = True
            if callable(ray_handler):
                ray_handler(signum, frame)

        signal.signal(signal.SIGINT, note_then_abort)
