"""`cdm ui`: a real MLflow server on the project's store, on 127.0.0.1 only, stopped cleanly."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import free_port

BIN = Path(sys.executable).parent
STARTUP_TIMEOUT_S = 240  # MLflow's server takes ~10 s on a quiet 2-core box, far more on a loaded one

pytestmark = pytest.mark.timeout(600)


def _cdm_argv() -> list[str]:
    cdm = BIN / "cdm"
    return [str(cdm)] if cdm.exists() else [sys.executable, "-m", "pipelines.cli"]


def _listening_addresses(port: int) -> set[str]:
    """Local IPv4 addresses with a socket listening on `port`, read from /proc/net/tcp."""
    found: set[str] = set()
    table = Path("/proc/net/tcp")  # Linux; elsewhere the check is skipped
    if not table.exists():
        return found
    for line in table.read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, hex_port = local.split(":")
        if state == "0A" and int(hex_port, 16) == port:  # 0A = LISTEN
            found.add(socket.inet_ntoa(bytes.fromhex(address)[::-1]))
    return found


def _get(url: str) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.status, response.read().decode("utf-8", "replace")


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}


def test_ui_serves_the_project_store_on_loopback(tmp_path):
    port = free_port()
    log = (tmp_path / "ui.log").open("w")
    process = subprocess.Popen(
        _cdm_argv() + ["ui", "--port", str(port), "--workdir", str(tmp_path)],
        env=_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            assert process.poll() is None, (tmp_path / "ui.log").read_text()
            try:
                status, body = _get(f"http://127.0.0.1:{port}/health")
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                assert time.monotonic() < deadline, "cdm ui did not answer:\n" + (tmp_path / "ui.log").read_text()
                time.sleep(1)
        assert status == 200 and body.strip() == "OK"
        status, page = _get(f"http://127.0.0.1:{port}/")
        assert status == 200 and "<html" in page.lower()
        # The project's store: the default SQLite file in the work dir, created by the server.
        assert (tmp_path / "mlflow.db").is_file()
        if Path("/proc/net/tcp").exists():
            assert _listening_addresses(port) == {"127.0.0.1"}  # not 0.0.0.0
        # SIGTERM (what a service manager sends) stops the server and its web workers.
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
        deadline = time.monotonic() + 30
        while _listening_addresses(port) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not _listening_addresses(port), "the MLflow server outlived cdm ui"
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        log.close()


def test_ui_refuses_a_busy_port_and_a_remote_store(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run(_cdm_argv() + ["ui", "--port", str(port), "--workdir", str(tmp_path)], env=_env(),
                                capture_output=True, text=True, timeout=120)  # fmt: skip
    assert (
        result.returncode == 2 and "pick another port with --port" in result.stderr and "Traceback" not in result.stderr
    )
    remote = subprocess.run(_cdm_argv() + ["ui"], env=_env() | {"MLFLOW_TRACKING_URI": "http://127.0.0.1:5999"},
                            capture_output=True, text=True, timeout=120, cwd=tmp_path)  # fmt: skip
    assert remote.returncode == 2 and "is a tracking server already" in remote.stderr
