"""The package as pip sees it: the wheel `python -m build` makes from this checkout, and `cdm --version`.

One wheel is built for the module (about 5 s), without build isolation so that no index is needed: the
build uses this environment's setuptools, which `make install` brings at the version pyproject.toml asks.
"""

from __future__ import annotations

import email
import subprocess
import sys
import zipfile
from importlib.metadata import version as dist_version
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    built = subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(out), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    (path,) = out.glob("cdm-*.whl")
    return path, built.stdout + built.stderr


def _metadata(path: Path) -> email.message.Message:
    with zipfile.ZipFile(path) as whl:
        name = next(n for n in whl.namelist() if n.endswith(".dist-info/METADATA"))
        return email.message_from_bytes(whl.read(name))


def test_the_build_says_nothing_about_the_license(wheel):
    _, log = wheel
    # setuptools < 77 cannot read the PEP 639 string; older layouts warn about license classifiers or tables.
    assert "SetuptoolsDeprecationWarning" not in log and "License classifiers" not in log, log[-3000:]


def test_the_wheel_carries_the_license_and_type_markers(wheel):
    path, _ = wheel
    with zipfile.ZipFile(path) as whl:
        names = set(whl.namelist())
        license_files = [n for n in names if n.endswith(".dist-info/licenses/LICENSE")]
        assert license_files and "MIT License" in whl.read(license_files[0]).decode()
    assert {"cdm_core/py.typed", "pipelines/py.typed"} <= names
    assert not [n for n in names if n.endswith(".yaml")]  # Ray Data's logging config is generated, not shipped
    meta = _metadata(path)
    assert meta["License-Expression"] == "MIT" and meta["License-File"] == "LICENSE"


def test_the_metadata_names_extras_bounds_and_urls(wheel):
    meta = _metadata(wheel[0])
    assert set(meta.get_all("Provides-Extra")) == {"fid", "docs", "test"}
    requires = meta.get_all("Requires-Dist")
    assert 'torch-fidelity==0.4.0; extra == "fid"' in requires
    assert any(r.startswith("pdoc") and 'extra == "docs"' in r for r in requires)
    assert any(r.startswith("build") and 'extra == "test"' in r for r in requires)
    ray = next(r for r in requires if r.startswith("ray["))
    mlflow = next(r for r in requires if r.startswith("mlflow"))
    assert "<2.61" in ray and ">=2.52" in ray, ray
    assert "<4" in mlflow and ">=3.0" in mlflow, mlflow
    urls = dict(u.split(", ", 1) for u in meta.get_all("Project-URL"))
    assert urls["Paper"] == "https://arxiv.org/abs/2402.10095"
    assert urls["Official code"] == "https://github.com/shaharYadin/CDM"


def test_cdm_version_prints_the_installed_version():
    cdm = Path(sys.executable).with_name("cdm")
    for argv in (["--version"], ["version"]):
        result = subprocess.run([str(cdm), *argv], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0 and result.stdout.strip() == dist_version("cdm"), result


def test_the_changelog_starts_at_the_first_version():
    text = (ROOT / "CHANGELOG.md").read_text()
    assert "keepachangelog.com" in text and "## [Unreleased]" in text
    releases = [line for line in text.splitlines() if line.startswith("## [") and "Unreleased" not in line]
    assert releases and releases[-1].startswith("## [0.1.0]"), releases
