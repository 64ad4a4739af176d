"""Stages on a cluster that grows: a head with no CPUs (as in cluster/), worker nodes that join later.

An autoscaling cluster (KubeRay `minReplicas: 0`, the launcher's `min_workers: 0`) has no
room for any worker when a stage starts. A batch stage then waits for room, asking the
autoscaler for it, instead of failing or sizing itself from the moment; a sweep keeps the
concurrency it was asked for. On a `ray.cluster_utils.Cluster` the "autoscaler" is the test,
which adds the node.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import ray
from conftest import exact_mixture_checkpoint, leave_suite_ray, prepare_quick
from ray.cluster_utils import Cluster

from pipelines.common import config as cfg
from pipelines.common.config import nest
from pipelines.common.errors import UserError
from pipelines.evaluate.config import NllConfig
from pipelines.evaluate.nll import run as run_nll
from pipelines.train.config import TrainConfig
from pipelines.tune.sweep import _max_concurrent

T = 20


@pytest.fixture(scope="module")
def cluster():
    leave_suite_ray()
    grows = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    ray.init(address=grows.address, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield grows
    ray.shutdown()
    grows.shutdown()


@pytest.fixture(scope="module")
def gmm_and_model(tmp_path_factory):
    data = tmp_path_factory.mktemp("gmm") / "ds"
    prepare_quick("toy2d", data, name="gmm", num_train=20, num_test=120, samples_per_shard=40)
    return data, exact_mixture_checkpoint(data, tmp_path_factory.mktemp("exact"), T)


def test_a_batch_stage_waits_for_the_node_that_joins_after_it_began(cluster, gmm_and_model, tmp_path):
    data, checkpoint = gmm_and_model
    assert ray.cluster_resources().get("CPU", 0) == 0  # nothing can run yet
    outcome: dict = {}

    def stage() -> None:
        try:
            outcome["result"] = run_nll(
                nest(
                    NllConfig,
                    checkpoint=str(checkpoint),
                    dataset=str(data),
                    out=str(tmp_path / "nll"),
                    track=False,
                    address=cluster.address,
                    wait_s=300,
                )
            )
        except BaseException as err:  # noqa: BLE001 -- reported by the assertion below
            outcome["error"] = err

    thread = threading.Thread(target=stage, daemon=True)
    thread.start()
    time.sleep(4)
    assert thread.is_alive() and not outcome, outcome  # waiting for room, not failed, not done
    cluster.add_node(num_cpus=2)  # the autoscaler's new node: one worker plus a CPU for reading
    thread.join(timeout=240)
    assert not thread.is_alive(), "the stage did not finish after the node joined"
    assert "error" not in outcome, outcome.get("error")
    assert outcome["result"].count == 120 and outcome["result"].summary["dequantize"] is False


def test_a_cluster_that_never_gets_the_room_is_refused_after_the_wait(cluster, gmm_and_model, tmp_path):
    data, checkpoint = gmm_and_model
    started = time.monotonic()
    with pytest.raises(UserError, match=r"--workers 9: the Ray cluster has \d+ CPUs after waiting 2 s for more"):
        run_nll(
            nest(
                NllConfig,
                checkpoint=str(checkpoint),
                dataset=str(data),
                out=str(tmp_path / "x"),
                track=False,
                address=cluster.address,
                wait_s=2,
                workers=9,
            )
        )
    assert time.monotonic() - started < 60


def test_a_sweep_on_a_growing_cluster_keeps_the_concurrency_asked_for(cluster):
    config = cfg.load(
        TrainConfig,
        Path(__file__).resolve().parents[1] / "configs" / "train_tiny.toml",
        ["data.uri=unused", "scaling.num_workers=2", "scaling.use_gpu=true", "train.batch_size=8"],
    )
    assert ray.cluster_resources().get("GPU", 0) == 0  # no GPU node up yet
    assert _max_concurrent(config, 3, can_grow=True) == 3  # their workers wait for the nodes the autoscaler adds
    assert _max_concurrent(config, 0, can_grow=True) == 1
    assert _max_concurrent(config, 3, can_grow=False) == 1  # a local Ray cannot grow: one at a time, not a stall
