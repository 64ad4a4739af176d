"""What every study shares: the real `cdm` command, a results JSON with its provenance, a markdown table.

A study runs the product's own commands (`cdm run`, `cdm classify`, …) in a subprocess, exactly as a
user would (the suite's smoke run: through the same entry point, in the study's process), into a work
folder outside the repository (default /tmp/cdm-studies/NAME; its MLflow store is there too: `cdm ui
--workdir …` opens it). What it commits is `results.json` (every figure, its convention, the commands,
seconds, machine and commit), a figure and `table.md`.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from mlflow.tracking import MlflowClient

from pipelines.common.tracking import DESCRIPTION_TAG, experiment_id, version_tags

ROOT = Path(__file__).resolve().parents[1]


def workdir(name: str) -> Path:
    base = Path(os.environ.get("CDM_STUDIES_WORKDIR", "/tmp/cdm-studies"))
    path = base / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def cdm(*args: str, log: Path) -> float:
    """Run `cdm ARGS` (this interpreter's package), its output appended to `log`; the seconds it took.

    A failure stops the study with the command's last lines.
    """
    command = [sys.executable, "-m", "pipelines", *args]
    # A machine whose users take turns with Ray: `cdm run` starts a local Ray for its stages, so it waits for
    # the lock (the batch commands a study gives --workers 0 run without Ray).
    if (lock := os.environ.get("CDM_STUDIES_LOCK")) and args[0] == "run":
        command = ["flock", lock, *command]
    start = time.perf_counter()
    with log.open("a") as f:
        f.write(f"$ cdm {' '.join(args)}\n")
        f.flush()
        if os.environ.get("CDM_STUDIES_IN_PROCESS") == "1":
            code = _in_this_process(args, f)
        else:
            code = subprocess.call(command, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    seconds = time.perf_counter() - start
    if code:
        tail = "".join(log.read_text().splitlines(keepends=True)[-30:])
        raise SystemExit(f"cdm {' '.join(args)} failed (exit {code}); the end of {log}:\n{tail}")
    return seconds


def score_test_split(command: str, workflow: dict[str, Any], out: Path, *options: str, log: Path) -> tuple[float, dict]:
    """`cdm COMMAND` (nll, classify) of a `cdm run`'s trained model on its dataset's test split, into `out`,
    tracked in the workflow's store; (seconds, the command's summary.json)."""
    seconds = cdm(
        command,
        workflow["checkpoint"],
        workflow["dataset"],
        "--split",
        "test",
        *options,
        "--out",
        str(out),
        "--tracking-uri",
        workflow["tracking_uri"],
        log=log,
    )
    return seconds, json.loads((out / "summary.json").read_text())


def _in_this_process(args: tuple[str, ...], log) -> int:
    """`cdm ARGS` through the console script's entry point in this process, its output (file descriptors 1
    and 2) into `log`; the exit code. CDM_STUDIES_IN_PROCESS=1 (tests/test_studies.py runs every study's smoke
    in one process): each command saves its start-up, imports and joining Ray, ~8 s on 2 cores."""
    from pipelines.cli import main  # noqa: PLC0415 -- only this path runs the CLI in the study's process

    sys.stdout.flush()
    sys.stderr.flush()
    saved, argv, cwd = (os.dup(1), os.dup(2)), sys.argv, os.getcwd()
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    sys.argv = ["cdm", *args]
    os.chdir(ROOT)
    try:
        main()
        code = 0
    except SystemExit as stop:
        if isinstance(stop.code, str):
            print(stop.code, file=sys.stderr)
        code = stop.code if isinstance(stop.code, int) else int(stop.code is not None)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)
        sys.argv = argv
        os.chdir(cwd)
    return code


def provenance() -> dict[str, Any]:
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True).stdout)
    return {
        "commit": commit + ("+uncommitted" if dirty else ""),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()}",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def write_results(folder: Path, results: dict[str, Any], table: str) -> None:
    """`results.json` (with provenance) and `table.md` next to the study's script; prints the table."""
    (folder / "results.json").write_text(json.dumps({**results, "provenance": provenance()}, indent=2) + "\n")
    (folder / "table.md").write_text(table + "\n")
    print(table)
    print(f"\nwrote {folder / 'results.json'} and {folder / 'table.md'}")


def spread(values: list[float]) -> dict:
    """A figure over seeds: its values, mean and sample standard deviation (None for one seed)."""
    return {
        "values": values,
        "mean": statistics.fmean(values),
        "sd": statistics.stdev(values) if len(values) > 1 else None,
    }


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


# --------------------------------------------------------------------------- the paper in miniature

MINIATURE = ROOT / "studies" / "miniature.toml"
# --smoke: every configuration, every stage, a few steps (tests/test_studies.py); results stay in the work folder.
# Training runs in Ray Train's local mode and the batch stages with workers = 0, all in the `cdm run` process:
# the same loop and the same workers' code, without actors to start for six steps and a few dozen images.
SMOKE = [
    "train.scaling.num_workers=0",
    "sample.workers=0",
    "nll.workers=0",
    "fid.workers=0",
    "train.train.steps=6",
    "train.train.log_every=3",
    "train.validation.every=6",
    "train.validation.t_points=4",
    "train.checkpoint.every=6",
    "sample.n=24",
    "sample.batch_size=24",
    "features.epochs=1",
]


def fd_metric(metrics: dict[str, float], protocol: str = "") -> float:
    """A workflow's FD (eval/fd_<dataset>, or eval/fd_<dataset>_<protocol> for a sampling protocol)."""
    (key,) = [k for k in metrics if k.startswith("eval/fd_") and (not protocol or k.endswith(f"_{protocol}"))]
    return metrics[key]


class Study:
    """One MLflow parent run for a study, and one `cdm run` of `studies/miniature.toml` per configuration.

    Every configuration of every study runs in one work folder, so the stages they share (prepare, the FD
    feature classifier, a model two studies both train) run once; each configuration's workflow parent is a child
    of the study's run, so the UI compares them side by side.
    """

    def __init__(self, name: str, description: str, argv: list[str] | None = None, work: str = "miniature"):
        argv = sys.argv[1:] if argv is None else argv
        self.smoke = "--smoke" in argv
        self.name = name
        self.description = description
        self.work = workdir(work + ("-smoke" if self.smoke else ""))
        self.log = self.work / "log.txt"
        self.tracking_uri = f"sqlite:///{self.work / 'mlflow.db'}"
        self.configurations: dict[str, list[str]] = {}
        self.started = time.perf_counter()
        self.run_id: str | None = None

    def __enter__(self) -> Study:
        self.client = MlflowClient(tracking_uri=self.tracking_uri)
        run = self.client.create_run(
            experiment_id("cdm", self.tracking_uri),
            run_name=f"study-{self.name}",
            tags={**version_tags(), "cdm.stage": "study", "cdm.study": self.name, DESCRIPTION_TAG: self.description},
        )
        self.run_id = run.info.run_id
        return self

    def __exit__(self, kind, value, tb) -> None:
        self.client.set_terminated(self.run_id, status="FINISHED" if kind is None else "FAILED")

    def run(self, configuration: str, *overrides: str, config: Path = MINIATURE) -> dict[str, Any]:
        """`cdm run` of one configuration (its name and --set overrides); its workflow summary, with seconds."""
        settings = [*overrides, *(SMOKE if self.smoke else [])]
        self.configurations[configuration] = list(overrides)
        sets = [a for s in settings for a in ("--set", s)]
        seconds = cdm(
            "run",
            str(config),
            "--workdir",
            str(self.work),
            "--set",
            f"name={self.name}-{configuration}",
            "--set",
            f"tracking.parent_run_id={self.run_id}",
            *sets,
            log=self.log,
        )
        summary = json.loads(
            (self.work / "outputs" / "workflows" / f"{self.name}-{configuration}" / "summary.json").read_text()
        )
        summary["seconds"] = seconds
        return summary

    def out(self, folder: Path) -> Path:
        """Where the study writes its results and figures: beside its script, or in the work folder for --smoke."""
        if not self.smoke:
            return folder
        (self.work / self.name).mkdir(parents=True, exist_ok=True)
        return self.work / self.name

    def artifact_json(self, run_id: str, path: str) -> Any:
        """A JSON artifact of an MLflow run of this study's store (e.g. a train run's val_mse_per_t.json)."""
        local = self.client.download_artifacts(run_id, path, str(self.work))
        return json.loads(Path(local).read_text())

    def finish(self, folder: Path, results: dict[str, Any], table: str, figures: list[Path] = ()) -> None:
        """results.json + table.md (beside the study's script; in the work folder for --smoke), logged to the
        study's MLflow run with its figures."""
        results = {
            "study": self.name,
            "smoke": self.smoke,
            "configurations": self.configurations,
            "base_config": str(MINIATURE.relative_to(ROOT)),
            "mlflow": {"tracking_uri": self.tracking_uri, "study_run_id": self.run_id},
            "seconds": time.perf_counter() - self.started,
            **results,
        }
        out = self.out(folder)
        write_results(out, results, table)
        for path in [out / "results.json", out / "table.md", *figures]:
            self.client.log_artifact(self.run_id, str(path))
        print(f"MLflow: study run {self.run_id} in {self.tracking_uri} (cdm ui --workdir {self.work})")
