"""The workflow's MLflow parent run: one per plan, reopened when the same plan runs again.

The parent is made with the client API and never becomes the process's
active MLflow run, so the stages are free to start, nest and reopen their
own runs (a resumed training run reopens its old run by id).

`<workdir>/outputs/workflows/<name>/runs.json` maps each plan key to its
parent run, so a rerun of an interrupted workflow continues the same parent
(its earlier children stay; the stages that run now add theirs). A stage that
was done before this parent existed (e.g. shared with another workflow) gets
a short "cached" child that points to the run that made its output, so every
parent has one child per stage.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Optional

from mlflow.entities import Metric, RunTag
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

from pipelines.common.errors import UserError
from pipelines.common.tracking import (
    DESCRIPTION_TAG,
    PatientClient,
    experiment_id,
    log_params,
    open_store,
    stage_description,
    version_tags,
)

STATE_FILE = "runs.json"
STAGE_TAG = "cdm.workflow_stage"


def workflow_dir(workdir: Path, name: str) -> Path:
    return workdir / "outputs" / "workflows" / name


class ParentRun:
    def __init__(
        self,
        workdir: Path,
        name: str,
        plan_key: str,
        tracking_uri: str,
        experiment: str,
        nest_under: Optional[str] = None,
    ):
        self.folder = workflow_dir(workdir, name)
        self.nest_under = nest_under
        self.name = name
        self.plan_key = plan_key
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.client = PatientClient(tracking_uri)
        self.run_id: Optional[str] = None
        self.reopened = False

    # ----------------------------------------------------------------- state file

    def _state(self) -> dict[str, Any]:
        try:
            return json.loads((self.folder / STATE_FILE).read_text())
        except (OSError, ValueError):
            return {}

    def _save_state(self, state: dict[str, Any]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / f".{STATE_FILE}.tmp-{os.getpid()}"
        tmp.write_text(json.dumps(state, indent=2) + "\n")
        os.replace(tmp, self.folder / STATE_FILE)

    def _previous(self) -> Optional[str]:
        entry = self._state().get(self.plan_key)
        if not entry or entry.get("tracking_uri") != self.tracking_uri:
            return None
        try:
            run = self.client.get_run(entry["run_id"])
        except Exception:  # deleted store, or a run removed by hand: start a new parent
            return None
        return run.info.run_id if run.info.lifecycle_stage == "active" else None

    # ----------------------------------------------------------------- lifecycle

    def open(self, params: dict[str, Any], tags: dict[str, str]) -> str:
        """Reopen this plan's parent run, or create it (with the workflow config as params)."""
        open_store(self.tracking_uri, self.experiment)  # an unreachable or damaged store: one line, before any run
        if self.nest_under:
            self._check_nest_under()
        previous = self._previous()
        if previous is not None:
            self.run_id, self.reopened = previous, True
            self.client.update_run(previous, status="RUNNING")
            if self.nest_under:  # the same plan run again for another study: it moves under that one
                self.client.set_tag(previous, MLFLOW_PARENT_RUN_ID, self.nest_under)
            return previous
        exp = experiment_id(self.experiment, self.tracking_uri)
        tags = {**version_tags(), **tags}
        if self.nest_under:
            tags[MLFLOW_PARENT_RUN_ID] = self.nest_under
        about = stage_description(tags)
        if about:
            tags[DESCRIPTION_TAG] = about
        run = self.client.create_run(exp, run_name=self.name, tags={**tags, MLFLOW_RUN_NAME: self.name})
        self.run_id = run.info.run_id
        log_params(self.client, self.run_id, params)
        state = self._state()
        state[self.plan_key] = {
            "run_id": self.run_id,
            "tracking_uri": self.tracking_uri,
            "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        self._save_state(state)
        self.client.log_batch(self.run_id, tags=[RunTag("cdm.plan", self.plan_key)])
        return self.run_id

    def _check_nest_under(self) -> None:
        try:
            outer = self.client.get_run(self.nest_under)
        except Exception:
            outer = None
        if outer is None or outer.info.lifecycle_stage != "active":
            raise UserError(
                f"tracking.parent_run_id: no run {self.nest_under} in {self.tracking_uri}; give the id of a run "
                "in this store"
            )
        if outer.info.experiment_id != experiment_id(self.experiment, self.tracking_uri):
            raise UserError(
                f"tracking.parent_run_id: run {self.nest_under} is in another experiment than "
                f"{self.experiment!r}; the UI shows a parent and its children in one experiment"
            )

    def close(self, status: str) -> None:
        if self.run_id is not None:
            self.client.set_terminated(self.run_id, status=status)

    # ----------------------------------------------------------------- children and headline figures

    def tag_child(self, run_id: Optional[str], stage: str, key: str) -> None:
        if run_id:
            self.client.set_tag(run_id, STAGE_TAG, stage)
            self.client.set_tag(run_id, "cdm.stage_key", key)

    def retire_child(self, stage: str) -> None:
        """The stage's child run stays, renamed `<stage> (replaced)`, so that the run that replaces it is the stage's."""
        child = self.children_by_stage().get(stage)
        if child:
            self.client.set_tag(child, STAGE_TAG, f"{stage} (replaced)")
            self.client.set_tag(child, MLFLOW_RUN_NAME, f"{stage} (replaced)")

    def children_by_stage(self) -> dict[str, str]:
        runs = self.client.search_runs(
            [self.client.get_run(self.run_id).info.experiment_id],
            filter_string=f"tags.mlflow.parentRunId = '{self.run_id}'",
            max_results=1000,
        )
        return {r.data.tags[STAGE_TAG]: r.info.run_id for r in runs if STAGE_TAG in r.data.tags}

    def add_cached_child(self, stage: str, key: str, record: dict[str, Any]) -> str:
        """A child for a stage whose output was made under another parent: its figures and a link to the run that made it."""
        tags = {
            MLFLOW_PARENT_RUN_ID: self.run_id,
            STAGE_TAG: stage,
            "cdm.stage_key": key,
            "cdm.cached": "true",
            "cdm.stage": stage,
            "cdm.output": str(record.get("output", "")),
        }
        if record.get("mlflow_run_id"):
            tags["cdm.cached_from_run"] = record["mlflow_run_id"]
        exp = self.client.get_run(self.run_id).info.experiment_id
        child = self.client.create_run(exp, run_name=f"{stage} (cached)", tags=tags)
        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, 0) for k, v in (record.get("metrics") or {}).items()]
        if metrics:
            self.client.log_batch(child.info.run_id, metrics=metrics)
        self.client.set_terminated(child.info.run_id, status="FINISHED")
        return child.info.run_id

    def _last_steps_of_children(self) -> dict[str, int]:
        """Per metric key, the last step a child logged it at: the parent's copy of a curve's final value
        sits on the curve's end in a chart of parent and children, not as a stray point at step 0."""
        steps: dict[str, int] = {}
        for child in self.children_by_stage().values():
            for key in self.client.get_run(child).data.metrics:
                history = self.client.get_metric_history(child, key)
                if history:
                    steps[key] = max(steps.get(key, 0), max(m.step for m in history))
        return steps

    def log_headline(self, metrics: dict[str, float], artifacts: list[str]) -> None:
        """The workflow's figures on the parent; values it already holds are not logged again."""
        held = self.client.get_run(self.run_id).data.metrics
        now = int(time.time() * 1000)
        steps = self._last_steps_of_children()
        fresh = [Metric(k, float(v), now, steps.get(k, 0)) for k, v in metrics.items() if held.get(k) != float(v)]
        if fresh:
            self.client.log_batch(self.run_id, metrics=fresh)
        for path in artifacts:
            if path and Path(path).is_file():
                self.client.log_artifact(self.run_id, path)
