"""Full float32 precision for the figures we report.

On Ampere and later GPUs, torch lets cuDNN convolutions use TF32 by default (10-bit
mantissa). Training does not mind; a figure does: a CDM's log p(x) is a difference of
logits of order 1e4 nats, so TF32 can move bits/dim in the third decimal, and GPU
figures would no longer match the CPU-tested ones. Evaluation (NLL, validation,
Fréchet features) therefore runs in full fp32 unless asked otherwise, and records which.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


def set_tf32(allowed: bool) -> None:
    """TF32 for fp32 matmuls and convolutions on or off, for this process (a worker that only evaluates)."""
    torch.backends.cuda.matmul.allow_tf32 = allowed
    torch.backends.cudnn.allow_tf32 = allowed


@contextlib.contextmanager
def tf32(allowed: bool) -> Iterator[None]:
    """TF32 on or off for the block, then as it was (validation inside a training process)."""
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    set_tf32(allowed)
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
