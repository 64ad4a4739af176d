"""A sweep's trials as MLflow recorded them: sorted by the metric, printed as a table, the best one.

MLflow is the record that survives `--resume` (Tune's result grid only knows the
trials of the session that restored it), so the summary is read from the
parent run's children.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

# A trial's final status (the cdm.trial_status tag of its child run). Under PBT a trial's run that it
# left to continue from a better trial's checkpoint is "exploited" (the trial goes on in a new run).
COMPLETED, STOPPED_EARLY, FAILED, EXPLOITED = "completed", "stopped early", "failed", "exploited"


def child_run_id(client: Any, experiment: str, parent_run_id: str, run_name: str) -> Optional[str]:
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    runs = client.search_runs(
        [exp.experiment_id],
        filter_string=(f"tags.`cdm.run_name` = '{run_name}' and tags.`mlflow.parentRunId` = '{parent_run_id}'"),
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


def child_runs(client: Any, experiment: str, parent_run_id: str) -> list[Any]:
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    return client.search_runs(
        [exp.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'", max_results=10_000
    )


def trial_runs(client: Any, experiment: str, parent_run_id: str, sweep: str, trial_id: str) -> list[Any]:
    """A trial's runs, newest first: `<sweep>-<trial>` and, under PBT, its later `<sweep>-<trial>-at<step>`."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    base = f"{sweep}-{trial_id}"
    runs = client.search_runs(
        [exp.experiment_id],
        filter_string=(f"tags.`mlflow.parentRunId` = '{parent_run_id}' and tags.`cdm.run_name` LIKE '{base}%'"),
        order_by=["attributes.start_time DESC"],
        max_results=10_000,
    )
    return [
        r
        for r in runs
        if r.data.tags.get("cdm.run_name") == base or r.data.tags.get("cdm.run_name", "").startswith(base + "-at")
    ]


@dataclass
class TrialRow:
    trial_id: str
    run_id: str
    status: str  # completed | stopped early | failed | running (a trial still going, or never ended)
    step: Optional[int]
    value: float  # the sweep's metric, last reported (+inf when missing)
    params: dict[str, str]  # the searched settings, as MLflow params (strings)
    checkpoint: Optional[str]  # the trial's latest checkpoint folder
    error: Optional[str] = None
    metrics: dict[str, float] = field(default_factory=dict)


def trial_rows(client: Any, experiment: str, parent_run_id: str, metric: str, searched: list[str]) -> list[TrialRow]:
    """The sweep's trials, best first; failed trials and trials without the metric last."""
    rows = []
    for run in child_runs(client, experiment, parent_run_id):
        tags, metrics = run.data.tags, run.data.metrics
        value = metrics.get(metric, math.inf)
        step = tags.get("cdm.trial_step") or tags.get("cdm.final_step")
        rows.append(
            TrialRow(
                trial_id=_trial_label(tags, run.info.run_name or run.info.run_id),
                run_id=run.info.run_id,
                status=tags.get(
                    "cdm.trial_status", "running" if run.info.status == "RUNNING" else run.info.status.lower()
                ),
                step=int(step) if step else None,
                value=value if math.isfinite(value) else math.inf,
                params={k: run.data.params.get(k, "") for k in searched},
                checkpoint=tags.get("cdm.last_checkpoint"),
                error=tags.get("cdm.error"),
                metrics=dict(metrics),
            )
        )
    rows.sort(key=lambda r: (r.status == FAILED, r.value, r.trial_id))
    return rows


def _trial_label(tags: dict[str, str], fallback: str) -> str:
    """The trial id, plus `-at<step>` for a PBT trial's later runs: the run name without the sweep's."""
    sweep, name = tags.get("cdm.sweep"), tags.get("cdm.run_name", "")
    if sweep and name.startswith(sweep + "-"):
        return name[len(sweep) + 1 :]
    return tags.get("cdm.trial_id", fallback)


def best_row(rows: list[TrialRow]) -> Optional[TrialRow]:
    """The trial with the lowest metric among those that did not fail (stopped-early trials count)."""
    ok = [r for r in rows if r.status != FAILED and math.isfinite(r.value)]
    return ok[0] if ok else None


def _short(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _number(value: float) -> str:
    return "-" if not math.isfinite(value) else f"{value:.4g}"


def format_table(rows: list[TrialRow], metric: str, searched: list[str]) -> str:
    headers = ["#", "trial", "status", "step", metric, *searched]
    body = [
        [
            str(i + 1),
            r.trial_id,
            r.status,
            "-" if r.step is None else str(r.step),
            _number(r.value),
            *(_short(r.params.get(k, ""), 14) for k in searched),
        ]
        for i, r in enumerate(rows)
    ]
    widths = [max(len(h), *(len(line[i]) for line in body)) if body else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(line, widths)) for line in body]
    errors = [(i + 1, r) for i, r in enumerate(rows) if r.status == FAILED and r.error]
    for i, r in errors:
        lines.append(f"#{i} {r.trial_id} failed: {_short(r.error.strip().splitlines()[-1], 200)}")
    return "\n".join(lines)


def counts(rows: list[TrialRow]) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in rows:
        out[r.status] = out.get(r.status, 0) + 1
    return out
