"""The real `cdm` command, many times, without paying its imports each time.

A `cdm` process that stops at a bad input spends almost all of its few seconds importing torch,
MLflow, Ray and scipy (5–8 s on 2 cores), and the bad-input matrix runs 75 of them. `CdmForks`
starts one Python process that imports the console script's module and what the commands
import, then forks a child per command: the child takes the command's working folder,
environment and argv, points file descriptors 0, 1 and 2 at /dev/null and two files, and runs
what the console script runs, `sys.exit(pipelines.cli.main())`, and ends as the interpreter
would: the traceback of an uncaught exception, the atexit handlers, the exit code; only the
teardown of the imported modules (2 s, and silent) is skipped. What a test sees is what the
installed `cdm` prints and returns; only the import time is shared. The server is
single-threaded when it forks: nothing it imports starts a thread.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

_SERVER = r"""
import atexit, json, os, sys, threading

import mlflow, mlflow.tracking, ray, ray.data, ray.train, ray.tune, scipy.stats, torch  # noqa: F401
import pipelines.cli  # noqa: F401
import pipelines.data.prepare, pipelines.evaluate.nll, pipelines.evaluate.sample, pipelines.evaluate.fid, pipelines.train.trainer, pipelines.tune.sweep, pipelines.workflow.runner  # noqa: F401

assert threading.active_count() == 1, threading.enumerate()
print(json.dumps({"ready": os.getpid()}), flush=True)
for line in sys.stdin:
    case = json.loads(line)
    pid = os.fork()
    if pid == 0:
        os.chdir(case["cwd"])
        os.environ.clear()
        os.environ.update(case["env"])
        for fd, path, flags in ((0, os.devnull, os.O_RDONLY), (1, case["stdout"], os.O_WRONLY), (2, case["stderr"], os.O_WRONLY)):
            os.dup2(os.open(path, flags), fd)
        sys.argv = ["cdm", *case["argv"]]
        try:
            code = pipelines.cli.main()
        except SystemExit as stop:
            code = stop.code
        except BaseException:
            sys.excepthook(*sys.exc_info())
            code = 1
        if isinstance(code, str):
            print(code, file=sys.stderr)
        atexit._run_exitfuncs()
        for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
            stream.flush()
        os._exit(code if isinstance(code, int) else int(code is not None))
    print(json.dumps({"pid": pid}), flush=True)
    _, status = os.waitpid(pid, 0)
    print(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}), flush=True)
"""


class CdmForks:
    """`run(argv, cwd, env, timeout)` → `subprocess.CompletedProcess` of `cdm ARGV`, one command at a time
    (`env`: the command's whole environment, by default this process's)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._files = tempfile.mkdtemp(prefix="cdm-forks-")
        self._server = subprocess.Popen(
            [sys.executable, "-c", _SERVER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self._reply(timeout=300)

    def _reply(self, timeout: float) -> dict:
        ready, _, _ = select.select([self._server.stdout], [], [], timeout)
        if not ready:
            raise TimeoutError(f"no reply from the cdm fork server in {timeout} s")
        line = self._server.stdout.readline()
        if not line:
            raise RuntimeError(f"the cdm fork server ended (exit code {self._server.wait()})")
        return json.loads(line)

    def run(
        self,
        argv: list[str],
        cwd: Path,
        env: dict[str, str] | None = None,
        timeout: float = 120,
        on_start: Callable[[int], None] | None = None,
    ) -> subprocess.CompletedProcess:
        """`on_start(pid)`, if given, runs in a thread once the command's process exists (to signal it midway)."""
        env = dict(os.environ) if env is None else env
        with self._lock:
            out, err = Path(self._files, "stdout"), Path(self._files, "stderr")
            out.write_bytes(b"")
            err.write_bytes(b"")
            case = {"argv": argv, "cwd": str(cwd), "env": env, "stdout": str(out), "stderr": str(err)}
            self._server.stdin.write(json.dumps(case) + "\n")
            self._server.stdin.flush()
            pid = self._reply(timeout=30)["pid"]
            if on_start is not None:
                threading.Thread(target=on_start, args=(pid,), daemon=True).start()
            try:
                code = self._reply(timeout)["returncode"]
            except TimeoutError:
                os.kill(pid, signal.SIGKILL)
                self._reply(timeout=30)
                raise subprocess.TimeoutExpired(["cdm", *argv], timeout, err.read_text()) from None
            return subprocess.CompletedProcess(["cdm", *argv], code, out.read_text(), err.read_text())

    def close(self) -> None:
        self._server.stdin.close()
        self._server.wait(timeout=30)
        shutil.rmtree(self._files, ignore_errors=True)
