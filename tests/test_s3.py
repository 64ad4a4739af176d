"""Shared storage for real: shards, checkpoints and MLflow artifacts on s3:// against a local S3 server.

A moto server (`python -m moto.server`, a separate process) on 127.0.0.1 stands in for the bucket;
the endpoint and credentials reach every process the standard way (AWS_ENDPOINT_URL,
AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY in the environment the Ray nodes are started with). The Ray
cluster has two nodes with different temporary folders, and every path the chain uses is in the
bucket, so nothing passes from one stage to the next through the local disk. MLflow is a real
`mlflow server` whose artifacts go to `s3://…/mlartifacts`.
"""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pytest
from conftest import ROOT, cli_in_process, free_port, leave_suite_ray, two_ray_nodes

ray = pytest.importorskip("ray")

BUCKET = "cdm-s3-test"
CDM = str(Path(sys.executable).with_name("cdm"))
SECRET = "cdm-test-secret-never-printed"


def _wait_http(port: int, process: subprocess.Popen, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{what} did not listen on {port} within {timeout} s")


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, 15)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)
            process.wait()


class _Plug:
    """A TCP relay in front of the S3 server that can be pulled: `cut()` drops every connection and stops
    listening (to a client the store is gone: connection refused), `restore()` listens again. The server
    behind it keeps its objects, so what the failed run left in the bucket can be inspected afterwards."""

    def __init__(self, target: int):
        self.target, self.port, self.lock, self.conns = target, free_port(), threading.Lock(), set()
        self.restore()

    def restore(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(128)
        self.listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
                upstream = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                return
            with self.lock:
                self.conns |= {client, upstream}
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(1 << 16):
                b.sendall(data)
        except OSError:
            pass
        finally:
            self._close(a, b)

    def _close(self, *socks: socket.socket) -> None:
        for sock in socks:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
            with self.lock:
                self.conns.discard(sock)

    def cut(self) -> None:
        self._close(self.listener)
        with self.lock:
            live = list(self.conns)
        self._close(*live)


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server with one bucket; the AWS_* variables point this process (and the Ray nodes it starts) at it.

    The suite's Ray goes first: the module's own cluster must start with the AWS_* variables, and the first
    tests check that a refused store is reported before any Ray starts."""
    leave_suite_ray()
    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    _wait_http(port, server, "moto server")
    plug = _Plug(port)
    endpoint = f"http://127.0.0.1:{plug.port}"  # every client goes through the plug
    env = {
        "AWS_ENDPOINT_URL": endpoint,
        "MLFLOW_S3_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "cdm-test-key",
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    before = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        # The test's own view of the bucket bypasses the plug, so it can look while the plug is out.
        fs = pafs.S3FileSystem(endpoint_override=f"http://127.0.0.1:{port}", allow_bucket_creation=True)
        fs.create_dir(BUCKET)
        yield {"endpoint": endpoint, "fs": fs, "env": env, "plug": plug}
    finally:
        _stop(server)
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def mlflow_server(s3, tmp_path_factory):
    """`cdm ui --artifacts-destination s3://BUCKET/mlartifacts`: an MLflow server on a SQLite store, artifacts in the bucket."""
    port = free_port()
    folder = tmp_path_factory.mktemp("mlflow-server")
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    argv = [
        CDM,
        "ui",
        "--port",
        str(port),
        "--workdir",
        str(folder),
        "--artifacts-destination",
        f"s3://{BUCKET}/mlartifacts",
    ]
    server = subprocess.Popen(
        argv, stdout=(folder / "server.log").open("w"), stderr=subprocess.STDOUT, env=env, start_new_session=True
    )
    yield server, port, folder / "server.log"
    _stop(server)


@pytest.fixture(scope="module")
def two_nodes(s3):
    """Two Ray nodes, each with its own temporary folder; both inherit the AWS_* endpoint and credentials."""
    yield from two_ray_nodes(separate_temp_dirs=True)


def _keys(fs, prefix: str) -> list[str]:
    infos = fs.get_file_info(pafs.FileSelector(f"{BUCKET}/{prefix}", recursive=True, allow_not_found=True))
    return sorted(i.path.removeprefix(f"{BUCKET}/{prefix}/") for i in infos if i.type == pafs.FileType.File)


def test_a_missing_bucket_is_one_line_before_any_work(s3, capsys, monkeypatch):
    """Runs before the cluster fixture: the check comes before Ray starts (it never does here)."""
    code, out = cli_in_process(
        ["prepare", "digits", "--out", "s3://no-such-bucket/data", "--no-track"], capsys, monkeypatch
    )
    assert code == 2, out
    assert out.count("error:") == 1 and "Traceback" not in out and SECRET not in out
    assert "error: s3://no-such-bucket/data: the object store refused access" in out
    assert "create bucket 'no-such-bucket' at http://127.0.0.1:" in out
    assert not ray.is_initialized()


def test_refused_credentials_are_one_line_before_any_work(s3, tmp_path, capsys, monkeypatch):
    """A second moto server that checks every request's signature against its (empty) IAM: any key is refused,
    as a real store refuses a wrong one. The secret is not printed."""
    port = free_port()
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"}  # moto: authenticate from the first request on
    argv = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    server = subprocess.Popen(
        argv, stdout=(tmp_path / "moto.log").open("w"), stderr=subprocess.STDOUT, env=env, start_new_session=True
    )
    try:
        _wait_http(port, server, "moto server with authentication")
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "not-a-key")
        code, out = cli_in_process(
            ["prepare", "digits", "--out", f"s3://{BUCKET}/data", "--no-track"], capsys, monkeypatch
        )
    finally:
        _stop(server)
    assert code == 2, out
    assert out.count("error:") == 1 and "Traceback" not in out and SECRET not in out
    assert f"error: s3://{BUCKET}/data: the object store refused access" in out
    assert "check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY" in out
    assert not ray.is_initialized()


def test_prepare_train_store_lost_resume_sample_nll_fid_all_in_the_bucket(
    s3, mlflow_server, two_nodes, tmp_path, capsys, monkeypatch, one_torch_thread
):
    from mlflow.tracking import MlflowClient
    from PIL import Image

    from pipelines.common.checkpoints import load_trained_model
    from pipelines.train.run_dir import checkpoint_line, registered_checkpoints

    fs, plug = s3["fs"], s3["plug"]
    server, port, server_log = mlflow_server
    _wait_http(port, server, f"mlflow server (log: {server_log})", timeout=90)
    tracking = f"http://127.0.0.1:{port}"
    assert len([n for n in ray.nodes() if n["Alive"]]) == 2
    data, runs = f"s3://{BUCKET}/data", f"s3://{BUCKET}/runs"

    lap = time.monotonic()

    def took(what):
        nonlocal lap
        sys.__stderr__.write(f"[s3] {what}: {time.monotonic() - lap:.1f} s\n")
        lap = time.monotonic()

    code, out = cli_in_process(["prepare", "digits", "--out", data, "--no-track"], capsys, monkeypatch)
    took("prepare")
    assert code == 0, out
    assert {"dataset.json", "manifest.parquet"} <= set(_keys(fs, "data"))
    code, out = cli_in_process(["verify", data, "--quick"], capsys, monkeypatch)
    took("verify")
    assert code == 0 and f"ok: {data}" in out, out

    # The store is pulled away (the plug cut) the moment checkpoint 4's file is in the bucket, while Ray
    # records it (checkpoint_manager_snapshot.json) or uploads the next: the run fails with the storage
    # error, no checkpoint 8 exists or is registered, and --resume goes on from the complete checkpoint 4.
    train = [
        "train",
        str(ROOT / "configs" / "train_tiny.toml"),
        *("--set", f"data.uri={data}", "--set", f"run.storage_path={runs}", "--set", "run.name=s3run"),
        *("--set", f"tracking.tracking_uri={tracking}", "--set", "train.steps=8", "--set", "checkpoint.every=4"),
        *("--set", "validation.every=4", "--set", "validation.max_samples=64", "--set", "scaling.num_workers=2"),
        *("--set", "scaling.placement_strategy=STRICT_SPREAD"),
    ]
    first = f"{BUCKET}/runs/s3run/checkpoint_00000004/checkpoint.pt"

    def pull_when_the_first_is_in():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and fs.get_file_info(first).type != pafs.FileType.File:
            time.sleep(0.05)
        plug.cut()

    watcher = threading.Thread(target=pull_when_the_first_is_in, daemon=True)
    watcher.start()
    try:
        with pytest.raises(Exception) as failed:  # in-process, main() lets it through (the console gets one line)
            cli_in_process(train, capsys, monkeypatch)
    finally:
        watcher.join()
        plug.restore()
    took("train, store lost")
    message = str(failed.value)
    sys.__stderr__.write(f"[s3] {type(failed.value).__name__}: {message[-1500:]}\n")
    assert SECRET not in message
    assert BUCKET in message and "Could not connect to server" in message, message[-1500:]
    run_dir = f"{runs}/s3run"
    assert checkpoint_line(run_dir)[:1] == ["checkpoint_00000004"], checkpoint_line(run_dir)
    assert "checkpoint_00000008" not in (registered_checkpoints(run_dir) or set())

    code, out = cli_in_process(["train", "--resume", f"{runs}/s3run"], capsys, monkeypatch)
    took("resume")
    assert code == 0, out
    assert "s3run/checkpoint_00000008/checkpoint.pt" in _keys(fs, "runs")
    info = json.loads(fs.open_input_stream(f"{BUCKET}/runs/s3run/cdm_run.json").read())
    client = MlflowClient(tracking)
    run = client.get_run(info["mlflow"]["run_id"])
    assert run.data.tags["cdm.final_step"] == "8"
    fits = {n: load_trained_model(f"{run_dir}/{n}").path for n in ("checkpoint_00000004", "checkpoint_00000008")}
    assert all(p.startswith("s3://") for p in fits.values()), fits
    assert run.data.tags["cdm.last_checkpoint"] == f"{runs}/s3run/checkpoint_00000008"
    assert len(set(run.data.tags["cdm.worker_nodes"].split(","))) == 2

    ckpt = f"{runs}/s3run/checkpoint_00000008"
    samples, scores = f"s3://{BUCKET}/samples", f"s3://{BUCKET}/nll"
    code, out = cli_in_process(
        ["sample", ckpt, "--n", "8", "--sampler", "ddim", "--steps", "3", "--out", samples, "--workers", "2"]
        + ["--tracking-uri", tracking],
        capsys,
        monkeypatch,
    )
    took("sample")
    assert code == 0, out
    assert "grid.png" in _keys(fs, "samples")
    code, out = cli_in_process(
        ["nll", ckpt, data, "--out", scores, "--workers", "2", "--tracking-uri", tracking], capsys, monkeypatch
    )
    took("nll")
    assert code == 0, out
    summary = json.loads(fs.open_input_stream(f"{BUCKET}/nll/summary.json").read())
    assert summary["count"] == 179 and np.isfinite(summary["nll_bpd"]), summary
    fid = ["fid", samples, data, "--features", "raw", "--workers", "2", "--cache-dir", str(tmp_path / "fid-cache")]
    code, out = cli_in_process([*fid, "--tracking-uri", tracking], capsys, monkeypatch)
    took("fid")
    assert code == 0, out
    client_runs = MlflowClient(tracking).search_runs(
        [e.experiment_id for e in MlflowClient(tracking).search_experiments()], "tags.`cdm.stage` = 'fid'"
    )
    assert len(client_runs) == 1 and np.isfinite(client_runs[0].data.metrics["eval/fd_raw"])

    # The sample grid went to the bucket through the MLflow server, and comes back through it.
    sample_run = client.search_runs(
        [run.info.experiment_id, *[e.experiment_id for e in client.search_experiments()]],
        "tags.`cdm.stage` = 'sample'",
    )[0]
    local = client.download_artifacts(sample_run.info.run_id, "grid.png", str(tmp_path))
    assert Image.open(io.BytesIO(Path(local).read_bytes())).size[0] > 8
    assert any(k.endswith("grid.png") for k in _keys(fs, "mlartifacts")), _keys(fs, "mlartifacts")
    assert SECRET not in out and SECRET not in server_log.read_text()


def test_a_sweeps_trials_checkpoint_into_the_bucket(s3, two_nodes, tmp_path, capsys, monkeypatch):
    """`cdm tune` with run.storage_path in the bucket: Ray Tune's state, each trial's run folder and checkpoints,
    and cdm_sweep.json are objects there (two trials at once on the 2-node cluster, whose nodes share only the
    bucket); the best checkpoint the sweep records and prints is the bucket's. (Reading a checkpoint back from the
    bucket to train on is the resume of the test above, whose workers' checkpoints Ray Train uploads; these
    trials train in their Tune actors, which write their checkpoints to the bucket themselves.)"""
    fs = s3["fs"]
    data, sweeps = f"s3://{BUCKET}/data", f"s3://{BUCKET}/sweeps"
    if "dataset.json" not in _keys(fs, "data"):  # run alone (`-k sweep`), the test prepares its own data
        code, out = cli_in_process(["prepare", "digits", "--out", data, "--no-track"], capsys, monkeypatch)
        assert code == 0, out
    (tmp_path / "space.toml").write_text('[space]\n"loss.w_ce" = { grid = [1e-3, 1e-2] }\n')
    monkeypatch.chdir(tmp_path)
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    code, out = cli_in_process(
        ["tune", str(ROOT / "configs" / "train_tiny.toml"), "--space", "space.toml", "--name", "bucket"]
        + ["--scheduler", "fifo", "--max-concurrent", "2"]
        + [
            "--set",
            f"data.uri={data}",
            "--set",
            f"run.storage_path={sweeps}",
            "--set",
            f"tracking.tracking_uri={tracking}",
        ]
        + ["--set", "train.steps=4", "--set", "checkpoint.every=4", "--set", "validation.every=4"]
        + ["--set", "validation.max_samples=64", "--set", "scaling.num_workers=0"],
        capsys,
        monkeypatch,
    )
    assert code == 0, out

    keys = _keys(fs, "sweeps/bucket")
    assert "cdm_sweep.json" in keys and any(k.startswith("tune/") for k in keys), keys
    trials = sorted({k.split("/")[1] for k in keys if k.startswith("trials/")})
    assert len(trials) == 2, keys
    for trial in trials:
        assert f"trials/{trial}/checkpoint_00000004/checkpoint.pt" in keys and f"trials/{trial}/cdm_run.json" in keys
    info = json.loads(fs.open_input_stream(f"{BUCKET}/sweeps/bucket/cdm_sweep.json").read())
    best = info["best"]["checkpoint"]
    assert best.startswith(f"{sweeps}/bucket/trials/") and best.endswith("checkpoint_00000004"), best
    assert f"best checkpoint: {best}" in out
    assert not list(tmp_path.glob("**/checkpoint.pt"))  # none in the working folder
