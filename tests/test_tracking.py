"""pipelines.common.tracking against a real MLflow SQLite store in a temp dir."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

mlflow = pytest.importorskip("mlflow")

from pipelines.common.tracking import default_tracking_uri, flatten_params, mlflow_run  # noqa: E402


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("mlflow")
    return workdir, f"sqlite:///{workdir / 'mlflow.db'}"


def _client(uri):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def test_default_tracking_uri(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert default_tracking_uri(tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    monkeypatch.chdir(tmp_path)
    assert default_tracking_uri("sub") == f"sqlite:///{tmp_path.resolve()}/sub/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert default_tracking_uri(tmp_path) == "http://127.0.0.1:5000"


def test_a_stage_leaves_the_next_stage_its_own_default_store(store, tmp_path, monkeypatch):
    # mlflow.set_tracking_uri writes MLFLOW_TRACKING_URI into os.environ; a finished stage must take it back,
    # or a notebook running a second stage in another workdir would track into the first one's store.
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with mlflow_run("cdm", "first", store[1]):
        assert mlflow.get_tracking_uri() == store[1]
    assert "MLFLOW_TRACKING_URI" not in os.environ
    assert default_tracking_uri(tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")  # the user's own setting survives
    with mlflow_run("cdm", "second", store[1]):
        pass
    assert default_tracking_uri(tmp_path) == "http://127.0.0.1:5000"


def test_flatten_params():
    flat = flatten_params({"a": 1, "model": {"ch": 32, "mult": [1, 2]}, "none": None, "long": "x" * 7000})
    assert flat["a"] == "1" and flat["model.ch"] == "32" and flat["model.mult"] == "[1, 2]"
    assert flat["none"] == "None" and len(flat["long"]) == 6000


def test_run_finished_with_params_tags_and_artifact_location(store):
    workdir, uri = store
    with mlflow_run("exp-a", "ok", uri, params={"lr": 2e-4, "net": {"ch": 8}}, tags={"cdm.stage": "t"}) as run:
        mlflow.log_metric("train/loss", 1.5, step=0)
        run_id = run.info.run_id
    got = _client(uri).get_run(run_id)
    assert got.info.status == "FINISHED"
    assert got.data.params == {"lr": "0.0002", "net.ch": "8"}
    assert got.data.tags["cdm.stage"] == "t" and got.info.run_name == "ok"
    assert got.data.metrics["train/loss"] == 1.5
    experiment = _client(uri).get_experiment_by_name("exp-a")
    assert experiment.artifact_location == (Path(workdir) / "mlartifacts").as_uri()
    assert mlflow.active_run() is None


def test_run_failed_when_exception_escapes(store):
    _, uri = store
    with pytest.raises(RuntimeError, match="boom"):
        with mlflow_run("exp-a", "bad", uri) as run:
            run_id = run.info.run_id
            raise RuntimeError("boom")
    assert _client(uri).get_run(run_id).info.status == "FAILED"
    assert mlflow.active_run() is None
    # The next run starts cleanly (nothing left active).
    with mlflow_run("exp-a", "after", uri) as run:
        pass
    assert _client(uri).get_run(run.info.run_id).info.status == "FINISHED"


def test_keyboard_interrupt_also_ends_run(store):
    _, uri = store
    with pytest.raises(KeyboardInterrupt):
        with mlflow_run("exp-a", "interrupted", uri) as run:
            run_id = run.info.run_id
            raise KeyboardInterrupt
    assert _client(uri).get_run(run_id).info.status == "KILLED"  # stopped, not failed


def test_nested_under_parent(store):
    _, uri = store
    with mlflow_run("exp-b", "parent", uri) as parent:
        parent_id = parent.info.run_id
    # A child started later (e.g. by a workflow step in another process) with an explicit parent id.
    with mlflow_run("exp-b", "child", uri, parent_run_id=parent_id) as child:
        child_id = child.info.run_id
    got = _client(uri).get_run(child_id)
    assert got.data.tags["mlflow.parentRunId"] == parent_id
    assert got.info.status == "FINISHED"
    # Also nested while the parent is active in this process.
    with mlflow_run("exp-b", "outer", uri) as outer:
        with mlflow_run("exp-b", "inner", uri, parent_run_id=outer.info.run_id) as inner:
            inner_id = inner.info.run_id
        assert mlflow.active_run().info.run_id == outer.info.run_id
    assert _client(uri).get_run(inner_id).data.tags["mlflow.parentRunId"] == outer.info.run_id
    assert _client(uri).get_run(outer.info.run_id).info.status == "FINISHED"


def test_a_locked_store_delays_training_metrics_and_loses_none(tmp_path):
    """Another process holds the SQLite store's write lock longer than SQLite waits (20 s in MLflow).

    A bare client's write fails "database is locked"; the training loop's RunLogger writes the same
    metrics in the same window, waits the lock out and loses nothing. A write that fails for any
    other reason is not tried again.
    """
    import sqlite3
    import threading
    import time

    from mlflow.entities import Metric
    from mlflow.exceptions import MlflowException

    from pipelines.common.tracking import PatientClient
    from pipelines.train.run_logger import RunLogger

    db = tmp_path / "mlflow.db"
    uri = f"sqlite:///{db}"
    client = _client(uri)
    exp = client.create_experiment("locked", artifact_location=(tmp_path / "art").as_uri())
    bare_run, patient_run = (client.create_run(exp).info.run_id for _ in range(2))
    logger = RunLogger(uri, patient_run)
    logger.metrics({"train/loss": 1.0}, step=1)

    held, hold_s = threading.Event(), 23.0

    def hold_lock():
        conn = sqlite3.connect(db, isolation_level=None)
        conn.execute("BEGIN EXCLUSIVE")
        held.set()
        time.sleep(hold_s)
        conn.execute("COMMIT")
        conn.close()

    outcome: dict = {}

    def bare_write():
        try:
            _client(uri).log_batch(bare_run, metrics=[Metric("train/loss", 2.0, int(time.time() * 1000), 2)])
            outcome["bare"] = "written"
        except MlflowException as err:
            outcome["bare"] = str(err)

    holder = threading.Thread(target=hold_lock)
    holder.start()
    assert held.wait(10)
    began = time.monotonic()
    bare = threading.Thread(target=bare_write)
    bare.start()
    logger.metrics({"train/loss": 2.0, "train/lr": 1e-3}, step=2)
    waited = time.monotonic() - began
    bare.join()
    holder.join()

    assert "database is locked" in outcome["bare"], outcome
    assert waited > 20.0, f"the write went through a held lock after {waited:.1f} s"
    history = client.get_metric_history(patient_run, "train/loss")
    assert [(m.step, m.value) for m in history] == [(1, 1.0), (2, 2.0)]
    assert [m.value for m in client.get_metric_history(patient_run, "train/lr")] == [1e-3]
    assert client.get_metric_history(bare_run, "train/loss") == []

    began = time.monotonic()
    with pytest.raises(MlflowException, match="not found"):
        PatientClient(uri).get_run("0" * 32)
    assert time.monotonic() - began < 5.0


def test_a_stages_dataset_is_logged_as_its_input(store, tmp_path):
    # mlflow.log_input with MLflow's own dataset entity: the run's Dataset column and filter in the UI.
    import json

    data = tmp_path / "digits16"
    data.mkdir()
    shards = [{"name": "train-000000.tar", "sha256": "ab" * 32}]
    meta = {"source": "digits", "splits": {"train": {"shards": shards}}, "sample": {"encoding": "png", "labeled": True}}
    (data / "dataset.json").write_text(json.dumps(meta))
    with mlflow_run("exp-data", "trained", store[1], tags={"cdm.stage": "train", "cdm.dataset": str(data)}) as run:
        run_id = run.info.run_id
    with mlflow_run("exp-data", "scored", store[1], tags={"cdm.stage": "nll", "cdm.dataset": str(tmp_path)}) as run:
        unlogged = run.info.run_id  # no dataset.json there: the run goes on without an input
    inputs = _client(store[1]).get_run(run_id).inputs.dataset_inputs
    assert len(inputs) == 1 and inputs[0].dataset.name == "digits:digits16" and len(inputs[0].dataset.digest) == 32
    assert {t.key: t.value for t in inputs[0].tags}["mlflow.data.context"] == "training"
    assert data.resolve().as_posix() in inputs[0].dataset.source
    assert _client(store[1]).get_run(unlogged).inputs.dataset_inputs == []
