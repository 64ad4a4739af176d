"""The paper-in-miniature studies (studies/table1, table3, cdm_vs_ddm, consistency), each run as a user runs it
with --smoke.

--smoke keeps every configuration and every stage (the real `cdm run` in a subprocess, joined to the suite's
Ray) and cuts the steps and samples; its results stay in the work folder, never over the committed ones.
Checked: every configuration's figures are there and finite, each study is one MLflow run with one child
per configuration (the workflows' parent runs), the stages two studies share ran once, and the study's run
holds its results.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

mlflow = pytest.importorskip("mlflow")

ROOT = Path(__file__).resolve().parents[1]
STUDIES = {
    "table1": ["ce_only", "mse_only", "both"],
    "table3": ["linear", "uniform", "ot"],
    "cdm_vs_ddm": ["cdm", "ddm"],
    # its --smoke keeps the rows with settings of their own: the paper's recipe and dequantized training
    "consistency": ["paper-seed0", "dequantized-seed0"],
}
FIGURE = {"table1": "table1.png", "table3": "table3.png", "cdm_vs_ddm": "fig4.png", "consistency": "decomposition.png"}


@pytest.fixture(scope="module")
def smoke(ray_session, tmp_path_factory):
    base = tmp_path_factory.mktemp("studies")
    committed = {name: (ROOT / "studies" / name / "results.json") for name in STUDIES}
    before = {name: p.read_bytes() if p.exists() else None for name, p in committed.items()}
    # One process runs the three studies as their scripts do, and their eight `cdm run`s through the console
    # script's entry point (CDM_STUDIES_IN_PROCESS), joined to the suite's Ray: one start-up instead of eleven.
    env = {**os.environ, "CDM_STUDIES_WORKDIR": str(base), "RAY_ADDRESS": ray_session, "CDM_STUDIES_IN_PROCESS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    scripts = [str(ROOT / "studies" / name / "run.py") for name in STUDIES]
    every_study = (
        "import runpy, sys\n"
        f"for script in {scripts!r}:\n"
        "    sys.argv = [script, '--smoke']\n"
        "    runpy.run_path(script, run_name='__main__')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", every_study], env=env, capture_output=True, text=True, timeout=900, cwd=ROOT
    )
    log = base / "miniature-smoke" / "log.txt"
    assert done.returncode == 0, (
        done.stdout[-3000:] + done.stderr[-3000:] + (log.read_text()[-3000:] if log.exists() else "")
    )
    after = {name: p.read_bytes() if p.exists() else None for name, p in committed.items()}
    assert after == before, "a --smoke run wrote over a study's committed results"
    return base / "miniature-smoke"


def test_every_configuration_has_finite_figures_and_the_study_is_one_parent_run(smoke):
    client = mlflow.tracking.MlflowClient(tracking_uri=f"sqlite:///{smoke / 'mlflow.db'}")
    exp = client.get_experiment_by_name("cdm")
    for name, configurations in STUDIES.items():
        data = json.loads((smoke / name / "results.json").read_text())
        assert data["smoke"] is True and list(data["configurations"]) == configurations
        for figures in data["figures"].values():
            fd = figures.get("fd")  # one figure, or one per sampling protocol
            flat = [v for v in figures.values() if isinstance(v, float)] + (
                list(fd.values()) if isinstance(fd, dict) else []
            )
            assert flat and all(math.isfinite(v) for v in flat), (name, figures)
        study_id = data["mlflow"]["study_run_id"]
        study = client.get_run(study_id)
        assert study.info.status == "FINISHED" and study.data.tags["cdm.study"] == name
        children = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{study_id}'")
        assert sorted(r.info.run_name for r in children) == sorted(f"{name}-{c}" for c in configurations)
        assert {r.info.run_id for r in children} == {f["workflow_run_id"] for f in data["figures"].values()}
        logged = {a.path for a in client.list_artifacts(study_id)}
        assert {"results.json", "table.md", FIGURE[name]} <= logged
        assert (smoke / name / FIGURE[name]).stat().st_size > 10_000


def test_the_stages_studies_share_ran_once(smoke):
    def folders(kind: str) -> list[str]:
        return sorted(p.name for p in (smoke / "outputs" / "stages").glob(f"{kind}-*") if p.is_dir())

    # table1's 3 losses, table3's uniform and ot (its linear is table1's both), the DDM (the CDM is both) and
    # consistency's dequantized model (its paper row is both)
    assert len(folders("train")) == 7, folders("train")
    assert len(folders("prepare")) == 1 and len(folders("features")) == 1


def test_the_consistency_decomposition_matches_an_exact_cdm_and_puts_a_shifted_link_at_0_to_1():
    """studies/consistency's ε̂-implied increments log p_t − log p_{t+1} (the continuity equation of the
    probability-flow velocity at a fixed x) against a Gaussian mixture's exact logits: equal up to the
    interpolation between classes, the quadrature and Hutchinson's noise. A constant added to ℓ₀ (what 8-bit
    training leaves untrained) moves ε̂ nowhere, so the split puts all of it at the 0 → 1 link."""
    sys.path.insert(0, str(ROOT / "studies" / "consistency"))
    from decomposition import implied_increments, one_pass_increments  # noqa: PLC0415 -- a study's module

    from cdm_core.mixture import toy_mixture  # noqa: PLC0415 -- only this test needs the core
    from cdm_core.schedules import get_schedule  # noqa: PLC0415

    mix = toy_mixture(2)
    schedule = get_schedule("linear", 100, beta_start=1e-3, beta_end=0.2)
    x, _ = mix.sample(8, torch.Generator().manual_seed(0))
    exact = one_pass_increments(mix.optimal_logits(x, schedule))
    implied = implied_increments(lambda z: mix.optimal_logits(z, schedule), x, schedule, nodes=2, probes=2)
    assert exact.shape == implied.shape == (8, 101)
    assert (implied - exact).mean(0).abs().max() < 0.01, (implied - exact).mean(0)
    assert exact.abs().mean(0).max() > 0.05  # the increments it matches are not all ≈ 0

    def shifted(z):
        return mix.optimal_logits(z, schedule) + 5.0 * torch.nn.functional.one_hot(torch.tensor(0), 102)

    moved = one_pass_increments(shifted(x)) - implied_increments(shifted, x, schedule, nodes=2, probes=2)
    assert torch.allclose(moved[:, 0] - (exact - implied)[:, 0], torch.full((8,), 5.0, dtype=torch.float64))
    assert torch.allclose(moved[:, 1:], (exact - implied)[:, 1:])
