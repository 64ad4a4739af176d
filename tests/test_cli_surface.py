"""What `cdm` tells about itself: the environment variables (`--help`, the README's table, the code that reads
them), the options they feed, and shell completion, with the real installed `cdm`.

Every command here ends before any work (help, completion, a refused address), so each is a plain
subprocess of well under two seconds: the CLI imports the stages only inside the commands.
"""

from __future__ import annotations

import ast
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.cli import env

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
NAME = re.compile(r"^[A-Z][A-Z0-9]*_[A-Z0-9_]+$")


def _cdm(*argv: str, extra_env: dict[str, str] | None = None, **kwargs) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in dict(env.VARIABLES)}
    run_env = clean | {"COLUMNS": "200", "TERM": "dumb"} | (extra_env or {})
    return subprocess.run([str(BIN / "cdm"), *argv], capture_output=True, text=True, timeout=120, env=run_env, **kwargs)


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _readme_table() -> list[tuple[str, str]]:
    text = (ROOT / "README.md").read_text()
    section = text.split("### Environment variables", 1)[1].split("\n### ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    return [tuple(cell.strip().strip("`") for cell in row.strip("|").split(" | ", 1)) for row in rows]


def _variables_read_by_the_code() -> set[str]:
    """Names in `os.environ.get(…)`, `os.getenv(…)`, `os.environ[…]`, `env.get(…)`, and every CDM_* literal."""
    found = set()
    for path in (ROOT / "pipelines").rglob("*.py"):
        if path.name == "env.py" and path.parent.name == "cli":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("CDM_"):
                if NAME.match(node.value):
                    found.add(node.value)
            key = None
            if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
                func = ast.unparse(node.func)
                if func in ("os.environ.get", "os.getenv", "env.get", "environ.get"):
                    key = node.args[0].value
            elif isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Load):
                if ast.unparse(node.value) in ("os.environ", "env") and isinstance(node.slice, ast.Constant):
                    key = node.slice.value
            if isinstance(key, str) and NAME.match(key):
                found.add(key)
    return found


def test_the_readme_table_is_the_list_cdm_help_prints():
    assert _readme_table() == [(name, what) for name, what in env.VARIABLES]


def test_cdm_help_ends_with_every_variable():
    result = _cdm("--help")
    assert result.returncode == 0, result.stderr
    tail = result.stdout.split("Environment variables", 1)[1]
    for name, what in env.VARIABLES:
        assert name in tail and what.split(",")[0][:40] in " ".join(tail.split()), name


def test_every_variable_the_code_reads_is_told_and_every_one_told_is_read():
    read = _variables_read_by_the_code()
    told_text = " ".join(f"{name} {what}" for name, what in env.VARIABLES)
    untold = sorted(v for v in read - set(env.TEST_ONLY) if v not in told_text)
    assert untold == [], f"read by pipelines/ but not in pipelines/cli/env.py's VARIABLES: {untold}"
    code = "\n".join(p.read_text() for p in (ROOT / "pipelines").rglob("*.py") if p.name != "env.py")
    unread = [name for name, _ in env.VARIABLES if f'"{name}"' not in code]
    assert unread == [], f"in VARIABLES but read nowhere: {unread}"
    assert set(env.TEST_ONLY) <= read


@pytest.mark.parametrize(
    ("argv", "variables"),
    [
        (["nll", "--help"], ["MLFLOW_TRACKING_URI", "RAY_ADDRESS"]),
        (["fid", "--help"], ["CDM_INCEPTION_SHA256", "RAY_ADDRESS"]),
        (["jobs", "logs", "--help"], ["RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"]),
        (["submit", "--help"], ["RAY_API_SERVER_ADDRESS"]),
    ],
)
def test_an_options_help_names_its_variable(argv, variables):
    result = _cdm(*argv)
    assert result.returncode == 0, result.stderr
    flat = " ".join(result.stdout.split())
    for name in variables:
        assert f"env var: {name}" in flat or f"env var: RAY_API_SERVER_ADDRESS, {name}" in flat, (name, flat)


def test_the_variable_feeds_the_option_and_the_flag_wins(tmp_path):
    by_env, by_flag = _closed_port(), _closed_port()
    result = _cdm("jobs", "list", extra_env={"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{by_env}"}, cwd=tmp_path)
    assert result.returncode == 2 and f"cannot reach the Ray Jobs API at http://127.0.0.1:{by_env}" in result.stderr
    result = _cdm(
        "jobs", "list", "--address", f"http://127.0.0.1:{by_flag}",
        extra_env={"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{by_env}"}, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 2 and f"http://127.0.0.1:{by_flag}" in result.stderr


@pytest.mark.parametrize(("value", "traceback"), [("0", False), ("", False), ("1", True), ("true", True)])
def test_cdm_debug_0_means_off(tmp_path, value, traceback):
    result = _cdm("jobs", "list", "--address", "ftp://example.org", extra_env={"CDM_DEBUG": value}, cwd=tmp_path)
    assert ("Traceback" in result.stderr) is traceback, result.stderr
    assert "is not a Jobs API address" in result.stderr
    if not traceback:
        assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_completion_installs_and_completes_in_bash(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    path = f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"
    extra = {"HOME": str(home), "PATH": path}
    # The shell is detected from the parent process: install from bash, as a user would. (A lone command would be
    # exec'd by bash in its place, and detection would find whatever ran the tests: make's sh under `make test`.)
    installed = subprocess.run(
        ["bash", "-c", "cdm --install-completion; exit $?"],
        capture_output=True, text=True, timeout=120, env=os.environ | extra,
    )  # fmt: skip
    assert installed.returncode == 0, installed.stdout + installed.stderr
    assert "bash completion installed" in installed.stdout
    script = home / ".bash_completions" / "cdm.sh"
    assert str(script) in (home / ".bashrc").read_text()
    completed = subprocess.run(
        ["bash", "-c", f"source {script}; COMP_WORDS=(cdm jo); COMP_CWORD=1; _cdm_completion cdm; "
         'echo "${COMPREPLY[@]}"; COMP_WORDS=(cdm jobs l); COMP_CWORD=2; _cdm_completion cdm; echo "${COMPREPLY[@]}"'],
        capture_output=True, text=True, timeout=120, env=os.environ | extra,
    )  # fmt: skip
    lines = completed.stdout.splitlines()
    assert completed.returncode == 0 and lines[0].split() == ["jobs"], completed
    assert set(lines[1].split()) == {"list", "logs"}, completed
