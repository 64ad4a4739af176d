"""`cdm run CONFIG`: prepare → (tune →) train → sample → NLL and FD/FID as one workflow, resumable.

Each stage's output is addressed by a hash of its settings and its inputs
(`pipelines.workflow.plan`), under `<workdir>/outputs/stages/<stage>-<key>/`.
A stage whose record is already there is skipped, so running the same
command again after a failure or a kill continues at the stage that did not
finish (an interrupted training run continues from its latest checkpoint),
and running it after a success does nothing but print the summary.

A done stage whose code has changed since (stale) is skipped too, with a
warning: a training stage can cost days, so only the user re-runs it
(`--rerun STAGE`, `--rerun-stale`), and with it every stage that reads its
output. The output it replaces is moved aside, never deleted.

MLflow: one parent run per plan with a child run per stage (each stage logs
its own run, nested through `parent_run_id`), and the headline figures on
the parent: `eval/nll_bpd`, `eval/nll_bpd_untrained`, `eval/fd_<dataset>`
or `eval/fid`, and the sample grid as an artifact.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import shutil
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import ray

from pipelines.common import config as cfg
from pipelines.common import console, signals, storage
from pipelines.common.connect import check_cluster
from pipelines.common.errors import UserError
from pipelines.common.ray_session import ensure_ray
from pipelines.common.tracking import default_tracking_uri, ui_url
from pipelines.train.run_dir import RUN_FILE
from pipelines.workflow.config import WorkflowConfig, load
from pipelines.workflow.parent_run import ParentRun, workflow_dir
from pipelines.workflow.plan import Plan, Stage, make_plan
from pipelines.workflow.progress import duration
from pipelines.workflow.stages import RUNNERS, Context, check_dataset_fits, planned_train_settings

# Stages that need no Ray (the others share one Ray session, started before the first of them).
NO_RAY = ("prepare", "features")
SUMMARY_FILE = "summary.json"
GRID_FILE = "grid.png"


@dataclass
class WorkflowResult:
    name: str
    plan_key: str
    parent_run_id: Optional[str]
    tracking_uri: str
    records: dict[str, dict[str, Any]]
    ran: list[str]  # stages that ran this time (the others were skipped)
    summary: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


# --------------------------------------------------------------------------- planning


def prepare_plan(
    config_path: str | Path,
    overrides: list[str] = (),
    *,
    workdir: str | Path | None = None,
    tracking_uri: Optional[str] = None,
    strict: bool = True,
) -> tuple[Plan, str]:
    """(the plan, the MLflow tracking URI) for a workflow config file: nothing runs, nothing is written."""
    config, _ = load(config_path, list(overrides))
    name = config.name or Path(config_path).stem
    folder = str(workdir or ".")
    if "://" in folder:
        raise UserError(
            f"--workdir {folder}: must be a folder (on a cluster, a shared one such as NFS that every node "
            "mounts at the same path); stage outputs are files there"
        )
    root = Path(folder).expanduser().resolve()
    uri = tracking_uri or config.tracking.tracking_uri or default_tracking_uri(root)
    return make_plan(config, name, root, strict=strict), uri


@dataclass
class Decision:
    """What `cdm run` does with a stage: run, resume (an interrupted training), skip (done) or rerun (done, replaced)."""

    action: str
    why: str = ""
    record: Optional[dict[str, Any]] = None  # the record a skip keeps or a rerun replaces
    stale: str = ""  # for a done stage that ran on other code: what changed


def decide(plan: Plan, rerun: list[str] = (), rerun_stale: bool = False) -> dict[str, Decision]:
    """Each stage's decision, by name: the one rule the plan prints and the run follows.

    Done stages are skipped, also when they ran on other code (stale), unless the user asks: `rerun` names
    stages (or kinds: `sample` is every protocol's), `rerun_stale` takes the stale ones; a stage re-runs
    with every stage that reads it, since its input changes.
    """
    asked = _asked(plan, rerun)
    decisions: dict[str, Decision] = {}
    for stage in plan.stages:
        record = stage.record()
        if record is None:
            decisions[stage.name] = Decision(*stage_status(stage))
            continue
        stale = stage.stale(record)
        upstream = [n for n in stage.needs if n in decisions and decisions[n].action == "rerun"]
        if stage.name in asked:
            decision = Decision("rerun", "--rerun", record, stale)
        elif stale and rerun_stale:
            decision = Decision("rerun", f"stale: ran on other code, {stale} changed", record, stale)
        elif upstream:
            decision = Decision("rerun", f"reads {upstream[0]}, which re-runs", record, stale)
        elif stale:
            decision = Decision(
                "skip", f"stale: ran on other code, {stale} changed; --rerun-stale to re-run", record, stale
            )
        elif not record.get("code"):
            why = f"done, by a cdm that did not record its code; --rerun {stage.name} to re-run"
            decision = Decision("skip", why, record)
        else:
            decision = Decision("skip", "done", record)
        decisions[stage.name] = decision
    return decisions


def _asked(plan: Plan, rerun: list[str]) -> set[str]:
    """The stages `--rerun` names: a stage's name, or a kind (every stage of it)."""
    asked: set[str] = set()
    for name in rerun:
        matched = {s.name for s in plan.stages if name in (s.name, s.kind)}
        if not matched:
            raise UserError(
                f"--rerun {name}: workflow {plan.name} has no such stage; "
                f"its stages: {', '.join(s.name for s in plan.stages)}"
            )
        asked |= matched
    return asked


def stage_status(stage: Stage) -> tuple[str, str]:
    """(run | resume, why) of a stage that is not done, as things stand on disk."""
    folder = Path(stage.output)
    if stage.name == "train" and (folder / RUN_FILE).is_file():
        checkpoints = sorted(p.name for p in folder.glob("checkpoint_*") if p.is_dir())
        why = (
            f"interrupted; continues from {checkpoints[-1]}"
            if checkpoints
            else "interrupted before its first checkpoint"
        )
        started = stage.stale({"code": stage.started_code()})
        if started:
            why += f"; it started on other code ({started} changed), so it will show as stale"
        return "resume", why
    return "run", ""


def resolved_params(plan: Plan) -> dict[str, Any]:
    """The workflow config as the parent run's params, with what the workflow fills in itself (the training data
    from the prepare stage, the train stage's run folder) as it will run, not as the file wrote it."""
    params = cfg.to_dict(plan.config)
    train = next((s for s in plan.stages if s.name == "train"), None)
    if train is not None:
        params["train"] = cfg.to_dict(
            cfg.apply_overrides(plan.config.train, planned_train_settings(plan, train.output))
        )
    return params


def print_plan(
    plan: Plan, tracking_uri: str, decisions: Optional[dict[str, Decision]] = None, echo=console.echo
) -> None:
    echo(f"cdm run {plan.name}: plan {plan.key}")
    echo(f"  workdir  {plan.workdir}")
    echo(f"  MLflow   {tracking_uri} (experiment {plan.config.tracking.experiment!r})")
    echo(f"  data     {plan.dataset_uri}")
    decisions = decide(plan) if decisions is None else decisions
    width = max(len(s.name) for s in plan.stages)
    for i, stage in enumerate(plan.stages, 1):
        status, why = decisions[stage.name].action, decisions[stage.name].why
        echo(f"  {i}. {stage.name:<{width}}  {stage.key}  {status:<6}  {stage.about}{f' ({why})' if why else ''}")
        echo(f"     {'':<{width}}  → {stage.output}")
    stale = [n for n, d in decisions.items() if d.stale and d.action == "skip"]
    if stale:
        echo(
            f"  {len(stale)} done stage(s) ran on other code and are kept: --rerun-stale runs them again, "
            "--rerun STAGE one of them (each with the stages that read it)"
        )
    for problem in plan.problems:
        echo(f"  cannot run as it is: {problem}")


# --------------------------------------------------------------------------- running


def run_workflow(
    config_path: str | Path,
    overrides: list[str] = (),
    *,
    workdir: str | Path | None = None,
    tracking_uri: Optional[str] = None,
    rerun: list[str] = (),
    rerun_stale: bool = False,
    echo=console.echo,
) -> WorkflowResult:
    """Run every stage of the workflow that is not done yet, and those `rerun`/`rerun_stale` ask for again
    (see `decide`); returns the records and the summary."""
    started = time.perf_counter()
    plan, uri = prepare_plan(config_path, list(overrides), workdir=workdir, tracking_uri=tracking_uri)
    config = plan.config
    decisions = decide(plan, list(rerun), rerun_stale)
    print_plan(plan, uri, decisions, echo)
    console.place_log(workflow_dir(plan.workdir, plan.name))
    if any(stage.name not in NO_RAY and decisions[stage.name].action != "skip" for stage in plan.stages):
        check_cluster(config.train.run.ray_address, "train.run.ray_address")  # before the parent run opens
    parent = ParentRun(
        plan.workdir, plan.name, plan.key, uri, config.tracking.experiment, config.tracking.parent_run_id
    )
    parent.open(
        resolved_params(plan),
        {
            "cdm.stage": "workflow",
            "cdm.workflow": plan.name,
            "cdm.config_file": str(Path(config_path).resolve()),
            "cdm.workdir": str(plan.workdir),
        },
    )
    ctx = Context(plan, uri, config.tracking.experiment, parent.run_id, echo=echo)
    ran: list[str] = []
    status = "FAILED"
    previous_sigterm = signal.signal(signal.SIGTERM, signals.as_ctrl_c)  # `cdm jobs stop`, kill: end the runs cleanly
    data_checked = False
    try:
        set_aside_reruns(plan, decisions, parent, echo)
        for i, stage in enumerate(plan.stages, 1):
            head = f"[{i}/{len(plan.stages)}] {stage.name} {stage.key}"
            with _stage_lock(stage, echo):
                record = done_record(stage, head, echo)
                if record is not None:
                    ctx.records[stage.name] = record
                    continue
                if stage.name != "prepare" and not data_checked:
                    check_dataset_fits(ctx)  # the splits and labels later stages read: fail before training, not after
                    data_checked = True
                if stage.name not in NO_RAY:
                    _ensure_ray(config)
                echo(f"{head}: {stage.about}")
                _note_start(stage)
                record = _run_stage(stage, ctx, echo)
            parent.tag_child(record.get("mlflow_run_id"), stage.name, stage.key)
            ctx.records[stage.name] = record
            ran.append(stage.name)
            echo(f"{head}: done in {duration(record['seconds'])}{_figures(record)}")
        summary = _finish(plan, ctx, parent, uri, time.perf_counter() - started)
        status = "FINISHED"
    except (KeyboardInterrupt, SystemExit):  # Ctrl-C, or SIGTERM (ours, or Ray's handler once Ray is up)
        status = "KILLED"
        echo("interrupted: run the same command again to continue where it stopped")
        raise
    finally:
        signal.signal(signal.SIGTERM, previous_sigterm)
        parent.close(status)
    result = WorkflowResult(
        plan.name, plan.key, parent.run_id, uri, ctx.records, ran, summary, time.perf_counter() - started
    )
    print_summary(result, plan, echo)
    return result


def set_aside_reruns(plan: Plan, decisions: dict[str, Decision], parent: ParentRun, echo) -> None:
    """Before any stage runs, move aside the output and record of each stage the plan re-runs, and rename its
    MLflow child: a run killed half-way then leaves those stages to run, not old outputs beside new inputs.

    Last stage first, so a kill in between never leaves a stage done on top of one that is not. Only the
    record the plan saw is moved: one that a concurrent run wrote meanwhile is kept.
    """
    for i, stage in reversed(list(enumerate(plan.stages, 1))):
        planned = decisions[stage.name]
        if planned.action != "rerun":
            continue
        with _stage_lock(stage, echo):
            record = stage.record()
            if record is not None and record == planned.record:
                kept = _set_aside(stage)
                parent.retire_child(stage.name)
                head = f"[{i}/{len(plan.stages)}] {stage.name} {stage.key}"
                echo(f"{head}: re-runs ({planned.why}); the earlier output is kept in {kept}")


def done_record(stage: Stage, head: str, echo) -> Optional[dict[str, Any]]:
    """The record of a stage to skip, as things stand now (under its lock), with a warning if it ran on other
    code; None when it is to run."""
    record = stage.record()
    if record is not None:
        stale = stage.stale(record)
        if stale:
            echo(
                f"{head}: warning: ran on other code ({stale} changed), kept as it is; "
                f"--rerun {stage.name} or --rerun-stale re-runs it"
            )
        else:
            echo(f"{head}: done earlier ({duration(record.get('seconds', 0))}), skipped")
    return record


def _run_stage(stage: Stage, ctx: Context, echo) -> dict[str, Any]:
    """Run one stage and write its record (the mark that it is done) atomically beside its output."""
    t0 = time.perf_counter()
    try:
        record = RUNNERS[stage.kind](stage, ctx)
    except (Exception, KeyboardInterrupt) as err:
        if not isinstance(err, UserError):
            echo(f"stage {stage.name} failed after {duration(time.perf_counter() - t0)}: {type(err).__name__}: {err}")
            echo("run the same command again to continue at this stage (finished stages are kept)")
        raise
    return write_record(stage, record, time.perf_counter() - t0)


def _note_start(stage: Stage) -> None:
    """Write the code a stage starts on, unless it resumes (then the first start's stays)."""
    if stage_status(stage)[0] == "resume" and stage.started_code() is not None:
        return
    storage.write_json(str(stage.started_file), {"code": stage.code.as_record() if stage.code else None})


def write_record(stage: Stage, result: dict[str, Any], seconds: float) -> dict[str, Any]:
    """The finished stage's record, written atomically beside its output, with the code that computed it: the code
    it started on, if a resumed training started on other code (so that it shows as stale)."""
    code = stage.started_code() or (stage.code.as_record() if stage.code else None)
    record = {
        "stage": stage.name,
        "key": stage.key,
        "output": stage.output,
        "settings": stage.settings,
        "inputs": stage.inputs,
        "seconds": seconds,
        "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
        "code": code,
        **result,
    }
    storage.write_json(str(stage.record_file), record)
    stage.started_file.unlink(missing_ok=True)
    return record


def _set_aside(stage: Stage) -> Path:
    """Move a done stage's output and record to `<stage>-<key>.replaced-<time>[.json]` before it re-runs.

    The output first: a kill in between leaves a record without its output, which counts as not done.
    """
    kept = Path(f"{stage.output}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
    Path(stage.output).rename(kept)
    stage.record_file.rename(f"{kept}.json")
    return kept


@contextlib.contextmanager
def _stage_lock(stage: Stage, echo) -> Iterator[None]:
    """Hold `<stage>-<key>.lock`: two workflows sharing a stage (same key) never write its output at once.

    The second one waits, then finds the record the first one wrote and skips the stage.
    """
    lock_file = Path(f"{stage.output}.lock")
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            echo(f"  waiting: another cdm run is running stage {stage.name} {stage.key} (same settings, same inputs)")
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _ensure_ray(config: WorkflowConfig) -> None:
    """One Ray session for every stage: RAY_ADDRESS / train.run.ray_address, else a local Ray (as `cdm train` starts it)."""
    s = config.train.scaling
    ensure_ray(
        config.train.run.ray_address, min_cpus=s.num_workers * s.cpus_per_worker + 1, num_cpus=config.ray.num_cpus
    )
    # Ray Data's progress lines every few seconds would drown the workflow's own progress.
    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)


def _figures(record: dict[str, Any]) -> str:
    metrics = record.get("metrics") or {}
    shown = [f"{k} {v:.4g}" for k, v in metrics.items() if k.startswith(("eval/", "val/nll", "features/"))]
    return f" ({', '.join(shown)})" if shown else ""


# --------------------------------------------------------------------------- the end: headline figures and summary


def _finish(plan: Plan, ctx: Context, parent: ParentRun, uri: str, seconds: float) -> dict[str, Any]:
    records = ctx.records
    have = parent.children_by_stage()
    for stage in plan.stages:
        if stage.name not in have:
            parent.add_cached_child(stage.name, stage.key, records[stage.name])
    metrics: dict[str, float] = {}
    for record in records.values():
        metrics.update({k: float(v) for k, v in (record.get("metrics") or {}).items()})
    metrics.update({f"workflow/{name}_seconds": float(r.get("seconds", 0)) for name, r in records.items()})
    folder = workflow_dir(plan.workdir, plan.name)
    folder.mkdir(parents=True, exist_ok=True)
    grid = None
    samples = [s.name for s in plan.stages if s.kind == "sample"]
    if samples and records[samples[0]]["outputs"].get("grid"):
        grid = str(folder / GRID_FILE)
        shutil.copyfile(records[samples[0]]["outputs"]["grid"], grid)
    fids = {s.protocol: records[s.name].get("summary") for s in plan.stages if s.kind == "fid"}
    fid = fids.pop("", None) or {}
    summary = {
        "workflow": plan.name,
        "plan": plan.key,
        "workdir": str(plan.workdir),
        "tracking_uri": uri,
        "experiment": plan.config.tracking.experiment,
        "parent_run_id": parent.run_id,
        "dataset": plan.dataset_uri,
        "metrics": metrics,
        "grid": grid,
        "nll": records.get("nll", {}).get("summary"),
        "nll_untrained": records.get("nll_untrained", {}).get("summary"),
        "fid": fid or None,
        "fid_by_protocol": fids or None,
        "stages": {
            s.name: {
                "key": s.key,
                "output": s.output,
                "seconds": records[s.name].get("seconds"),
                "mlflow_run_id": records[s.name].get("mlflow_run_id"),
            }
            for s in plan.stages
        },
        "checkpoint": records.get("train", {}).get("outputs", {}).get("checkpoint"),
    }
    storage.write_json(str(folder / SUMMARY_FILE), summary)
    parent.log_headline(metrics, [grid, str(folder / SUMMARY_FILE)])
    return summary


def print_summary(result: WorkflowResult, plan: Plan, echo=console.echo) -> None:
    s = result.summary
    m = s.get("metrics", {})
    skipped = len(plan.stages) - len(result.ran)
    echo("")
    echo(
        f"cdm run {result.name}: finished in {duration(result.seconds)} "
        f"({len(result.ran)} stage(s) run, {skipped} skipped as done)"
    )
    nll, base = s.get("nll"), s.get("nll_untrained")
    if nll:
        line = (
            f"  NLL, {nll['split']} split ({nll['count']} images): {nll['nll_bpd']:.3f} ± {nll['nll_bpd_ci95']:.3f} "
            f"bits/dim"
        )
        if base:
            line += f"   (untrained network: {base['nll_bpd']:.3f})"
        echo(line + f"   [{nll['bpd_convention']} convention, one forward pass per image]")
        others = {c: v for c, v in (nll.get("nll_bpd_by_convention") or {}).items() if c != nll["bpd_convention"]}
        if others:
            echo("  the same NLL in " + ", ".join(f"the {c} convention: {v:.3f}" for c, v in others.items()))
        if (nll.get("consistency") or {}).get("reading"):
            echo(f"  {nll['consistency']['reading']}")
    elif base:
        echo(f"  NLL of the untrained network: {base['nll_bpd']:.3f} bits/dim")
    fids = {"": s["fid"]} if s.get("fid") else {}
    fids.update(s.get("fid_by_protocol") or {})
    for protocol, fid in fids.items():
        metric = fid["metric"]
        if metric == "eval/fid":
            what = "FID (Inception-v3 features)"
        elif metric.startswith("eval/fd_") and metric != "eval/fd_raw":
            what = f"FD in the features of a classifier trained on {metric[len('eval/fd_') :]} ({metric}; not FID)"
        else:
            what = f"FD of the raw data ({metric})"
        if protocol:
            what = f"{what}, {protocol}"
        echo(
            f"  {what}: {fid['value']:.3f}   ({fid['samples_count']} samples vs {fid['reference_count']} reference images)"
        )
    if s.get("grid"):
        echo(f"  sample grid: {s['grid']}")
    if s.get("checkpoint"):
        echo(f"  model: {s['checkpoint']}")
    echo(
        f"  MLflow: parent run {result.parent_run_id} ({result.name!r}, experiment {plan.config.tracking.experiment!r}) "
        f"in {result.tracking_uri}"
    )
    echo(f"  open the UI: {_ui_hint(plan.workdir, result.tracking_uri, plan.config.tracking.experiment)}")
    echo(f"  summary: {workflow_dir(plan.workdir, plan.name) / SUMMARY_FILE}")
    if m:
        times = ", ".join(
            f"{k.split('/', 1)[1].removesuffix('_seconds')} {duration(v)}"
            for k, v in m.items()
            if k.startswith("workflow/")
        )
        echo(f"  stage times (when they ran): {times}")


def _ui_hint(workdir: Path, tracking_uri: str, experiment: str) -> str:
    if tracking_uri.startswith(("http://", "https://")):
        return f"open {ui_url(tracking_uri, experiment)} in a browser"
    if tracking_uri != default_tracking_uri(workdir):
        return f"mlflow ui --backend-store-uri {tracking_uri}"
    here = Path.cwd().resolve() == workdir
    return f"cdm ui{'' if here else f' --workdir {workdir}'}, then {ui_url(tracking_uri, experiment)}"
