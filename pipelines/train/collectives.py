"""The collectives of the training workers, each on the process group's own device.

Ray Train's process group is gloo on CPU workers and NCCL on GPU workers, and NCCL
takes CUDA tensors only ("No backend type associated with device type cpu"): a
CPU tensor that gloo accepts in every CPU test crashes the first multi-GPU run.
So every collective of the loop and the validation goes through here, with the
worker's training device (`ray.train.torch.get_device()`, which is what the
group's backend was chosen for), and nothing else in `pipelines.train` calls
`torch.distributed`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_sum(values: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The sum of `values` over the workers, as a tensor on `device` (the input is left as it was)."""
    out = values.to(device=device, copy=True)
    if world_size() > 1:
        dist.all_reduce(out)
    return out


def all_mean(values: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The mean of `values` over the workers, on `device`."""
    return all_sum(values, device) / world_size()


def all_gather_object(obj: Any) -> list[Any]:
    """Every worker's `obj`, by rank (pickled; NCCL sends it from the current CUDA device, which Ray Train sets)."""
    world = world_size()
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out
