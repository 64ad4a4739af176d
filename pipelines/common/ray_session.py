"""The one way a cdm command starts or joins Ray.

`ensure_ray(address, …)` joins the cluster at `address` (or $RAY_ADDRESS) if one
is named, else starts a local Ray, and reuses a session already started in this
process (a workflow runs every stage in one session; tests start their own).

A local Ray gets at least `min_cpus` logical CPUs: training reserves one CPU per
worker, and Ray Data's read tasks need a whole CPU more, or they wait forever and
training never gets its first batch.

Ray Data prints several INFO lines per epoch ("Starting execution of Dataset …")
from its SplitCoordinator actor, where the driver's `logging` settings do not
reach; each Ray Data process reads its logging config from the YAML file named by
RAY_DATA_LOGGING_CONFIG. A local Ray's workers inherit the driver's environment,
so setting the variable before `ray.init` covers them. A user's own
RAY_DATA_LOGGING_CONFIG wins; on a cluster the job's runtime_env decides.

While a cdm command captures library output (pipelines.common.console), Ray's
copies of its workers' lines go to that log too, not to the terminal.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import ray
from ray._private import worker as ray_worker
from ray._private.ray_logging import global_worker_stdstream_dispatcher

from pipelines.common.console import log_path

RAY_DATA_LOGGING = Path(__file__).with_name("ray_data_logging.yaml")


def quiet_ray_data_console() -> None:
    os.environ.setdefault("RAY_DATA_LOGGING_CONFIG", str(RAY_DATA_LOGGING))


def route_ray_worker_output() -> None:
    """While output is captured, Ray's copies of its workers' lines go to the log (fd 2), uncoloured.

    Ray prints a worker's stdout lines to the driver's `sys.stdout`, which stays the terminal while
    output is captured (it carries cdm's own lines); this swaps its printer for one that writes
    every line to the log. Ray's own private printer, as no public setting does this.
    """
    dispatcher = global_worker_stdstream_dispatcher
    if log_path() is None or not any(name == "ray_print_logs" for name, _ in dispatcher.handlers):
        return

    def to_log(data: dict) -> None:
        ray_worker.print_worker_logs(data, sys.__stderr__)

    dispatcher.remove_handler("ray_print_logs")
    dispatcher.add_handler("ray_print_logs", to_log)


def cluster_address(address: str | None = None) -> str | None:
    """The cluster to join: `address`, else $RAY_ADDRESS; None means a local Ray."""
    return address or os.environ.get("RAY_ADDRESS") or None


def ensure_ray(
    address: str | None = None, *, min_cpus: int = 1, num_cpus: int | None = None, dashboard: bool = True
) -> None:
    """Join `address` / $RAY_ADDRESS, else start a local Ray; do nothing if Ray is already up.

    Local only: `num_cpus` logical CPUs (default: the machine's cores, and at least
    `min_cpus`); `dashboard=False` skips the dashboard (batch stages need no State
    API; Ray Train's placement-group monitor does).
    """
    if ray.is_initialized():
        return
    quiet_ray_data_console()
    joined = cluster_address(address)
    if joined:
        runtime_env = None
        if "://" not in joined and joined not in ("auto", "local"):
            # Ray's state API inside workers (Ray Train's placement-group clean-up monitor asks it whether the
            # training controller is alive) must ask this cluster, not whichever one `ray start` ran last here.
            runtime_env = {"env_vars": {"RAY_ADDRESS": joined}}
        ray.init(address=joined, runtime_env=runtime_env)
        route_ray_worker_output()
        return
    if num_cpus is None and min_cpus > 1:
        num_cpus = max(os.cpu_count() or 1, min_cpus)
    # num_cpus None: Ray counts the cores itself (within a container's CPU limit).
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=None if dashboard else False)
    route_ray_worker_output()
