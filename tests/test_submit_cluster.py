"""`cdm submit` and `cdm jobs` against a real local Ray cluster with token authentication.

The cluster is started by cluster/local_cluster.sh (`ray start --head` plus one
`ray start --address` worker node on 127.0.0.1), on free ports and in its own
temp dir, so `ray.init()` sessions of other tests never see it. Teardown ends
only the processes the script started (their session id), never `ray stop`,
which would kill every Ray process on the machine.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "cluster" / "local_cluster.sh"
BIN = Path(sys.executable).parent
NODES = 2  # head + 1 worker
CLI_TIMEOUT_S = 240  # generous: a loaded 2-core machine

pytestmark = [
    pytest.mark.timeout(900),
    pytest.mark.skipif(
        shutil.which("setsid") is None or not (BIN / "ray").exists(), reason="needs setsid and the ray CLI"
    ),
]


def _ports_free(ports) -> bool:
    for port in ports:
        with socket.socket() as probe:
            try:
                probe.bind(("0.0.0.0", port))
            except OSError:
                return False
    return True


def _free_port_base(span: int) -> int:
    """A block of `span` free ports below the ephemeral range (Ray's own random ports live there)."""
    for base in sorted(range(20_000, 32_000 - span, 500), key=lambda _: secrets.randbelow(10_000)):
        if _ports_free(range(base, base + span)):
            return base
    raise RuntimeError("no free block of ports for the test cluster")


@pytest.fixture(scope="module")
def cdm(cdm_forks):
    """`cdm ARGS` as a client runs it: the real command, forked from a process that has imported it (the clients'
    ~15 runs would spend 3–6 s each importing)."""

    def run(*args: str, env: dict[str, str], cwd: Path, timeout: float = CLI_TIMEOUT_S) -> subprocess.CompletedProcess:
        return cdm_forks.run(list(args), cwd, env, timeout=timeout)

    return run


def _without_ray_settings(env: dict[str, str]) -> dict[str, str]:
    drop = (
        "RAY_ADDRESS",
        "RAY_API_SERVER_ADDRESS",
        "RAY_AUTH_MODE",
        "RAY_AUTH_TOKEN",
        "RAY_AUTH_TOKEN_PATH",
        "MLFLOW_TRACKING_URI",
    )
    return {k: v for k, v in env.items() if k not in drop}


@pytest.fixture(scope="module")
def cluster():
    """A 2-node token-authenticated cluster; yields what a client needs."""
    # Short path: Ray's unix sockets live under it and must stay within ~107 characters.
    root = Path(tempfile.mkdtemp(prefix="cdm-rc-"))
    token = secrets.token_hex(16)
    (root / "token").write_text(token)
    base = _free_port_base(100 * (NODES + 1))
    gcs_port, dashboard_port = base + 100 * NODES, base + 100 * NODES + 1
    cluster_env = _without_ray_settings(os.environ) | {
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(root / "token"),
        "CLUSTER_DIR": str(root / "cluster"),
        "NUM_WORKERS": str(NODES - 1),
        "CPUS_PER_NODE": "1",
        "GCS_PORT": str(gcs_port),
        "DASHBOARD_PORT": str(dashboard_port),
        "PORT_BASE": str(base),
        "OBJECT_STORE_MB": "100",
        "STOP_GRACE_S": "5",
        "RAY": str(BIN / "ray"),
    }
    # The client side finds the token the default way, in ~/.ray/auth_token, with no RAY_AUTH_* set.
    home = root / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text(token + "\n")
    client_env = _without_ray_settings(os.environ) | {"HOME": str(home)}
    workdir = root / "project"
    workdir.mkdir()
    (workdir / "payload.txt").write_text("payload-from-working-dir\n")

    started = subprocess.run(
        [str(SCRIPT), "start"], env=cluster_env, capture_output=True, text=True, timeout=CLI_TIMEOUT_S
    )
    try:
        assert started.returncode == 0, f"local_cluster.sh start failed:\n{started.stdout}\n{started.stderr}"
        yield {
            "address": f"http://127.0.0.1:{dashboard_port}",
            "token": token,
            "env": client_env,
            "workdir": workdir,
            "cluster_env": cluster_env,
        }
    finally:
        stopped = subprocess.run([str(SCRIPT), "stop"], env=cluster_env, capture_output=True, text=True, timeout=120)
        assert stopped.returncode == 0, stopped.stderr
        shutil.rmtree(root, ignore_errors=True)


# The job proves the things a real `cdm run` job relies on: `cdm` is on the
# cluster's PATH, the working dir was uploaded, --env and the MLflow URI arrive,
# and the driver can join the (token-protected) cluster and see both nodes.
JOB_SCRIPT = (
    "import os, ray; "
    "print('hello from cdm job', open('payload.txt').read().strip(), os.environ['GREETING'], os.environ['MLFLOW_TRACKING_URI']); "
    "ray.init(); "
    "print('alive nodes:', sum(n['Alive'] for n in ray.nodes()))"
)


@pytest.fixture(scope="module")
def finished_job(cluster, cdm):
    result = cdm(
        "submit", "--address", cluster["address"], "--working-dir", ".", "--env", "GREETING=hi-there",
        "--", f'cdm version && python -c "{JOB_SCRIPT}"',
        env=cluster["env"], cwd=cluster["workdir"],
    )  # fmt: skip
    return result


def test_submit_runs_a_job_to_completion(cluster, finished_job):
    result = finished_job
    assert result.returncode == 0, result.stdout + result.stderr
    job_id = result.stdout.splitlines()[0]
    assert job_id.startswith("raysubmit_")
    assert "hello from cdm job payload-from-working-dir hi-there" in result.stdout
    assert f"sqlite:///{cluster['workdir'].resolve() / 'mlflow.db'}" in result.stdout
    assert f"alive nodes: {NODES}" in result.stdout
    assert f"job {job_id} SUCCEEDED" in result.stderr
    assert cluster["token"] not in result.stdout + result.stderr


def test_jobs_logs_status_and_list_show_the_job(cluster, cdm, finished_job):
    job_id = finished_job.stdout.splitlines()[0]
    logs = cdm("jobs", "logs", job_id, "--address", cluster["address"], env=cluster["env"], cwd=cluster["workdir"])
    assert logs.returncode == 0, logs.stderr
    assert "hello from cdm job payload-from-working-dir" in logs.stdout
    followed = cdm(
        "jobs", "logs", "--follow", job_id, "--address", cluster["address"], env=cluster["env"], cwd=cluster["workdir"]
    )
    assert followed.returncode == 0 and "hello from cdm job" in followed.stdout
    # RAY_ADDRESS is how most users point at a cluster.
    env = cluster["env"] | {"RAY_ADDRESS": cluster["address"]}
    status = cdm("jobs", "status", job_id, env=env, cwd=cluster["workdir"])
    assert status.returncode == 0 and "SUCCEEDED" in status.stdout
    assert "GREETING" in status.stdout and "hi-there" not in status.stdout  # names only, never values
    listing = cdm("jobs", "list", env=env, cwd=cluster["workdir"])
    assert listing.returncode == 0 and job_id in listing.stdout


def test_a_failing_job_fails_the_command(cluster, cdm):
    result = cdm(
        "submit", "--address", cluster["address"], "--working-dir", "",
        "--", "python", "-c", "import sys; print('about to fail'); sys.exit(3)",
        env=cluster["env"], cwd=cluster["workdir"],
    )  # fmt: skip
    assert result.returncode == 1, result.stdout + result.stderr
    assert "about to fail" in result.stdout
    assert "FAILED" in result.stderr and "exit code 3" in result.stderr
    assert "Traceback" not in result.stderr


def test_no_wait_returns_the_id_and_stop_ends_the_job(cluster, cdm):
    submitted = cdm(
        "submit", "--address", cluster["address"], "--working-dir", "", "--no-wait",
        "--", "python", "-c", "import time; print('long job started', flush=True); time.sleep(600)",
        env=cluster["env"], cwd=cluster["workdir"],
    )  # fmt: skip
    assert submitted.returncode == 0, submitted.stderr
    assert submitted.stdout.strip().startswith("raysubmit_") and len(submitted.stdout.splitlines()) == 1
    job_id = submitted.stdout.strip()
    stopped = cdm("jobs", "stop", job_id, "--address", cluster["address"], env=cluster["env"], cwd=cluster["workdir"])
    assert stopped.returncode == 0 and "STOPPED" in stopped.stdout, stopped.stdout + stopped.stderr
    # Following a stopped job ends at once, with the job's outcome as the exit code.
    followed = cdm(
        "jobs", "logs", "-f", job_id, "--address", cluster["address"], env=cluster["env"], cwd=cluster["workdir"]
    )
    assert followed.returncode == 1 and "STOPPED" in followed.stderr


def test_wrong_or_missing_token_is_a_clear_error(cluster, cdm):
    wrong = cdm(
        "jobs",
        "list",
        "--address",
        cluster["address"],
        env=cluster["env"] | {"RAY_AUTH_TOKEN": "not-the-token"},
        cwd=cluster["workdir"],
    )
    assert wrong.returncode == 2
    assert (
        "rejected the token from the RAY_AUTH_TOKEN variable" in wrong.stderr and "ray get-auth-token" in wrong.stderr
    )
    empty_home = cluster["workdir"] / "empty-home"
    empty_home.mkdir(exist_ok=True)
    missing = cdm(
        "submit",
        "--address",
        cluster["address"],
        "--",
        "true",
        env=cluster["env"] | {"HOME": str(empty_home)},
        cwd=cluster["workdir"],
    )
    assert missing.returncode == 2
    assert "no token was found" in missing.stderr and "~/.ray/auth_token" in missing.stderr
    for result in (wrong, missing):
        assert "Traceback" not in result.stderr and cluster["token"] not in result.stderr + result.stdout


def test_unknown_job_is_a_clear_error(cluster, cdm):
    result = cdm(
        "jobs",
        "logs",
        "raysubmit_doesnotexist",
        "--address",
        cluster["address"],
        env=cluster["env"],
        cwd=cluster["workdir"],
    )
    assert (
        result.returncode == 2
        and "no job 'raysubmit_doesnotexist'" in result.stderr
        and "Traceback" not in result.stderr
    )


def test_unreachable_cluster_is_a_clear_error(cdm, tmp_path):
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = _without_ray_settings(os.environ) | {"RAY_ADDRESS": f"http://127.0.0.1:{port}"}
    for args in (["submit", "--", "cdm", "version"], ["jobs", "list"]):
        result = cdm(*args, env=env, cwd=tmp_path, timeout=120)
        assert result.returncode == 2, result.stderr
        assert f"cannot reach the Ray Jobs API at http://127.0.0.1:{port}" in result.stderr
        assert "local_cluster.sh start" in result.stderr and "Traceback" not in result.stderr


# A job that prints a numbered line every half second for 30 s: what is lost or doubled shows.
TICKS = 60
TICKER = f"import time; [print(f'tick {{i:02d}}', flush=True) or time.sleep(0.5) for i in range({TICKS})]"


def _dashboard(cluster_env: dict[str, str]) -> tuple[int, list[str], dict[str, str]]:
    """The head's dashboard process: pid, command line and environment (to start it again as it was)."""
    sid = int((Path(cluster_env["CLUSTER_DIR"]) / "session_id").read_text().strip())
    found = {}
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and os.getsid(int(entry.name)) == sid:
                argv = (entry / "cmdline").read_bytes().rstrip(b"\0").decode().split("\0")
                if any(arg.endswith("dashboard/dashboard.py") for arg in argv):
                    found[int(entry.name)] = argv
        except OSError:  # a process that ended meanwhile
            continue
    ((pid, argv),) = found.items()
    environ = dict(
        item.split("=", 1) for item in Path(f"/proc/{pid}/environ").read_bytes().decode().split("\0") if "=" in item
    )
    return pid, argv, environ


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def _answers(address: str) -> bool:
    port = int(address.rsplit(":", 1)[1])
    with socket.socket() as probe:
        probe.settimeout(1)
        return probe.connect_ex(("127.0.0.1", port)) == 0


def test_following_rides_out_a_dashboard_restart(cluster, cdm, tmp_path):
    """The real dashboard is stopped mid-job and started again: a follower with the default window prints every
    line once and ends with the job; one whose window (3 s) passes first exits 2 with one line. This module's
    cluster serves (the only one with a dashboard to restart); it runs last, as the dashboard it leaves is the
    one it started, ended here."""
    submitted = cdm(
        "submit", "--address", cluster["address"], "--working-dir", "", "--no-wait", "--", "python", "-c", TICKER,
        env=cluster["env"], cwd=cluster["workdir"],
    )  # fmt: skip
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip()
    cdm = str(BIN / "cdm")
    followers = {}
    for name, window in (("patient", "120"), ("hasty", "3")):
        out, err = tmp_path / f"{name}.out", tmp_path / f"{name}.err"
        followers[name] = (
            subprocess.Popen(
                [cdm, "jobs", "logs", "--follow", job_id, "--address", cluster["address"], "--reconnect-s", window],
                stdout=out.open("w"), stderr=err.open("w"), env=cluster["env"], cwd=cluster["workdir"],
            ),
            out,
            err,
        )  # fmt: skip
    restarted = None
    try:
        _wait_for(lambda: "tick 04" in followers["patient"][1].read_text(), 120, "the job's first lines")
        pid, argv, environ = _dashboard(cluster["cluster_env"])
        os.kill(pid, signal.SIGTERM)
        _wait_for(lambda: not _answers(cluster["address"]), 60, "the dashboard to stop")
        hasty, _, hasty_err = followers["hasty"]
        assert hasty.wait(timeout=60) == 2
        message = hasty_err.read_text()
        assert "lost the Ray Jobs API" in message and f"job {job_id} keeps running" in message, message
        assert "Traceback" not in message
        restarted = subprocess.Popen(
            argv, env=environ, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        patient, out, err = followers["patient"]
        assert patient.wait(timeout=240) == 0, err.read_text()
        lines = [line for line in out.read_text().splitlines() if line.startswith("tick ")]
        assert lines == [f"tick {i:02d}" for i in range(TICKS)]  # every line once, in order
        assert f"job {job_id} SUCCEEDED" in err.read_text()
    finally:
        for process, _, _ in followers.values():
            if process.poll() is None:
                process.kill()
        if restarted is not None:
            os.killpg(restarted.pid, signal.SIGTERM)
            try:
                restarted.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(restarted.pid, signal.SIGKILL)
