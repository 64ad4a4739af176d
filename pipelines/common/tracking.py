"""MLflow tracking shared by every stage: where the store is, and one run per stage.

MLflow 3.x deprecates the file store, so the default is a SQLite database in the
work directory with artifacts in `mlartifacts/` beside it (the same layout
`mlflow server` uses). `MLFLOW_TRACKING_URI` or an explicit URI points the
stages at a tracking server instead.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import subprocess
import time
import warnings
from collections.abc import Iterator, Mapping
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import mlflow
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import Param
from mlflow.tracking import MlflowClient
from mlflow.types import ColSpec, Schema

from pipelines.common import storage
from pipelines.common.config import TrackingSection
from pipelines.common.connect import check_tracking_server
from pipelines.common.errors import UserError

# MLflow rejects longer parameter values (mlflow.utils.validation.MAX_PARAM_VAL_LENGTH).
_MAX_PARAM_LENGTH = 6000
# and more than this many params/tags in one log_batch call.
_BATCH = 100


# A SQLite store makes a writer wait up to 20 s for another's lock (MLflow's setting), then fails the write.
# Writers that must not lose a write (the training loop, a sweep's tracker) keep trying, backing off, this long.
LOCKED_RETRY_S = 300.0


def _locked(err: BaseException) -> bool:
    return "database is locked" in str(err)


class PatientClient:
    """An `MlflowClient` whose calls are tried again while a SQLite store says it is locked.

    Many processes write to one SQLite file when `cdm tune` runs trials side by side; a lock held
    longer than SQLite's wait (a long query from the UI, a copy of the file, a slow shared disk)
    would otherwise fail a training step's metrics and with them the run.
    """

    def __init__(self, tracking_uri: str, retry_s: float = LOCKED_RETRY_S):
        self._client = MlflowClient(tracking_uri=tracking_uri)
        self._retry_s = retry_s

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._client, name)
        if not callable(method):
            return method

        def patient(*args: Any, **kwargs: Any) -> Any:
            deadline, delay = time.monotonic() + self._retry_s, 0.5
            while True:
                try:
                    return method(*args, **kwargs)
                except Exception as err:  # MLflow wraps sqlite3.OperationalError in MlflowException
                    if not _locked(err) or time.monotonic() > deadline:
                        raise
                    time.sleep(delay)
                    delay = min(2 * delay, 10.0)

        return patient


# Stores MLflow opens (a dialect such as postgresql+psycopg2 counts as its base); any other scheme is a typo.
_SCHEMES = {"", "file", "sqlite", "postgresql", "mysql", "mssql", "http", "https", "databricks", "databricks-uc", "uc"}
_SETTING = "tracking.tracking_uri / --tracking-uri / MLFLOW_TRACKING_URI"


def open_store(tracking_uri: str, experiment: str | None = None) -> MlflowClient:
    """A client of the store at `tracking_uri`, once the store has answered; the one place a store is opened.

    Every way it cannot be (an unknown scheme, a server that does not answer, a damaged SQLite file, an
    empty experiment name) is one UserError naming the store and the fix, before any run is opened.
    """
    if experiment is not None and not experiment.strip():
        raise UserError("tracking.experiment: empty; name the MLflow experiment (cdm's default is 'cdm')")
    scheme = tracking_uri.split("://", 1)[0].split("+", 1)[0].lower() if "://" in tracking_uri else ""
    if scheme not in _SCHEMES:
        raise UserError(
            f"tracking URI {tracking_uri!r}: MLflow has no store of the kind '{scheme}'; give sqlite:///PATH, "
            f"http(s)://HOST:PORT (an MLflow server) or a database URI such as postgresql://… in {_SETTING}"
        )
    if scheme in ("http", "https"):
        check_tracking_server(tracking_uri)
    try:
        client = MlflowClient(tracking_uri=tracking_uri)
        deadline = time.monotonic() + LOCKED_RETRY_S
        while True:  # a store locked by another writer is busy, not broken
            try:
                client.search_experiments(max_results=1)
                return client
            except Exception as err:
                if not _locked(err) or time.monotonic() > deadline:
                    raise
                time.sleep(1.0)
    except Exception as err:
        cause = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if scheme == "sqlite" and re.search(r"not a database|malformed|DatabaseError", f"{type(err).__name__} {err}"):
            raise UserError(
                f"{tracking_uri}: the MLflow store is damaged ({cause.removeprefix('(sqlite3.DatabaseError) ')}); "
                f"move that file aside (cdm then starts a new store there) or name another store in {_SETTING}"
            ) from None
        raise UserError(
            f"tracking URI {tracking_uri}: MLflow cannot open this store ({type(err).__name__}: {cause[:300]}); "
            f"check {_SETTING}"
        ) from None


def default_tracking_uri(workdir: str | os.PathLike = ".") -> str:
    """`MLFLOW_TRACKING_URI` if set, else `sqlite:///<absolute workdir>/mlflow.db`."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{Path(workdir).resolve() / 'mlflow.db'}"


def store_uri(tracking: TrackingSection) -> str:
    """The MLflow store a stage with these settings logs to."""
    return tracking.tracking_uri or default_tracking_uri(tracking.workdir)


def folder_recorded_by_run(value: str, tag: str, *, tracking_uri: str | None, label: str, kind: str) -> str | None:
    """If `value` looks like an MLflow run id: the folder that run recorded in tag `tag`; else None.

    For commands that take a stage's folder or its MLflow run id (`cdm train --resume`, `--from-best`).
    A run id that is not in the store, or whose run is not `kind`, is a UserError starting with `label`.
    """
    if not re.fullmatch(r"[0-9a-f]{32}", value):
        return None
    try:
        tags = MlflowClient(tracking_uri or default_tracking_uri()).get_run(value).data.tags
    except Exception as err:
        raise UserError(f"{label}: no such MLflow run ({type(err).__name__})") from None
    if tag not in tags:
        raise UserError(f"{label}: that MLflow run is not {kind} (no {tag} tag)")
    return tags[tag]


def artifact_location_for(tracking_uri: str) -> str | None:
    """`<dir of the db>/mlartifacts` for a local SQLite store; None (server default) otherwise."""
    prefix = "sqlite:///"
    if tracking_uri.startswith(prefix):
        db = Path(tracking_uri[len(prefix) :])
        if db.is_absolute():  # sqlite:////abs/path → "/abs/path"; sqlite:///rel → "rel"
            return (db.parent / "mlartifacts").as_uri()
        return (Path.cwd() / db).parent.joinpath("mlartifacts").resolve().as_uri()
    return None


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested dicts become dotted keys (`model.channels`); values become strings MLflow accepts."""
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_params(value, prefix=f"{name}."))
            continue
        text = "None" if value is None else str(value)
        if len(text) > _MAX_PARAM_LENGTH:
            text = text[: _MAX_PARAM_LENGTH - 3] + "..."
        flat[name] = text
    return flat


def log_params(client: Any, run_id: str, params: Mapping[str, Any]) -> None:
    """`params` (flattened) on run `run_id`, in batches of the size MLflow accepts."""
    flat = [Param(k, v) for k, v in flatten_params(params).items()]
    for start in range(0, len(flat), _BATCH):
        client.log_batch(run_id, params=flat[start : start + _BATCH])


# MLflow 3's UI opens an experiment in its GenAI view (traces, token usage) unless the experiment's kind
# says otherwise or the address asks for the model-training view; cdm's experiments say so, and its URLs ask.
EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND = "mlflow.experimentKind", "custom_model_development"
WORKFLOW_TYPE_QUERY = "workflowType=machine_learning"
# The UI shows this tag as the experiment's or the run's description.
DESCRIPTION_TAG = "mlflow.note.content"
EXPERIMENT_DESCRIPTION = (
    "Classification diffusion models (Yadin, Elata, Michaeli, NeurIPS 2024) trained, tuned and evaluated by `cdm`. "
    "Each `cdm run` is a parent run with a child per stage (prepare, train, sample, nll, fid); compare train runs "
    "on val/nll_bpd, evaluation runs on eval/nll_bpd and eval/fd_*."
)
_STAGE_DESCRIPTIONS = {
    "prepare": "Real data written as WebDataset shards (cdm prepare); the dataset is this run's input.",
    "train": "A CDM (or the DDM baseline) trained with Ray Train (cdm train): train/* and val/* curves, "
    "sample grids, checkpoints and the EMA model.",
    "tune": "A Ray Tune sweep (cdm tune): one child run per trial.",
    "sample": "Samples drawn from a trained model on Ray workers (cdm sample); grid.png holds the first ones.",
    "nll": "Test-set likelihood of a trained model in bits/dim (cdm nll), one forward pass per image.",
    "ood": "Likelihood-based out-of-distribution detection (cdm ood): AUROC.",
    "fid": "Fréchet distance between samples and reference images (cdm fid).",
    "classify": "A class-conditional CDM as an exact Bayes classifier (cdm classify).",
    "train-features": "The small classifier whose features define fd_<dataset> (cdm train-features).",
    "workflow": "A whole pipeline (cdm run): a child run per stage; the headline figures are on the children.",
}


def stage_description(tags: Mapping[str, Any]) -> str | None:
    """A run's short description from its `cdm.stage` tag (and what it names), or None for other runs."""
    about = _STAGE_DESCRIPTIONS.get(str(tags.get("cdm.stage", "")))
    if about is None:
        return None
    details = [f"{label}: {tags[key]}" for key, label in _DESCRIBED_TAGS if tags.get(key)]
    return about + ("  \n" + "; ".join(details) if details else "")


_DESCRIBED_TAGS = (
    ("cdm.workflow", "workflow"),
    ("cdm.dataset", "data"),
    ("cdm.model_kind", "model"),
    ("cdm.checkpoint", "checkpoint"),
    ("cdm.train_run_id", "trained in run"),
    ("cdm.output", "output"),
)


def version_tags() -> dict[str, str]:
    """`cdm.version`, and the git commit of the cdm checkout when cdm runs from one (MLflow's own tag name)."""
    tags = {}
    try:
        tags["cdm.version"] = version("cdm")
    except PackageNotFoundError:
        pass
    commit = _git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    return tags


def _git_commit() -> str | None:
    here = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    commit = out.stdout.strip()
    return commit if out.returncode == 0 and re.fullmatch(r"[0-9a-f]{40}", commit) else None


# Where a stage's dataset is used, as the UI's Dataset column and filter show it.
_DATASET_CONTEXT = {"train": "training", "tune": "training", "train-features": "training"}


def dataset_input(uri: str) -> MetaDataset | None:
    """A prepared dataset (its `dataset.json`) as an MLflow dataset; None if `uri` holds no dataset.json.

    The digest is the SHA-256 of the shards' SHA-256s (the dataset.json records one per shard), so two runs
    show the same digest exactly when they read the same bytes.
    """
    try:
        meta = storage.read_json(storage.join(uri, "dataset.json"))
    except Exception:  # an unreadable or odd location: the run goes on without the input
        return None
    if not isinstance(meta, dict) or not isinstance(meta.get("splits"), dict):
        return None
    hashes = [
        f"{split}/{shard.get('name')}:{shard.get('sha256')}"
        for split, info in sorted(meta["splits"].items())
        for shard in info.get("shards", [])
    ]
    digest = hashlib.sha256("\n".join(hashes).encode()).hexdigest()[:32]
    sample = meta.get("sample") or {}
    columns = [ColSpec("string", "__key__"), ColSpec("binary", sample.get("encoding") or "png")]
    if sample.get("labeled"):
        columns.append(ColSpec("long", "cls"))
    location = uri if storage.is_uri(uri) else str(Path(uri).resolve())
    with warnings.catch_warnings():  # "can be interpreted in multiple ways": MLflow registers the local source twice
        warnings.simplefilter("ignore", UserWarning)
        source = resolve_dataset_source(location)
    dataset = MetaDataset(
        source,
        name=f"{meta.get('source', 'dataset')}:{location.rstrip('/').rsplit('/', 1)[-1]}",
        digest=digest,
        schema=Schema(columns),
    )
    return dataset


def _log_dataset(tags: Mapping[str, str]) -> None:
    """Log the stage's dataset as an input of the active run (the one `mlflow_run` has just started)."""
    uri, stage = tags.get("cdm.dataset"), tags.get("cdm.stage")
    # prepare writes its dataset; a workflow's children log theirs
    if not uri or stage in (None, "prepare", "workflow"):
        return
    found = dataset_input(uri)
    if found is not None:
        mlflow.log_input(found, context=_DATASET_CONTEXT.get(stage, "evaluation"))


def _scored_model(tags: Mapping[str, str]) -> dict[str, str]:
    """An evaluation run's model as params (so comparing two `nll` runs shows which checkpoints differ)."""
    named = {"scored.checkpoint": tags.get("cdm.checkpoint"), "scored.train_run_id": tags.get("cdm.train_run_id")}
    return {k: v for k, v in named.items() if v and tags.get("cdm.stage") != "train"}


def _ensure_experiment(client: Any, name: str, tracking_uri: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        if experiment.lifecycle_stage == "deleted":
            client.restore_experiment(experiment.experiment_id)
        if EXPERIMENT_KIND_TAG not in experiment.tags:  # made by an older cdm, or by hand
            _describe_experiment(client, experiment.experiment_id, experiment.tags)
        return experiment.experiment_id
    try:
        experiment_id = client.create_experiment(name, artifact_location=artifact_location_for(tracking_uri))
    except Exception:
        # Another process created it between our lookup and create.
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id
    _describe_experiment(client, experiment_id, {})
    return experiment_id


def _describe_experiment(client: Any, experiment_id: str, tags: Mapping[str, str]) -> None:
    client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND)
    if DESCRIPTION_TAG not in tags:
        client.set_experiment_tag(experiment_id, DESCRIPTION_TAG, EXPERIMENT_DESCRIPTION)


def ui_url(tracking_uri: str, experiment: str, base: str = "http://127.0.0.1:5000") -> str:
    """The address that opens `experiment`'s runs in the UI's model-training view.

    `base` is where `cdm ui` serves a local store; a tracking server's own address is used for an
    http(s) store. Without the experiment in the store yet, the experiments list.
    """
    if tracking_uri.startswith(("http://", "https://")):
        base = tracking_uri
    base = base.rstrip("/")
    try:
        found = MlflowClient(tracking_uri=tracking_uri).get_experiment_by_name(experiment)
    except Exception:  # an unreachable server or a store not created yet
        found = None
    if found is None:
        return f"{base}/#/experiments?{WORKFLOW_TYPE_QUERY}"
    return f"{base}/#/experiments/{found.experiment_id}/runs?{WORKFLOW_TYPE_QUERY}"


def experiment_id(name: str, tracking_uri: str) -> str:
    """The id of MLflow experiment `name` in the store, created (artifacts as `artifact_location_for` says) if missing."""
    return _ensure_experiment(open_store(tracking_uri, name), name, tracking_uri)


@contextlib.contextmanager
def using_tracking_uri(tracking_uri: str) -> Iterator[None]:
    """MLflow's fluent API (`mlflow.log_*`) on `tracking_uri` for the block, and as before after it.

    `mlflow.set_tracking_uri` also writes MLFLOW_TRACKING_URI into os.environ, which
    `default_tracking_uri` honours: left there, one stage's store would become the next
    stage's default in a long-lived process (a notebook calling stages with different
    workdirs, a test session).
    """
    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(tracking_uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before)  # None unsets the variable


@contextlib.contextmanager
def mlflow_run(
    experiment: str,
    run_name: str,
    tracking_uri: str,
    params: Mapping[str, Any] | None = None,
    tags: Mapping[str, Any] | None = None,
    parent_run_id: str | None = None,
    description: str | None = None,
) -> Iterator[Any]:
    """Start an MLflow run, log `params` (flattened), yield the active run.

    The run carries the cdm version and git commit tags, and `description` (default: what its
    `cdm.stage` tag says the stage does) as the UI's description.

    The run is nested under `parent_run_id` when given (or under a run already
    active in this process). It always ends: FAILED if an exception escapes the
    block, FINISHED otherwise — never left RUNNING.
    """
    client = open_store(tracking_uri, experiment)
    with using_tracking_uri(tracking_uri):
        experiment_id = _ensure_experiment(client, experiment, tracking_uri)
        nested = parent_run_id is not None or mlflow.active_run() is not None
        all_tags = {**version_tags(), **{str(k): str(v) for k, v in (tags or {}).items()}}
        run = mlflow.start_run(
            experiment_id=experiment_id,
            run_name=run_name,
            nested=nested,
            parent_run_id=parent_run_id,
            tags=all_tags,
            description=description if description is not None else stage_description(all_tags),
            # CPU, memory (and GPU with pynvml) every 10 s beside the curves: only training runs are long enough.
            log_system_metrics=all_tags.get("cdm.stage") == "train" and os.environ.get("CDM_SYSTEM_METRICS") != "0",
        )
        run_id = run.info.run_id
        status = "FAILED"
        try:
            log_params(client, run_id, {**_scored_model(all_tags), **(params or {})})
            _log_dataset(all_tags)
            yield run
            status = "FINISHED"
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM (`cdm jobs stop`): the run was stopped, it did not fail
            status = "KILLED"
            raise
        finally:
            active = mlflow.active_run()
            if active is not None and active.info.run_id == run_id:
                mlflow.end_run(status=status)
            else:  # the block ended our run itself, or left a child run active on top of it
                client.set_terminated(run_id, status=status)


@contextlib.contextmanager
def reopened_run(tracking_uri: str, run_id: str) -> Iterator[Any]:
    """Continue an existing MLflow run (a resumed stage); it ends FAILED if an exception escapes, FINISHED otherwise."""
    open_store(tracking_uri)
    with using_tracking_uri(tracking_uri):
        run = mlflow.start_run(run_id=run_id)
        status = "FAILED"
        try:
            yield run
            status = "FINISHED"
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM (`cdm jobs stop`): the run was stopped, it did not fail
            status = "KILLED"
            raise
        finally:
            mlflow.end_run(status=status)
