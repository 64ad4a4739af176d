"""What the training loop asks of the run it is part of: its rank, its data, its checkpoint, where its reports go.

`RayTrain`: a Ray Train fit, on its workers or in Ray Train's local mode (the `ray.train` functions).

`InTrial`: a `cdm tune` trial that trains in its own Tune actor (`scaling.num_workers = 0`), with no fit
around it: Ray refuses the `ray.train` functions inside a Tune session, so the loop gets what they would give
in local mode (one process, the whole datasets, no checkpoint of Ray's), and each report goes to the trial's
callbacks, as Ray Train's controller passes it to them in a fit.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import ray.train
import ray.train.torch
import torch


class RayTrain:
    """The `ray.train` functions of the fit this loop runs in."""

    def rank_and_world(self) -> tuple[int, int]:
        ctx = ray.train.get_context()
        return ctx.get_world_rank(), ctx.get_world_size()

    def checkpoint(self) -> Optional[ray.train.Checkpoint]:
        return ray.train.get_checkpoint()

    def dataset(self, name: str) -> Any:
        return ray.train.get_dataset_shard(name)

    def prepare_model(self, model: torch.nn.Module, strategy: Optional[str]) -> torch.nn.Module:
        return ray.train.torch.prepare_model(model, move_to_device=False, parallel_strategy=strategy)

    def report(self, metrics: dict[str, Any], checkpoint: Optional[ray.train.Checkpoint], name: str) -> None:
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name)


class InTrial:
    """A trial's own process: rank 0 of 1, the trial's datasets, reports to its callbacks."""

    def __init__(self, datasets: dict[str, Any], callbacks: Sequence[ray.train.UserCallback]):
        self.datasets, self.callbacks = datasets, list(callbacks)
        self.last: tuple[dict[str, Any], Optional[ray.train.Checkpoint]] = ({}, None)

    def rank_and_world(self) -> tuple[int, int]:
        return 0, 1

    def checkpoint(self) -> None:
        return None  # as in Ray's local mode: a continued run names its checkpoint (loop_config's resume_from)

    def dataset(self, name: str) -> Any:
        return self.datasets[name]

    def prepare_model(self, model: torch.nn.Module, strategy: Optional[str]) -> torch.nn.Module:
        return model  # one process: nothing to wrap in DDP

    def report(self, metrics: dict[str, Any], checkpoint: Optional[ray.train.Checkpoint], name: str) -> None:
        self.last = (metrics, checkpoint)
        for callback in self.callbacks:
            callback.after_report(None, [metrics], checkpoint)
