"""How each stage's cost grows with the dataset: CIFAR-shaped data at N = 5k, 50k and 200k train images.

The data: the real `cifar10` source fed random pixels (32×32×3 PNG, the worst case for PNG), N train
images and 10k test images at every N; the source pickles are built once and cached under --cache
(default /tmp/cdm-scale/src). Each code tree (`--tree LABEL=PATH`, its own .venv runs its own `cdm`: the
same script measures the code before and after a change) is measured per N, interleaved (every
measurement runs for every tree before the next one) so that machine noise hits all alike:

    prepare         `cdm prepare cifar10` of the N + 10k images: images/s; beside it the PNG-encode rate of
                    one core (`encode_png` in a loop), the limit prepare is compared with
    verify          `cdm verify` (every shard's SHA-256, every sample decoded): seconds
    train           `cdm train configs/train_tiny.toml`, 2 steps, 1 worker: seconds from launch to the first
                    optimizer step (the MLflow timestamp of its train/loss) and to the end; locally and on a
                    moto S3 server (data and run in the bucket), started as tests/test_s3.py starts it
    tune            `cdm tune`, 4 trials of 2 steps, one at a time (2 cores fit one): a trial's start cost is
                    its first step's time less the previous trial's MLflow end time (the first trial's: less
                    the sweep's launch, so it also holds the sweep's own start)
    nll             the NLL stage (`nll.run`, one-pass, 1 worker, batch 100) on the 10k test images with the
                    untrained `tiny` U-Net (T=1000, as benchmarks/eval.py), against the bare forward pass of
                    the same model and batch on one thread; the consistency ELBO is off (extra work, not overhead)
    train-features  `cdm train-features`, 1 epoch: seconds

and for each the driver's peak RSS (VmHWM of the `cdm` process, or of the process calling the NLL stage,
polled every 50 ms). Commands that start Ray hold /tmp/cdm-ray.lock (the machine's Ray lock) while they run.
Prints a table and writes benchmarks/results/scale.json (a run of some trees keeps the other trees' entries).

    python benchmarks/scale.py --tree before=/work/w28old --tree after=. [--sizes 5000,50000,200000]
    python benchmarks/scale.py --table      # the README's table, from scale.json
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import platform
import shutil
import sqlite3
import statistics
import subprocess
import time
from pathlib import Path

from fixtures import fake_cifar, moto_server  # benchmarks/fixtures.py
from provenance import stamp  # benchmarks/provenance.py: run as `python benchmarks/NAME.py`

RESULTS = Path(__file__).parent / "results" / "scale.json"
RAY_LOCK = "/tmp/cdm-ray.lock"
TEST_IMAGES = 10_000
TRIALS = 4
T = 1000  # the NLL model's schedule, as benchmarks/eval.py
BUCKET = "cdm-scale"


# --------------------------------------------------------------------------- data


def fake_cifar_once(root: Path, n_train: int, n_test: int = TEST_IMAGES) -> Path:
    """`fixtures.fake_cifar`, built once per N and kept (the marker says it is whole)."""
    if (root / "complete").exists():
        return root / "cifar-10-batches-py"
    shutil.rmtree(root, ignore_errors=True)
    folder = fake_cifar(root, n_train, n_test, seed=n_train)
    (root / "complete").touch()
    return folder


def png_encode_rate(n: int = 3000) -> float:
    """Images/s of the shards' own PNG encoder on one core, random 32×32×3 pixels."""
    import numpy as np

    from pipelines.data.shards import encode_png

    images = np.random.default_rng(0).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    start = time.perf_counter()
    for image in images:
        encode_png(image)
    return n / (time.perf_counter() - start)


# --------------------------------------------------------------------------- running a command


@contextlib.contextmanager
def ray_lock(needed: bool):
    """The machine's Ray lock, held for one command (other users of Ray wait, and so do we)."""
    if not needed:
        yield
        return
    with open(RAY_LOCK, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _hwm_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def measure(argv: list[str], log: Path, env: dict, cwd: Path, ray: bool) -> dict:
    """Run one command: its launch time (epoch s), wall seconds and peak RSS (MB); a failure raises with its log."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with ray_lock(ray), log.open("w") as out:
        launched, start = time.time(), time.perf_counter()
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd)
        peak = 0.0
        while proc.poll() is None:
            peak = max(peak, _hwm_mb(proc.pid))  # VmHWM only grows: the last reading is within 50 ms of the peak
            time.sleep(0.05)
        wall = time.perf_counter() - start
    if proc.returncode:
        tail = log.read_text()[-3000:]
        raise RuntimeError(f"{' '.join(argv[:3])} … exited {proc.returncode} (log {log}):\n{tail}")
    return {"launched": launched, "seconds": wall, "peak_rss_mb": round(peak, 1)}


def first_steps(db: Path) -> list[tuple[float, float | None]]:
    """(first step's time, run's end time) of each training run in an MLflow SQLite store, in epoch seconds."""
    with contextlib.closing(sqlite3.connect(db)) as con:
        rows = con.execute(
            "SELECT MIN(m.timestamp), r.end_time FROM metrics m JOIN runs r ON r.run_uuid = m.run_uuid "
            "WHERE m.key = 'train/loss' AND m.step = 1 GROUP BY m.run_uuid ORDER BY 1"
        ).fetchall()
    return [(a / 1000, b / 1000 if b else None) for a, b in rows]


# --------------------------------------------------------------------------- the measurements


class Tree:
    def __init__(self, label: str, path: Path, cache: Path):
        self.label, self.path = label, path.resolve()
        self.python = self.path / ".venv" / "bin" / "python"
        self.cdm = str(self.path / ".venv" / "bin" / "cdm")
        git = ["git", "-C", str(self.path), "log", "-1", "--format=%h", "HEAD"]
        self.commit = subprocess.run(git, capture_output=True, text=True, check=True).stdout.strip()
        # The code measured: the last commit outside benchmarks/ (this script's own commits change no stage).
        git += ["--", ".", ":(exclude)benchmarks"]
        self.code_commit = subprocess.run(git, capture_output=True, text=True, check=True).stdout.strip()
        self.work = cache / label
        self.shared: dict[int, Path] = {}  # N → another tree's prepared data, where this one skips prepare
        # Its own cache folder: one tree's verify records are not the other's.
        self.env = {**os.environ, "CDM_CACHE_DIR": str(self.work / "cdm-cache"), "PYTHONUNBUFFERED": "1"}

    def data(self, n: int) -> Path:
        return self.shared.get(n, self.work / f"data-{n}")

    def run(self, argv: list[str], what: str, n: int, ray: bool, env: dict | None = None) -> dict:
        # Run in the measurement's own folder: MLflow's default artifact root (./mlruns) lands there.
        cwd = self.work / "runs" / f"{what}-{n}"
        cwd.mkdir(parents=True, exist_ok=True)
        return measure(argv, self.work / "logs" / f"{what}-{n}.log", env or self.env, cwd, ray)

    def db(self, what: str, n: int) -> Path:
        path = self.work / "runs" / f"{what}-{n}" / "mlflow.db"
        shutil.rmtree(path.parent, ignore_errors=True)
        path.parent.mkdir(parents=True)
        return path


def m_prepare(tree: Tree, n: int, src: Path, _s3) -> dict:
    out = tree.data(n)
    shutil.rmtree(out, ignore_errors=True)
    db = tree.db("prepare", n)
    r = tree.run(
        [tree.cdm, "prepare", "cifar10", "--path", str(src), "--out", str(out), "--tracking-uri", f"sqlite:///{db}"],
        "prepare",
        n,
        ray=False,
    )
    encode = png_encode_rate()  # right after, so the same load hits both
    return {
        "prepare_s": round(r["seconds"], 2),
        "prepare_images_per_s": round((n + TEST_IMAGES) / r["seconds"], 1),
        "png_encode_images_per_s_1core": round(encode, 1),
        "prepare_peak_rss_mb": r["peak_rss_mb"],
    }


def m_verify(tree: Tree, n: int, _src, _s3) -> dict:
    r = tree.run([tree.cdm, "verify", str(tree.data(n))], "verify", n, ray=False)
    return {"verify_s": round(r["seconds"], 2), "verify_peak_rss_mb": r["peak_rss_mb"]}


def _train_argv(tree: Tree, data: str, runs: str, db: Path, name: str) -> list[str]:
    sets = {
        "data.uri": data,
        "train.steps": 2,
        "scaling.num_workers": 1,
        "validation.max_samples": 256,  # the final validation's cost stays the same at every N
        "run.storage_path": runs,
        "run.name": name,
        "tracking.tracking_uri": f"sqlite:///{db}",
    }
    return [tree.cdm, "train", str(tree.path / "configs" / "train_tiny.toml")] + [
        a for k, v in sets.items() for a in ("--set", f"{k}={v}")
    ]


def _train(tree: Tree, n: int, where: str, data: str, runs: str, env: dict | None) -> dict:
    db = tree.db(f"train-{where}", n)
    r = tree.run(_train_argv(tree, data, runs, db, f"scale-{n}"), f"train-{where}", n, ray=True, env=env)
    (first, _end), *_ = first_steps(db)
    return {
        f"train_{where}_first_step_s": round(first - r["launched"], 2),
        f"train_{where}_end_s": round(r["seconds"], 2),
        f"train_{where}_peak_rss_mb": r["peak_rss_mb"],
    }


def m_train_local(tree: Tree, n: int, _src, _s3) -> dict:
    runs = tree.work / "runs" / f"train-local-{n}" / "runs"
    return _train(tree, n, "local", str(tree.data(n)), str(runs), None)


def m_train_s3(tree: Tree, n: int, _src, s3) -> dict:
    import pyarrow.fs as pafs

    prefix = f"{BUCKET}/{tree.label}-{n}"
    # The upload is set-up, not measured; the bucket lives in the server's memory, so it is emptied after.
    pafs.copy_files(str(tree.data(n)), f"{prefix}/data", destination_filesystem=s3["fs"])
    env = {**tree.env, **s3["env"]}
    try:
        # As on local disk, the data is checked once before it is trained on (`cdm verify`; --quick: hashes only).
        checked = tree.run([tree.cdm, "verify", "--quick", f"s3://{prefix}/data"], "verify-s3", n, ray=False, env=env)
        got = _train(tree, n, "s3", f"s3://{prefix}/data", f"s3://{prefix}/runs", env)
        return {**got, "verify_quick_s3_s": round(checked["seconds"], 2)}
    finally:
        s3["fs"].delete_dir(prefix)


def m_tune(tree: Tree, n: int, _src, _s3) -> dict:
    space = tree.work / "space.toml"
    space.write_text(
        '[space]\n"loss.w_ce" = { grid = [1e-3, 2e-3, 5e-3, 1e-2] }\n\n'
        '[tune]\nmetric = "val/nll_bpd"\nscheduler = "fifo"\nmax_concurrent = 1\n'
    )
    db = tree.db("tune", n)
    argv = _train_argv(tree, str(tree.data(n)), str(db.parent / "runs"), db, f"trial-{n}")
    argv[1] = "tune"
    r = tree.run([*argv, "--space", str(space), "--name", f"sweep-{n}"], "tune", n, ray=True)
    runs = first_steps(db)
    if len(runs) != TRIALS:
        raise RuntimeError(f"tune at {n}: {len(runs)} trials took a step, expected {TRIALS}")
    starts = [runs[0][0] - r["launched"]] + [runs[i][0] - runs[i - 1][1] for i in range(1, TRIALS)]
    return {
        "tune_trial_start_s": [round(s, 2) for s in starts],
        "tune_later_trial_start_median_s": round(statistics.median(starts[1:]), 2),
        "tune_wall_s": round(r["seconds"], 2),
        "tune_peak_rss_mb": r["peak_rss_mb"],
    }


def m_nll(tree: Tree, n: int, _src, _s3) -> dict:
    out = tree.work / "runs" / f"nll-{n}"
    shutil.rmtree(out, ignore_errors=True)
    argv = [str(tree.python), str(Path(__file__).resolve()), "--nll-child", str(tree.data(n)), str(out)]
    r = tree.run(argv, "nll", n, ray=True)
    child = json.loads((out / "child.json").read_text())
    return {**child, "nll_peak_rss_mb": r["peak_rss_mb"]}


def m_features(tree: Tree, n: int, _src, _s3) -> dict:
    db = tree.db("features", n)
    argv = [tree.cdm, "train-features", str(tree.data(n)), "--out", str(db.parent / "clf"), "--epochs", "1"]
    r = tree.run([*argv, "--tracking-uri", f"sqlite:///{db}"], "features", n, ray=False)
    return {"train_features_s": round(r["seconds"], 2), "train_features_peak_rss_mb": r["peak_rss_mb"]}


MEASUREMENTS = {
    "prepare": m_prepare,
    "verify": m_verify,
    "train-local": m_train_local,
    "train-s3": m_train_s3,
    "tune": m_tune,
    "nll": m_nll,
    "train-features": m_features,
}


def nll_child(data: str, out: str) -> None:
    """In the tree's own Python: the NLL stage against the bare forward pass, interleaved (as benchmarks/eval.py)."""
    import dataclasses

    import numpy as np
    import ray
    import torch

    from cdm_core.checkpoint import save_checkpoint
    from cdm_core.networks import UNetClassifier, unet_preset
    from pipelines.common.config import nest
    from pipelines.data.readers import LocalReader
    from pipelines.evaluate.config import NllConfig
    from pipelines.evaluate.nll import run as run_nll

    work = Path(out)
    torch.manual_seed(0)
    model = UNetClassifier(unet_preset("tiny", in_channels=3, image_size=32), T).eval()
    config = {"model": {"kind": "cdm"}, "schedule": {"name": "linear", "T": T}, "loss": {"prior": None}}
    save_checkpoint(
        work / "cdm" / "checkpoint.pt", model=model, step=0, config={**config, "data": {"num_labels": None}}
    )
    batch = 100
    x = torch.from_numpy(LocalReader(data, "test").inputs(np.arange(batch)))

    def forward() -> float:
        torch.set_num_threads(1)
        with torch.no_grad():
            model(x)  # warm-up
            times = []
            for _ in range(5):
                start = time.perf_counter()
                model(x)
                times.append(time.perf_counter() - start)
        return batch / statistics.median(times)

    settings = dict(checkpoint=str(work / "cdm"), dataset=data, split="test", workers=1, batch_size=batch)
    settings.update(out=str(work / "scores"), track=False)
    if "consistency_samples" in {f.name for f in dataclasses.fields(NllConfig)}:
        settings["consistency_samples"] = 0  # the code before it had no consistency ELBO: one-pass alone
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    before = forward()
    start = time.perf_counter()
    run_nll(nest(NllConfig, **settings))
    stage = time.perf_counter() - start
    bare = (before + forward()) / 2
    ray.shutdown()
    (work / "child.json").write_text(
        json.dumps(
            {
                "nll_bare_forward_images_per_s": round(bare, 1),
                "nll_stage_images_per_s": round(TEST_IMAGES / stage, 1),
                "nll_stage_s": round(stage, 2),
                "nll_stage_vs_forward_ratio": round(TEST_IMAGES / stage / bare, 3),
            }
        )
    )


# --------------------------------------------------------------------------- the S3 server


@contextlib.contextmanager
def s3_server(work: Path):
    """A moto S3 server with one bucket, started as tests/test_s3.py starts it; the AWS_* env for the commands."""
    import pyarrow.fs as pafs

    with moto_server(work / "moto.log") as endpoint:
        env = {
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_ACCESS_KEY_ID": "cdm-scale-key",
            "AWS_SECRET_ACCESS_KEY": "cdm-scale-secret",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
        }
        fs = pafs.S3FileSystem(
            endpoint_override=endpoint,
            access_key=env["AWS_ACCESS_KEY_ID"],
            secret_key=env["AWS_SECRET_ACCESS_KEY"],
            region="us-east-1",
            allow_bucket_creation=True,
        )
        fs.create_dir(BUCKET)
        yield {"fs": fs, "env": env}


# --------------------------------------------------------------------------- thresholds and tables


def done_when(by_size: dict) -> dict:
    """Issue 28's thresholds, on the smallest and largest N measured (NLL at 50k, or the nearest N measured)."""
    sizes = sorted(by_size, key=int)
    if len(sizes) < 2:
        return {}
    small, big = by_size[sizes[0]], by_size[sizes[-1]]
    checks: dict = {"from": int(sizes[0]), "to": int(sizes[-1])}

    def flat(key: str) -> dict | None:
        if key not in small or key not in big:
            return None
        allowed = max(0.1 * small[key], 5.0)
        grew = big[key] - small[key]
        return {"grew_s": round(grew, 2), "allowed_s": round(allowed, 2), "ok": grew <= allowed}

    for where in ("local", "s3"):
        checks[f"train_{where}_first_step"] = flat(f"train_{where}_first_step_s")
    checks["tune_later_trial_start"] = flat("tune_later_trial_start_median_s")
    rss = {}
    for key in sorted(k for k in small if k.endswith("_peak_rss_mb") and k in big):
        rss[key.removesuffix("_peak_rss_mb")] = {"grew_mb": round(big[key] - small[key], 1)}
        rss[key.removesuffix("_peak_rss_mb")]["ok"] = rss[key.removesuffix("_peak_rss_mb")]["grew_mb"] <= 100
    checks["driver_peak_rss_grows_le_100mb"] = rss
    at = min(sizes, key=lambda s: abs(int(s) - 50_000))
    if "nll_stage_vs_forward_ratio" in by_size[at]:
        ratio = by_size[at]["nll_stage_vs_forward_ratio"]
        checks["nll_ratio_ge_0.9"] = {"at": int(at), "ratio": ratio, "ok": ratio >= 0.9}
    return {k: v for k, v in checks.items() if v is not None}


ROWS = [  # (label, key, format)
    ("`cdm prepare` (images/s)", "prepare_images_per_s", "{:.0f}"),
    ("PNG encode, 1 core (images/s)", "png_encode_images_per_s_1core", "{:.0f}"),
    ("`cdm verify` (s)", "verify_s", "{:.1f}"),
    ("`cdm train` to 1st step, local (s)", "train_local_first_step_s", "{:.1f}"),
    ("`cdm train` to 1st step, s3 (s)", "train_s3_first_step_s", "{:.1f}"),
    ("`cdm tune` start per trial (s)", "tune_later_trial_start_median_s", "{:.1f}"),
    ("`cdm nll` / bare forward", "nll_stage_vs_forward_ratio", "{:.2f}"),
    ("`cdm train-features`, 1 epoch (s)", "train_features_s", "{:.1f}"),
]


def table(data: dict) -> str:
    """Markdown: each figure from the smallest to the largest N, before → after."""

    def heading(label: str) -> str:
        tree = data["trees"][label]
        code = tree.get("code_commit", tree["commit"])
        return f"{label} ({tree['commit']})" if code == tree["commit"] else f"{label} ({tree['commit']}, code {code})"

    labels = [lb for lb in data["trees"] if data["trees"][lb]["by_size"]]
    sizes = sorted({s for lb in labels for s in data["trees"][lb]["by_size"]}, key=int)
    lines = [
        f"| N = {' → '.join(f'{int(s) // 1000}k' for s in sizes)} | " + " | ".join(map(heading, labels)) + " |",
        "|---|" + "---|" * len(labels),
    ]

    def span(by: dict, key: str, fmt: str) -> str:
        return " → ".join(fmt.format(by[s][key]) if key in by.get(s, {}) else "–" for s in sizes)

    for name, key, fmt in ROWS:
        lines.append(f"| {name} | " + " | ".join(span(data["trees"][lb]["by_size"], key, fmt) for lb in labels) + " |")
    rss = []
    for lb in labels:
        by = data["trees"][lb]["by_size"]
        lo, hi = by[min(by, key=int)], by[max(by, key=int)]
        keys = [k for k in lo if k.endswith("_peak_rss_mb") and k in hi]
        worst = max(keys, key=lambda k: hi[k] - lo[k]) if keys else None
        rss.append(f"+{hi[worst] - lo[worst]:.0f} ({worst.removesuffix('_peak_rss_mb')})" if worst else "–")
    lines.append("| driver peak RSS, most growth (MB) | " + " | ".join(rss) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", action="append", default=[], help="LABEL=PATH of a code tree with its .venv")
    parser.add_argument("--sizes", default="5000,50000,200000")
    parser.add_argument("--only", default=",".join(MEASUREMENTS), help="measurements to run, comma-separated")
    parser.add_argument("--skip", default="", help="LABEL:N:MEASUREMENT,… pairs not to run (too slow, say)")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/cdm-scale"))
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--table", action="store_true", help="print the README table from the results and stop")
    parser.add_argument(
        "--wait-for-data",
        action="store_true",
        help="wait until another run of this script has prepared and verified each N (it runs prepare, verify)",
    )
    parser.add_argument("--merge", type=Path, help="add the figures of another results file to --results and stop")
    parser.add_argument("--nll-child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.nll_child:
        nll_child(*args.nll_child)
        return
    data = json.loads(args.results.read_text()) if args.results.exists() else {}
    if args.merge:
        for label, entry in json.loads(args.merge.read_text())["trees"].items():
            mine = data.setdefault("trees", {}).setdefault(label, {"by_size": {}, "commit": entry["commit"]})
            for n, figures in entry["by_size"].items():
                mine["by_size"].setdefault(n, {}).update(figures)
            mine["done_when"] = done_when(mine["by_size"])
        for tree in (Tree(lb, Path(p), args.cache) for lb, p in (t.split("=", 1) for t in args.tree)):
            data["trees"][tree.label].update(commit=tree.commit, code_commit=tree.code_commit)
        data.update(stamp())
        args.results.write_text(json.dumps(data, indent=2) + "\n")
        return
    if args.table:
        print(table(data))
        return
    trees = [Tree(lb, Path(p), args.cache) for lb, p in (t.split("=", 1) for t in args.tree)]
    sizes = [int(s) for s in args.sizes.split(",")]
    only = [m for m in MEASUREMENTS if m in args.only.split(",")]
    skip = set(args.skip.split(",")) - {""}
    data.update(
        {
            "what": __doc__.split("\n\n")[0],
            "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            **stamp(),
            "test_images": TEST_IMAGES,
        }
    )
    data.setdefault("trees", {})
    for tree in trees:
        entry = data["trees"].setdefault(tree.label, {"by_size": {}})
        entry.update(
            {
                "commit": tree.commit,
                "code_commit": tree.code_commit,
                "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            }
        )
        entry["load_average_1min_at_start"] = round(os.getloadavg()[0], 2)

    def save() -> None:
        for tree in trees:
            entry = data["trees"][tree.label]
            entry["done_when"] = done_when(entry["by_size"])
        args.results.parent.mkdir(exist_ok=True)
        args.results.write_text(json.dumps(data, indent=2) + "\n")

    for n in sizes:  # a tree that skips prepare at N reads the first preparing tree's data (the same bytes)
        makers = [t for t in trees if f"{t.label}:{n}:prepare" not in skip]
        for tree in trees:
            if makers and tree not in makers:
                tree.shared[n] = makers[0].data(n)
    with s3_server(args.cache / "moto") if "train-s3" in only else contextlib.nullcontext() as s3:
        for n in sizes:
            src = fake_cifar_once(args.cache / "src" / f"cifar-{n}", n)
            makers = [t for t in trees if f"{t.label}:{n}:prepare" not in skip] or trees
            logs = [t.work / "logs" / f"verify-{n}.log" for t in makers]
            while args.wait_for_data and not all(log.exists() and "ok: " in log.read_text() for log in logs):
                time.sleep(5)  # the stages measure data as a user has it: prepared, then checked once
            for what in only:
                for tree in trees:
                    if f"{tree.label}:{n}:{what}" in skip:
                        continue
                    started = time.perf_counter()
                    try:
                        got = MEASUREMENTS[what](tree, n, src, s3)
                    except Exception as err:  # noqa: BLE001 -- recorded; the other measurements go on
                        got = {f"{what}_error": str(err)[-1500:]}
                    figures = data["trees"][tree.label]["by_size"].setdefault(str(n), {})
                    figures.pop(f"{what}_error", None)  # a measurement that failed before and has now run
                    figures.update(got)
                    print(f"[{tree.label} N={n}] {what} ({time.perf_counter() - started:.0f} s): {got}", flush=True)
                    save()  # after each: a run stopped part-way keeps what it measured
    save()
    print(table(data))
    for tree in trees:
        print(tree.label, json.dumps(data["trees"][tree.label]["done_when"], indent=1))


if __name__ == "__main__":
    main()
