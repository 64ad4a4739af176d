"""Training spread over a 2-node Ray cluster (`ray.cluster_utils.Cluster`: two raylets on this machine)."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import new_store, two_ray_nodes

ray = pytest.importorskip("ray")
pytest.importorskip("mlflow")

from pipelines.common import config as cfg  # noqa: E402
from pipelines.train.config import TrainConfig  # noqa: E402
from pipelines.train.trainer import run  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def two_nodes():
    yield from two_ray_nodes()


def test_two_workers_on_two_nodes(two_nodes, digits_dataset, tmp_path):
    from mlflow.tracking import MlflowClient

    assert len([n for n in ray.nodes() if n["Alive"]]) == 2
    uri = new_store(tmp_path / "mlflow.db")
    config = cfg.load(
        TrainConfig,
        ROOT / "configs" / "train_tiny.toml",
        [
            f"data.uri={digits_dataset}",
            f"run.storage_path={tmp_path / 'runs'}",
            "run.name=spread",
            f"tracking.tracking_uri={uri}",
            "train.steps=6",
            "checkpoint.every=3",
            "validation.every=3",
            "validation.max_samples=64",
            "scaling.num_workers=2",
            "scaling.placement_strategy=STRICT_SPREAD",
        ],
    )
    result = run(config)
    assert result.step == 6 and result.metrics["val/samples"] == 64
    info = MlflowClient(uri).get_run(result.mlflow_run_id)
    assert info.info.status == "FINISHED"
    nodes = info.data.tags["cdm.worker_nodes"].split(",")
    assert len(nodes) == 2 and len(set(nodes)) == 2, nodes  # one worker on each node
    assert [m.step for m in MlflowClient(uri).get_metric_history(result.mlflow_run_id, "train/loss")] == list(
        range(1, 7)
    )
    assert (Path(result.checkpoint) / "checkpoint.pt").is_file()
