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


# DDP's default bucket size: gradients are all-reduced in flat buckets of about this many bytes.
_BUCKET_BYTES = 25 * 1024 * 1024


def average_gradients(parameters: list[torch.Tensor]) -> None:
    """Replace every parameter's gradient by its mean over the workers, as DistributedDataParallel does.

    For a step that DDP cannot wrap (the compiled step calls the network inside `torch.func.grad`,
    where DDP's forward hooks do not run). Gradients are summed in flat buckets of ~25 MiB (DDP's
    default), on the device they live on, then divided by the world size; a parameter without a
    gradient takes part as zeros, so every worker sends buckets of the same sizes. Unlike DDP the
    reduction starts after the backward, not overlapped with it.
    """
    world = world_size()
    if world == 1:
        return
    for p in parameters:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    bucket: list[torch.Tensor] = []
    size = 0
    for p in parameters:
        if bucket and bucket[-1].dtype != p.grad.dtype:  # a flat bucket holds one dtype
            _reduce_bucket(bucket, world)
            bucket, size = [], 0
        bucket.append(p.grad)
        size += p.grad.numel() * p.grad.element_size()
        if size >= _BUCKET_BYTES:
            _reduce_bucket(bucket, world)
            bucket, size = [], 0
    if bucket:
        _reduce_bucket(bucket, world)


def _reduce_bucket(grads: list[torch.Tensor], world: int) -> None:
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def broadcast_parameters(module: torch.nn.Module) -> None:
    """Give every worker rank 0's parameters and buffers (what DDP does when it wraps a module)."""
    if world_size() == 1:
        return
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            dist.broadcast(tensor.data, src=0)
