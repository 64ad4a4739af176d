"""What a researcher sees (issue 14): a quiet console, and an MLflow UI that opens on comparable runs.

Two real `cdm train` processes (the tiny config on the digits fixture, output redirected to files)
fill a real MLflow store; the first one's console must hold cdm's lines only, no ANSI codes, and its
log file the Ray and MLflow lines it kept off the console. Then a real `cdm ui` serves the store
and Debian's chromium, driven by Playwright, opens the address it prints.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from conftest import free_port
from mlflow.tracking import MlflowClient
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
CDM = str(Path(sys.executable).parent / "cdm")
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]
ANSI = re.compile(r"\x1b\[")
# The lines of Ray, Ray Train, Ray Data, MLflow and the libraries that reached the console before (issue 14).
INTERNALS = [
    "core_worker.cc",
    "Reporting training result",
    "TrainingReport(",
    "Checkpoint successfully created",
    "Progress bars disabled",
    "authentication token",
    "TrainController",
    "RayDeprecationWarning",
    "warnings.warn(",
    "Creating initial",
    "fontManager",
    "(pid=",
    "(RayTrainWorker",
    "INFO ",
]

SCROLL_UNTIL = """text => {
    document.querySelectorAll('*').forEach(e => { if (e.scrollHeight > e.clientHeight + 5) e.scrollTop = e.scrollHeight; });
    return document.body.innerText.includes(text);
}"""

pytestmark = pytest.mark.timeout(600)


def _env() -> dict[str, str]:
    drop = ("MLFLOW_TRACKING_URI", "RAY_ADDRESS", "CDM_DEBUG", "CDM_VERBOSE", "RAY_COLOR_PREFIX")
    # System metrics every second (MLflow's default is 10 s: longer than these runs' training).
    return {**{k: v for k, v in os.environ.items() if k not in drop}, "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "1"}


def _start_train(work: Path, data: Path, tag: str, *sets: str, flags: tuple[str, ...] = (), env=None):
    """A `cdm train` process of the tiny config, its stdout and stderr redirected to files in `work`."""
    argv = [CDM, "train", str(REPO / "configs/train_tiny.toml"), *flags, "--set", f"data.uri={data}"]
    for s in ("run.storage_path=runs", "train.steps=10", "validation.every=10", "sampling.every=10", *sets):
        argv += ["--set", s]
    with (work / f"{tag}.stdout").open("w") as o, (work / f"{tag}.stderr").open("w") as e:
        return subprocess.Popen(argv, cwd=work, env={**_env(), **(env or {})}, stdout=o, stderr=e)


def _finished(process: subprocess.Popen, work: Path, tag: str) -> dict:
    code = process.wait(timeout=500)
    stdout, stderr = (work / f"{tag}.stdout").read_text(), (work / f"{tag}.stderr").read_text()
    assert code == 0, stdout + stderr
    found = re.search(r"^run: (\S+)  folder: (\S+)  mlflow run: ([0-9a-f]{32})$", stdout, re.M)
    assert found, stdout
    return {"stdout": stdout, "stderr": stderr, "name": found[1], "folder": Path(found[2]), "run_id": found[3]}


@pytest.fixture(scope="module")
def two_runs(ray_session, tmp_path_factory, digits_dataset):
    """Two real train runs in one store, side by side: linear on a worker (its own local Ray, as a user's first
    run), and cosine registered, in local mode (`scaling.num_workers=0`) on the suite's Ray."""
    work = tmp_path_factory.mktemp("researcher")
    # The first makes the store, so its log holds MLflow's "Creating initial database tables".
    first = _start_train(work, digits_dataset, "linear")
    deadline = time.monotonic() + 300
    while "cdm train: run" not in (work / "linear.stderr").read_text() and first.poll() is None:
        assert time.monotonic() < deadline, "the first run did not start"
        time.sleep(0.5)
    second = _start_train(
        work,
        digits_dataset,
        "cosine",
        "schedule.name=cosine",
        "scaling.num_workers=0",
        flags=("--register", "digits-tiny"),
        env={"RAY_ADDRESS": ray_session},
    )
    return work, _finished(first, work, "linear"), _finished(second, work, "cosine")


def test_cdm_train_prints_only_its_own_lines(two_runs):
    _, first, second = two_runs
    for run in (first, second):  # on a worker, and in local mode (the loop in the cdm process)
        console = run["stdout"] + run["stderr"]
        assert not ANSI.search(console), console
        leaked = [line for line in console.splitlines() if any(s in line for s in INTERNALS)]
        assert not leaked, console
        assert "finished at step 10" in run["stdout"] and "cdm train: run " in run["stderr"]
        # progress, the run, its 6 final metrics and the consistency reading, the checkpoints, the UI
        assert len(console.splitlines()) <= 14, console
        assert "consistency: one-pass figure" in run["stdout"] and "val/consistency_gap_bpd" not in run["stdout"]
    # What was kept off the console is in the run's folder, uncoloured.
    log = (first["folder"] / "cdm.log").read_text()
    assert "Creating initial MLflow database tables" in log  # the first run made the store
    assert "TrainController" in log or "Reporting training result" in log, log[-3000:]
    assert "(pid=" in log or "RayTrainWorker" in log, log[-3000:]


def test_make_prints_no_recipe_comments():
    if shutil.which("make") is None:
        pytest.skip("no make on this machine")
    dry = subprocess.run(["make", "-n", "-B", "install", "demo"], cwd=REPO, capture_output=True, text=True)
    assert dry.returncode == 0, dry.stderr
    assert not [line for line in dry.stdout.splitlines() if line.lstrip().startswith("#")], dry.stdout


def _start_ui(work: Path, port: int, log: Path) -> tuple[subprocess.Popen, str]:
    handle = log.open("w")
    process = subprocess.Popen(
        [CDM, "ui", "--port", str(port), "--workdir", str(work)],
        env=_env(), stdout=handle, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    deadline = time.monotonic() + 240
    while True:
        assert process.poll() is None, log.read_text()
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as answer:
                if answer.status == 200:
                    break
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        assert time.monotonic() < deadline, "cdm ui did not answer:\n" + log.read_text()
        time.sleep(0.5)
    printed = re.search(r"MLflow UI: (\S+)", log.read_text())
    assert printed, log.read_text()
    return process, printed[1]


@pytest.mark.skipif(
    not Path(CHROMIUM).exists() and not os.environ.get("CDM_REQUIRE_BROWSER"),
    reason="Debian's chromium is not installed (`make test` installs it, and then this test must run)",
)
def test_the_ui_opens_on_comparable_runs_in_a_browser(two_runs, tmp_path):
    from playwright.sync_api import sync_playwright  # noqa: PLC0415 (a test extra)

    work, first, second = two_runs
    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("cdm")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert experiment.tags["mlflow.note.content"]
    run = client.get_run(first["run_id"])
    assert run.data.tags["mlflow.note.content"].startswith("A CDM")
    assert run.data.tags["cdm.version"]
    grids = [a.path for a in client.list_artifacts(first["run_id"], "samples")]
    assert grids, "no sample grid logged"
    with Image.open(client.download_artifacts(first["run_id"], grids[-1], str(tmp_path))) as grid:
        assert min(grid.size) >= 512, grid.size  # enlarged, nearest neighbour, to be seen
    # What a train run holds: its dataset with the shards' digest, system metrics, the resolved config, a model.
    inputs = run.inputs.dataset_inputs
    assert len(inputs) == 1 and len(inputs[0].dataset.digest) == 32, inputs
    assert {t.key: t.value for t in inputs[0].tags}["mlflow.data.context"] == "training"
    assert any(key.startswith("system/cpu") for key in run.data.metrics), sorted(run.data.metrics)
    assert run.data.params["run.name"] == first["name"] and run.data.params["train.steps"] == "10"  # what ran
    local = client.get_run(second["run_id"])  # local mode: one process, the same run
    assert local.data.tags["cdm.local_mode"] == "true" and local.data.params["scaling.num_workers"] == "0"
    assert run.data.tags["cdm.local_mode"] == "false" and run.data.tags["cdm.world_size"] == "1"
    assert sorted(p.name for p in second["folder"].glob("checkpoint_0*")) == ["checkpoint_00000010"]
    models = client.search_logged_models([experiment.experiment_id])
    assert [m.source_run_id for m in models] == [second["run_id"]], models
    assert [v.run_id for v in client.search_model_versions("name = 'digits-tiny'")] == [second["run_id"]]

    port = free_port()
    process, url = _start_ui(work, port, tmp_path / "ui.log")
    assert url == f"http://127.0.0.1:{port}/#/experiments/{experiment.experiment_id}/runs?workflowType=machine_learning"
    base = f"http://127.0.0.1:{port}/#"
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch_persistent_context(
                str(tmp_path / "chromium-profile"),  # a fresh user-data dir
                executable_path=CHROMIUM,
                headless=True,
                args=CHROMIUM_FLAGS,
                viewport={"width": 1600, "height": 1000},
            )
            page = browser.new_page()
            page.set_default_timeout(90_000)
            # The runs table, both runs in it; not the GenAI overview (traces, token usage).
            page.goto(url)
            for name in (first["name"], second["name"]):
                page.get_by_text(name, exact=True).first.wait_for()
            assert page.get_by_text("Token Usage").count() == 0
            assert page.get_by_text("Detect Issues").count() == 0
            page.screenshot(path=str(tmp_path / "runs.png"), full_page=True)
            # The compare view of the two runs, with the validation NLL.
            runs = urllib.parse.quote(json.dumps(sorted([first["run_id"], second["run_id"]])))
            experiments = urllib.parse.quote(json.dumps([experiment.experiment_id]))
            page.goto(f"{base}/compare-runs?runs={runs}&experiments={experiments}")
            # The metrics table renders its rows as they are scrolled to: scroll every pane until the row shows.
            page.wait_for_function(SCROLL_UNTIL, arg="val/nll_bpd", polling=500)
            page.screenshot(path=str(tmp_path / "compare.png"), full_page=True)
            # The train run's artifacts: the sample grid.
            page.goto(f"{base}/experiments/{experiment.experiment_id}/runs/{first['run_id']}/artifacts")
            page.get_by_text("samples", exact=True).first.click()
            page.get_by_text(Path(grids[-1]).name).first.wait_for()
            page.get_by_text(Path(grids[-1]).name).first.click()
            # The preview shows the grid at its size: at least 512 px wide.
            page.wait_for_function("() => [...document.images].some(i => i.complete && i.naturalWidth >= 512)")
            page.screenshot(path=str(tmp_path / "artifacts.png"), full_page=True)
            browser.close()
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)
    for shot in ("runs.png", "compare.png", "artifacts.png"):
        assert (tmp_path / shot).stat().st_size > 10_000, shot


def test_grids_are_enlarged_and_a_conditional_grid_labels_its_rows(tmp_path):
    from pipelines.data.preview import image_grid, labelled_rows, save_png  # noqa: PLC0415

    digits = np.random.default_rng(0).integers(0, 256, size=(64, 8, 8, 1), dtype=np.uint8)
    save_png(image_grid(list(digits)), tmp_path / "grid.png")
    with Image.open(tmp_path / "grid.png") as grid:
        assert min(grid.size) >= 512 and grid.size[0] % 73 == 0  # 8 digits + 9 lines = 73 px, a whole factor
    rows = labelled_rows(image_grid(list(digits[:40]), cols=4), [f"class {k}" for k in range(10)])
    plain = image_grid(list(digits[:40]), cols=4)
    scale = rows.shape[0] // plain.shape[0]
    assert rows.shape[0] >= 512 and rows.shape[1] > plain.shape[1] * scale  # a band of labels on the left
    band = rows[:, : rows.shape[1] - plain.shape[1] * scale, 0]
    for k in range(10):  # each row's label is drawn beside that row
        middle = slice(int((k + 0.3) * rows.shape[0] / 10), int((k + 0.7) * rows.shape[0] / 10))
        assert (band[middle] < 128).any(), k
