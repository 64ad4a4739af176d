"""Exponential moving average of a network's weights.

Samples and likelihoods are evaluated with the EMA weights (decay 0.9999 in the
paper). Like the official CDM code's ``step_start_ema``, the average can start
late: before ``start_step`` updates the EMA simply copies the live weights, so
the random initialisation does not linger in the average for ~10k steps.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from .networks import unwrap_model

__all__ = ["EMA"]


class EMA:
    """A frozen copy of a model whose weights track the live model's.

    ``ema.model`` is in eval mode with ``requires_grad=False``. Call
    ``update(model)`` once per optimiser step; the model may be wrapped in
    DistributedDataParallel or torch.compile. Buffers are copied, not averaged
    (they may be integer counters, and copying is what NVlabs/edm does).
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, start_step: int = 0) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        if start_step < 0:
            raise ValueError(f"EMA start_step must be >= 0, got {start_step}")
        self.decay = float(decay)
        self.start_step = int(start_step)
        self.num_updates = 0
        self.model = copy.deepcopy(unwrap_model(model)).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the EMA one step towards ``model`` (or copy it exactly during warm-up)."""
        source = unwrap_model(model)
        ema_params = list(self.model.parameters())
        src_params = [p.detach() for p in source.parameters()]
        if len(ema_params) != len(src_params):
            raise ValueError("EMA.update got a model with a different architecture from the one the EMA was built from")
        if self.num_updates < self.start_step:
            torch._foreach_copy_(ema_params, src_params)
        else:
            torch._foreach_lerp_(ema_params, src_params, 1.0 - self.decay)
        for ema_buffer, src_buffer in zip(self.model.buffers(), source.buffers()):
            ema_buffer.copy_(src_buffer)
        self.num_updates += 1

    def state_dict(self) -> dict[str, Any]:
        """Weights plus the update counter (tensors and plain Python types only)."""
        return {
            "decay": self.decay,
            "start_step": self.start_step,
            "num_updates": self.num_updates,
            "model": self.model.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore weights and the update counter.

        ``decay`` and ``start_step`` stay as constructed: the run's current
        config is the one source of truth for hyperparameters.
        """
        self.model.load_state_dict(state["model"])
        self.num_updates = int(state["num_updates"])
