"""`cdm submit` decisions that need no cluster: address, token lookup, entrypoint, env, runtime_env."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines.cluster.jobs_api import DEFAULT_ADDRESS, ClusterToken, find_token, resolve_address
from pipelines.cluster.submit import (
    DEFAULT_EXCLUDES,
    build_runtime_env,
    entrypoint_command,
    job_env_vars,
    load_runtime_env_file,
    parse_env,
)
from pipelines.common.errors import UserError


@pytest.fixture
def clean_env(monkeypatch):
    for var in (
        "RAY_ADDRESS",
        "RAY_API_SERVER_ADDRESS",
        "RAY_AUTH_MODE",
        "RAY_AUTH_TOKEN",
        "RAY_AUTH_TOKEN_PATH",
        "MLFLOW_TRACKING_URI",
    ):
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


def test_address_precedence_and_normalisation(clean_env):
    assert resolve_address(None) == DEFAULT_ADDRESS
    clean_env.setenv("RAY_ADDRESS", "http://10.0.0.5:8265/")
    assert resolve_address(None) == "http://10.0.0.5:8265"
    clean_env.setenv("RAY_API_SERVER_ADDRESS", "http://10.0.0.6:8265")
    assert resolve_address(None) == "http://10.0.0.6:8265"
    assert resolve_address("http://head:8265") == "http://head:8265"
    # Bare host:port would make Ray's client wait ~30 s on a GCS connection; it means the dashboard.
    assert resolve_address("127.0.0.1:8265") == "http://127.0.0.1:8265"
    with pytest.raises(UserError, match="not a Jobs API address"):
        resolve_address("ray://head:10001")


def test_token_precedence_follows_ray(clean_env, tmp_path):
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text("from-default-file\n")
    env: dict[str, str] = {}
    assert find_token(env, home=home) == ClusterToken("from-default-file", f"the file {home / '.ray' / 'auth_token'}")
    path_file = tmp_path / "token"
    path_file.write_text("from-path\n")
    env["RAY_AUTH_TOKEN_PATH"] = str(path_file)
    assert find_token(env, home=home).value == "from-path"
    env["RAY_AUTH_TOKEN"] = "from-env"
    assert find_token(env, home=home).value == "from-env"
    env["RAY_AUTH_MODE"] = "disabled"
    assert find_token(env, home=home) is None
    assert find_token({}, home=tmp_path / "nobody") is None


def test_token_never_in_repr_and_bad_path_is_an_error(tmp_path):
    token = ClusterToken("s3cr3t-value", "somewhere")
    assert "s3cr3t" not in repr(token) and "s3cr3t" not in str(token)
    with pytest.raises(UserError, match="cannot be read"):
        find_token({"RAY_AUTH_TOKEN_PATH": str(tmp_path / "missing")})
    (tmp_path / "empty").write_text("  \n")
    with pytest.raises(UserError, match="is empty"):
        find_token({"RAY_AUTH_TOKEN_PATH": str(tmp_path / "empty")})


def test_entrypoint_words_are_quoted_for_the_shell():
    assert entrypoint_command(["cdm", "run", "configs/cifar10.toml"]) == "cdm run configs/cifar10.toml"
    assert entrypoint_command(["python", "-c", "print('a b')"]) == "python -c 'print('\"'\"'a b'\"'\"')'"
    # One argument is already a shell command (`cdm submit -- "cdm version && cdm info"`).
    assert entrypoint_command(["cdm version && cdm info"]) == "cdm version && cdm info"
    with pytest.raises(UserError, match="after `--`"):
        entrypoint_command([])


def test_env_pairs():
    assert parse_env(["A=1", "B=x=y", "EMPTY="], environ={}) == {"A": "1", "B": "x=y", "EMPTY": ""}
    assert parse_env(["HOME_DIR"], environ={"HOME_DIR": "/h"}) == {"HOME_DIR": "/h"}
    with pytest.raises(UserError, match="not set here"):
        parse_env(["NOPE"], environ={})
    with pytest.raises(UserError, match="variable name"):
        parse_env(["1BAD=x"], environ={})


def test_runtime_env_working_dir_pip_and_excludes(tmp_path):
    (tmp_path / "requirements.txt").write_text("numpy\n")
    env = build_runtime_env(str(tmp_path), [str(tmp_path / "requirements.txt")], {"A": "1"})
    assert env["working_dir"] == str(tmp_path.resolve())
    assert env["excludes"] == DEFAULT_EXCLUDES
    assert env["pip"] == str((tmp_path / "requirements.txt").resolve())
    assert env["env_vars"] == {"A": "1"}
    assert build_runtime_env("", ["numpy", "scipy>=1.10"], {}) == {"pip": ["numpy", "scipy>=1.10"]}
    with pytest.raises(UserError, match="no such directory"):
        build_runtime_env(str(tmp_path / "missing"), [], {})


def test_runtime_env_ships_this_checkout():
    env = build_runtime_env("", [], {}, with_package=True)
    assert [Path(p).name for p in env["py_modules"]] == ["cdm_core", "pipelines"]
    assert all((Path(p) / "__init__.py").is_file() for p in env["py_modules"])


def test_runtime_env_template_merges_with_options(tmp_path, monkeypatch):
    template = tmp_path / "runtime_env.yaml"
    template.write_text("working_dir: .\nexcludes: [data]\npip: [numpy]\nenv_vars: {A: '1', B: '2'}\n")
    monkeypatch.chdir(tmp_path)
    env = build_runtime_env(None, ["scipy"], {"B": "3"}, base=load_runtime_env_file(str(template)))
    assert env["working_dir"] == str(tmp_path.resolve())
    assert env["excludes"][0] == "data" and set(DEFAULT_EXCLUDES) <= set(env["excludes"])
    assert env["pip"] == ["numpy", "scipy"]
    assert env["env_vars"] == {"A": "1", "B": "3"}
    assert "working_dir" not in build_runtime_env("", [], {}, base=load_runtime_env_file(str(template)))


def test_runtime_env_mistakes_are_user_errors(tmp_path):
    bad_key = tmp_path / "bad_key.yaml"
    bad_key.write_text("env_var: {A: '1'}\n")
    with pytest.raises(UserError, match="unknown field.*env_var"):
        load_runtime_env_file(str(bad_key))
    bad_value = tmp_path / "bad_value.yaml"
    bad_value.write_text("env_vars: {A: 1}\n")
    with pytest.raises(UserError, match="invalid runtime_env"):
        build_runtime_env("", [], {}, base=load_runtime_env_file(str(bad_value)))
    with pytest.raises(UserError, match="token must not travel"):
        build_runtime_env("", [], {"RAY_AUTH_TOKEN": "x"})
    with pytest.raises(UserError, match="No such file"):
        load_runtime_env_file(str(tmp_path / "missing.yaml"))


def test_tracking_uri_travels_with_the_job(tmp_path, clean_env):
    forwarded, _ = job_env_vars("http://head:8265", {}, tmp_path, environ={"MLFLOW_TRACKING_URI": "http://mlflow:5000"})
    assert forwarded == {"MLFLOW_TRACKING_URI": "http://mlflow:5000"}
    # A remote cluster cannot write to this machine's SQLite file: nothing is invented for it.
    assert job_env_vars("http://head:8265", {}, tmp_path, environ={}) == ({}, [])
    # A cluster on this machine gets this directory's store, so `cdm ui` here shows its runs.
    local, notes = job_env_vars("http://127.0.0.1:8265", {}, tmp_path, environ={})
    assert local == {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"} and notes
    explicit, _ = job_env_vars(
        "http://127.0.0.1:8265", {"MLFLOW_TRACKING_URI": "sqlite:////x.db"}, tmp_path, environ={}
    )
    assert explicit == {"MLFLOW_TRACKING_URI": "sqlite:////x.db"}
