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
RAY_DATA_LOGGING_CONFIG, which cdm sets before `ray.init` to Ray Data's default
with the console at WARNING (pipelines.common.ray_compat). A local Ray's workers
inherit the driver's environment, so that covers them. A user's own
RAY_DATA_LOGGING_CONFIG wins; on a cluster the job's runtime_env decides.

While a cdm command captures library output (pipelines.common.console), Ray's
copies of its workers' lines go to that log too, not to the terminal.
"""

from __future__ import annotations

import os
import sys

import ray

from pipelines.common import ray_compat, signals
from pipelines.common.connect import check_cluster
from pipelines.common.console import log_folder, log_path


def quiet_ray_data_console() -> None:
    ray_compat.quiet_ray_data_console(log_folder())


def route_ray_worker_output() -> None:
    """While output is captured, Ray's copies of its workers' lines go to the log (fd 2), uncoloured.

    Ray prints a worker's stdout lines to the driver's `sys.stdout`, which stays the terminal while
    output is captured (it carries cdm's own lines).
    """
    if log_path() is not None:
        ray_compat.route_worker_output(sys.__stderr__)


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
        check_cluster(address, "the Ray address")  # ray.init would wait minutes, without a word, for no cluster
        runtime_env = None
        if "://" not in joined and joined not in ("auto", "local"):
            # Ray's state API inside workers (Ray Train's placement-group clean-up monitor asks it whether the
            # training controller is alive) must ask this cluster, not whichever one `ray start` ran last here.
            runtime_env = {"env_vars": {"RAY_ADDRESS": joined}}
        ray.init(address=joined, runtime_env=runtime_env)
        signals.install()  # ray.init put its own SIGTERM handlers in place of cdm's
        route_ray_worker_output()
        return
    if num_cpus is None and min_cpus > 1:
        num_cpus = max(os.cpu_count() or 1, min_cpus)
    # num_cpus None: Ray counts the cores itself (within a container's CPU limit).
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=None if dashboard else False)
    signals.install()  # ray.init put its own SIGTERM handlers in place of cdm's
    route_ray_worker_output()
