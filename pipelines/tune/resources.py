"""Giving back the CPUs/GPUs of a trial that Ray Tune stops early.

Each trial's Ray Train run reserves its workers in a placement group created by
the Train controller, an actor owned by the trial. When a scheduler (ASHA)
stops a trial, Tune ends the trial's actor; the controller and workers die with
it, but a placement group made by a non-detached actor lives until the job
ends, so its CPUs stay reserved and later trials wait forever for workers.
Ray's own safety net (Train V2's detached PlacementGroupCleaner) polls the
State API, which needs the dashboard and fails when several Ray instances run
on one machine, so `cdm tune` does not rely on it:

* `RecordPlacementGroup`, a Train callback inside the controller, records every
  placement group of the trial's worker groups in the sweep's `TrialLedger`;
* the trial records its own actor's id there;
* once the trial's actor is gone (`is_gone`), the sweep's Tune callback takes the
  trial's groups from the ledger and removes those still there (`release`).

PBT pauses a trial (ending its actor) and restarts it with new settings; Tune has
no callback for the pause, so the restarted trial's new actor takes its previous
actor's groups from the ledger and releases them before it trains.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import ray
from ray.util.placement_group import placement_group_table, remove_placement_group

from pipelines.common.ray_compat import WorkerGroupCallback, actor_state, placement_group_of

logger = logging.getLogger(__name__)


class TrialLedger:
    """Per trial: its Tune actor's id and the placement groups of its Train worker groups."""

    def __init__(self) -> None:
        self._actors: dict[str, str] = {}
        self._groups: dict[str, list[Any]] = {}

    def add_actor(self, trial_id: str, actor_id: str) -> tuple[Any, list[Any]]:
        """Record the trial's (new) actor; returns its previous actor and that actor's groups, now forgotten."""
        previous = self.take(trial_id)
        self._actors[trial_id] = actor_id
        return previous

    def add_group(self, trial_id: str, group: Any) -> None:
        self._groups.setdefault(trial_id, []).append(group)

    def take(self, trial_id: str) -> tuple[Any, list[Any]]:
        return self._actors.pop(trial_id, None), self._groups.pop(trial_id, [])


def ledger_name(sweep: str) -> str:
    return f"cdm-tune-ledger-{sweep}"


def open_ledger(sweep: str) -> Any:
    """The sweep's ledger actor (created on first use; it lives as long as the `cdm tune` driver)."""
    return ray.remote(num_cpus=0)(TrialLedger).options(name=ledger_name(sweep), get_if_exists=True).remote()


class RecordPlacementGroup(WorkerGroupCallback):
    """Runs in the trial's Train controller: records each new worker group's placement group.

    This is an internal Ray Train callback interface (pipelines.common.ray_compat says what it relies on).
    """

    def __init__(self, sweep: str, trial_id: str):
        self.sweep = sweep
        self.trial_id = trial_id

    def after_worker_group_start(self, worker_group: Any) -> None:
        try:
            group = placement_group_of(worker_group)
            ledger = ray.get_actor(ledger_name(self.sweep))
            ray.get(ledger.add_group.remote(self.trial_id, group))
        except Exception as err:  # never fail a trial over bookkeeping (e.g. a Ray whose internals moved)
            logger.warning(
                "cdm tune: could not record trial %s's placement group (%s: %s); if Tune stops it "
                "early, its CPUs may stay reserved until the sweep ends",
                self.trial_id,
                type(err).__name__,
                err,
            )


class TrialActorWatch:
    """Tells, without blocking, whether a trial's actor has exited.

    It asks the GCS's actor table (`ray_compat.actor_state`) instead of calling the actor: a call
    that reaches an actor while it exits trips an internal Ray check and prints a crash report.
    """

    POLL_S = 0.5

    def __init__(self, actor_id: str | None):
        self.actor_id = actor_id
        self._next = 0.0

    def is_gone(self) -> bool:
        if self.actor_id is None:
            return True
        now = time.monotonic()
        if now < self._next:
            return False
        self._next = now + self.POLL_S
        try:
            state = actor_state(self.actor_id)
        except Exception as err:  # the accessor is Ray-internal: if it moved, say so and stop waiting
            logger.warning(
                "cdm tune: cannot read actor %s's state (%s); releasing its resources now", self.actor_id, err
            )
            return True
        return state == "DEAD"

    def wait(self, timeout_s: float = 120.0) -> bool:
        """Block until the actor has exited (True) or `timeout_s` passed (False)."""
        deadline = time.monotonic() + timeout_s
        while not self.is_gone():
            if time.monotonic() > deadline:
                return False
            time.sleep(self.POLL_S)
        return True


def release(groups: list[Any]) -> int:
    """Remove the placement groups that still exist; returns how many were removed."""
    removed = 0
    for group in groups:
        if placement_group_table(group).get("state") not in ("REMOVED", None):
            remove_placement_group(group)
            removed += 1
    return removed
