"""Shared test fixtures: small real-format inputs (CIFAR-10 pickles, image folders) and quick prepared datasets."""

from __future__ import annotations

import io
import os
import pickle
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]

# A busy 2-core machine can take over a minute to start a worker group (each worker imports torch while
# the others do); Ray Train's default wait of 60 s then fails the run. Set before any Ray starts, so that
# every controller, in this process's clusters and in the `cdm` commands the tests start, reads it.
os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "300")
# The controller polls its workers every 2 s by default, so each fit waits up to 2 s at every state change
# (started, finished, shut down): a no-op one-worker fit takes 18.95 s, and 12.82 s when polled every 0.25 s
# (benchmarks/results/fit_overhead.json).
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
# A process the suite starts at every fit and never uses: Ray Train's preemption watcher actor (no test drains a
# node; 38 of them, 54 CPU-s, in a run without this, benchmarks/results/suite_cpu.json). The raylet's idle workers
# (`RAY_prestart_worker_first_driver`, 69 never used in that run) stay: no run has shown that the suite is faster
# without them (the PBT failure once seen without them was a race of the test's own, seen with them too).
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")


# `make test` runs pytest in two processes (`-n 2 --dist loadgroup`): every module that may start Ray (a local
# Ray, a `Cluster`, a `cdm` that trains or joins one) is in one xdist group, so Ray tests still run one at a time,
# as a 2-core machine needs; the modules below start no Ray and are the other group, run in the other process
# meanwhile, at a lower CPU priority (the Ray tests are the longer path). A module listed here that starts Ray
# fails (`_no_ray_in_the_parallel_lane`) rather than overload the machine.
PARALLEL_LANE = {
    "test_bad_input_matrix",
    "test_cli_surface",
    "test_cluster_files",
    "test_cluster_ui",
    "test_common",
    "test_compiled_step",
    "test_config",
    "test_devices",
    "test_docs",
    "test_ema_checkpoint",
    "test_features",
    "test_frechet",
    "test_fuzz",
    "test_grad_accum",
    "test_layout",
    "test_learning",
    "test_likelihood_core",
    "test_networks",
    "test_packaging",
    "test_prepare",
    "test_prepare_bad_input",
    "test_readers",
    "test_recipes",
    "test_samplers",
    "test_schedules_objective",
    "test_submit_options",
    "test_tracking",
    "test_train_cli",
    "test_train_units",
    "test_tune_space",
    "test_workflow_plan",
}
RAY_PROCESSES = {"raylet", "gcs_server"}
# The modules whose tests need a Ray of their own (a `Cluster`, `ray start`, a Ray started with the environment
# the workers must see, `cdm` commands that start theirs) run after every module that shares the suite's Ray, and
# leave it first: the suite's Ray then starts once, not again after each of them (~10–15 s a start on 2 cores).
OWN_RAY = (
    "test_submit_cluster",
    "test_tune_resume",
    "test_tune_faults",
    "test_cluster_grows",
    "test_s3",
    "test_train_multinode",
)


def pytest_itemcollected(item):
    # As each test is collected, before any pytest_collection_modifyitems: xdist's reads the group marks there.
    # Two groups, so each of the two processes runs one of them whole (xdist gives each process one group).
    item.add_marker(pytest.mark.xdist_group("lane" if item.module.__name__ in PARALLEL_LANE else "ray"))


def pytest_collection_modifyitems(items):
    # A stable sort: files keep their order, and the tests in a file theirs; xdist sends a group's tests in this order.
    later = {name: i + 1 for i, name in enumerate(OWN_RAY)}
    items.sort(key=lambda item: later.get(item.module.__name__, 0))


@pytest.fixture(autouse=True, scope="module")
def _own_ray_modules_leave_the_suites(request):
    if request.module.__name__ in OWN_RAY:
        leave_suite_ray()


def _ray_started() -> set:
    """This process's Ray: its connection and the Ray servers it started (the suite's Ray, after a Ray module ran
    in this process, stays up for the next)."""
    import psutil

    ray = sys.modules.get("ray")
    found = {p.pid for p in psutil.Process().children(recursive=True) if p.name() in RAY_PROCESSES}
    return found | ({"ray.init"} if ray is not None and ray.is_initialized() else set())


LANE_NICENESS = 10  # CFS gives a nice-10 thread ~1/10 of a core that a nice-0 one also wants


def _lower_this_process_priority() -> None:
    """Every thread of this process (Linux's niceness is per thread; later threads and children inherit it)."""
    for tid in os.listdir("/proc/self/task"):
        try:
            os.setpriority(os.PRIO_PROCESS, int(tid), max(LANE_NICENESS, os.getpriority(os.PRIO_PROCESS, int(tid))))
        except (ProcessLookupError, PermissionError):
            pass


@pytest.fixture(autouse=True)
def _no_ray_in_the_parallel_lane(request):
    lane = request.module.__name__ in PARALLEL_LANE
    # Only where this process runs the lane alone (xdist with two or more processes): its CPU goes to the Ray
    # tests first, since they are the suite's wall time; raising niceness needs no privilege.
    if lane and int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) >= 2 and sys.platform == "linux":
        _lower_this_process_priority()
    before = _ray_started() if lane else set()
    yield
    if lane and (_ray_started() - before):
        pytest.fail(f"{request.module.__name__} started Ray: take it out of PARALLEL_LANE (tests/conftest.py)")


@pytest.fixture(autouse=True, scope="module")
def _isolate_mlflow_tracking_uri():
    """Each test module starts from the MLflow environment the session started with.

    The stages take back what `mlflow.set_tracking_uri()` writes into os.environ
    (pipelines.common.tracking.using_tracking_uri; tests/test_tracking.py checks it), but some tests
    call it themselves, and our default tracking URI honours MLFLOW_TRACKING_URI.
    """
    before = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    import mlflow

    mlflow.set_tracking_uri(before)


_SUITE_RAY: dict[str, str] = {}  # the address of the suite's local Ray while this process is connected to it


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_session():
    """The suite's one local Ray (4 logical CPUs), shared by every module that asks for it; yields its address.

    A start and a shutdown cost ~10 s on 2 cores, so the first module that asks starts it and it stays up for
    the next. `cdm` subprocesses join it through RAY_ADDRESS=address. A module that needs another cluster
    (`two_ray_nodes`, its own environment in the workers) calls `leave_suite_ray()` first, and the next
    module that asks starts a new one. The GCS port is chosen first so that the workers can be told the
    address: Ray Train's placement-group clean-up monitor asks the state API whether the controller lives,
    and without RAY_ADDRESS a worker would ask whichever cluster `ray start` ran last on this machine.
    """
    import ray

    if not (ray.is_initialized() and _SUITE_RAY):
        leave_suite_ray()
        port = free_port()
        address = f"{ray.util.get_node_ip_address()}:{port}"
        with pytest.MonkeyPatch.context() as env:
            env.setenv("RAY_GCS_SERVER_PORT", str(port))
            env.delenv("RAY_ADDRESS", raising=False)
            ray.init(
                address="local",
                num_cpus=4,
                include_dashboard=False,
                log_to_driver=False,
                configure_logging=False,
                runtime_env={"env_vars": {"RAY_ADDRESS": address}},
            )
        assert ray.get_runtime_context().gcs_address == address
        _SUITE_RAY["address"] = address
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield _SUITE_RAY["address"]


def leave_suite_ray() -> None:
    """Shut down whatever Ray this process is connected to (the suite's, before a module starts its own)."""
    import ray

    _SUITE_RAY.clear()
    if ray.is_initialized():
        ray.shutdown()


_EMPTY_STORE: list[Path] = []  # this process's MLflow store as MLflow creates it, made on first use


def new_store(path: Path) -> str:
    """A new MLflow SQLite store at `path` (a file name); returns its URI. A copy of one MLflow created in this
    process: creating a store runs all of MLflow's schema migrations (seconds each), and the Ray tests make ~20."""
    import atexit
    import shutil
    import tempfile

    if not _EMPTY_STORE:
        from mlflow.tracking import MlflowClient

        folder = Path(tempfile.mkdtemp(prefix="cdm-empty-store-"))
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        MlflowClient(f"sqlite:///{folder / 'mlflow.db'}").search_experiments()
        _EMPTY_STORE.append(folder / "mlflow.db")
    if Path(path).exists():
        raise FileExistsError(f"{path} exists: new_store would replace its runs")
    shutil.copyfile(_EMPTY_STORE[0], path)
    return f"sqlite:///{path}"


@pytest.fixture(scope="session")
def cdm_forks():
    """The real `cdm` command for checks that end before any work (bad input): each run is forked from a
    process that has imported what `cdm` imports (tests/cdm_forks.py), 0.2–0.5 s instead of 5–8 s."""
    from cdm_forks import CdmForks

    forks = CdmForks()
    yield forks
    forks.close()


CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def write_cifar10(root: Path, per_batch: int = 12, test: int = 10, seed: int = 0) -> tuple[Path, dict]:
    """A small CIFAR-10 in the exact official python layout; returns (cifar-10-batches-py dir, arrays).

    Like the real files: Python-2-style pickles (protocol 2, bytes keys), 'data' uint8
    (N, 3072) channel-major rows, 'labels' a list of ints, 'filenames' a list of bytes,
    batches.meta with 'label_names'.
    """
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    arrays = {}
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        n = test if name == "test_batch" else per_batch
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, size=n)]
        batch = {
            b"batch_label": f"{name} of test".encode(),
            b"labels": labels,
            b"data": data,
            b"filenames": [f"img_{i}_{j}.png".encode() for j in range(n)],
        }
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
        arrays[name] = (data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels)
    meta = {b"num_cases_per_batch": per_batch, b"label_names": [c.encode() for c in CIFAR_CLASSES], b"num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    (folder / "readme.html").write_text("<html>CIFAR-10</html>")
    return folder, arrays


def tar_gz_folder(folder: Path, out: Path) -> Path:
    """Pack a folder like the official cifar-10-python.tar.gz (members under the folder's name)."""
    with tarfile.open(out, "w:gz") as tar:
        for p in sorted(folder.iterdir()):
            tar.add(p, arcname=f"{folder.name}/{p.name}")
    return out


def write_image_folder(
    root: Path, classes: dict[str, int], size=(10, 12), mode: str = "RGB", seed: int = 0
) -> dict[str, np.ndarray]:
    """root/<class>/<i>.png with random pixels; returns relative path → uint8 array (H, W, C)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = {}
    for cls, n in classes.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            c = 1 if mode == "L" else 3
            arr = rng.integers(0, 256, size=(size[1], size[0], c), dtype=np.uint8)
            Image.fromarray(arr[:, :, 0] if c == 1 else arr, mode=mode).save(root / cls / f"{i:03d}.png")
            out[f"{cls}/{i:03d}.png"] = arr
    return out


def png_bytes(arr: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def prepare_quick(source: str, out, **kw):
    """Run the prepare stage without MLflow (tests of tracking pass track=True themselves)."""
    from pipelines.common.config import nest
    from pipelines.data.config import PrepareConfig
    from pipelines.data.prepare import run

    kw.setdefault("track", False)
    return run(nest(PrepareConfig, source=source, out=str(out), **kw))


@pytest.fixture(scope="session")
def digits_dataset(tmp_path_factory):
    """sklearn digits prepared once per session: 1618 train / 179 test, 8×8×1, 500 per shard."""
    out = tmp_path_factory.mktemp("digits") / "ds"
    prepare_quick("digits", out, samples_per_shard=500)
    return out


def exact_mixture_checkpoint(dataset: Path, folder: Path, T: int) -> Path:
    """checkpoint.pt in `folder` of the exact CDM logits of a toy2d "gmm" dataset's mixture (linear schedule)."""
    from cdm_core.analytic import GaussianMixtureLogits
    from cdm_core.checkpoint import save_checkpoint
    from pipelines.data import shards as sh

    dist = sh.open_dataset(dataset).meta["toy"]["distribution"]
    model = GaussianMixtureLogits(dist["weights"], dist["means"], dist["covariances"], "linear", T)
    path = Path(folder) / "checkpoint.pt"
    config = {
        "model": {"kind": "cdm"},
        "schedule": {"name": "linear", "T": T},
        "loss": {"prior": None},
        "data": {"num_labels": None},
    }
    save_checkpoint(path, model=model, step=0, config=config)
    return path


def cli_in_process(argv: list[str], capsys, monkeypatch) -> tuple[int, str]:
    """`cdm ARGV` through the console script's own entry point in this process: (exit code, stdout + stderr)."""
    from pipelines.cli import main

    monkeypatch.delenv("CDM_DEBUG", raising=False)
    monkeypatch.setattr(sys, "argv", ["cdm", *argv])
    with pytest.raises(SystemExit) as done:
        main()
    out = capsys.readouterr()
    return done.value.code, out.out + out.err


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models gain nothing from threads, and on a shared 2-core machine OpenMP barriers stall them badly."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# The tiny U-Net cut to one level (no down- or upsampling; the middle block's attention stays): the
# compiled-step tests' network, whose CDM graph Inductor builds in ~60 C++ kernels where the two-level
# preset's takes ~150. The presets' own graphs compile in benchmarks/core.py and benchmarks/gpu.sh.
ONE_LEVEL = ("model.channel_mult=[1]", "model.attn_resolutions=[]")


def tiny_train_config(*overrides: str):
    """configs/train_tiny.toml with `overrides`, for steps and networks built outside a run (no dataset)."""
    from pipelines.common import config as cfg
    from pipelines.train.config import TrainConfig

    return cfg.load(TrainConfig, ROOT / "configs" / "train_tiny.toml", ["data.uri=unused", *overrides])


def two_ray_nodes(separate_temp_dirs: bool = False):
    """A 2-node `ray.cluster_utils.Cluster` (2 CPUs each) joined by this process, for a module fixture to
    yield from; `separate_temp_dirs`: each node its own temporary folder, so nothing passes through one disk."""
    import shutil
    import tempfile

    import ray
    from ray.cluster_utils import Cluster

    leave_suite_ray()
    temps = [tempfile.mkdtemp(prefix=f"cdm-{n}-") for n in ("head", "node")] if separate_temp_dirs else [None, None]
    head = {"num_cpus": 2, "include_dashboard": False, **({"temp_dir": temps[0]} if temps[0] else {})}
    cluster = Cluster(initialize_head=True, head_node_args=head)
    cluster.add_node(num_cpus=2, **({"temp_dir": temps[1]} if temps[1] else {}))
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()
        for t in temps:
            if t:
                shutil.rmtree(t, ignore_errors=True)
