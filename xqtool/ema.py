"""Exponential moving average of a model's parameters (spec §5.6, with the buffer defect fixed).

``p_ema ← decay·p_ema + (1 − decay)·p`` for every floating-point parameter after each optimizer
step; buffers (e.g. codebook hit counters) are copied from the live model instead of staying at
their initial values (spec §9.11). The EMA copy lives in fp32 on the model's device, in eval mode,
and never receives gradients.
"""

from __future__ import annotations

import copy
from typing import Dict

import torch
from torch import Tensor, nn


class EMAModel:
    """EMA shadow of `model`.

    Args:
        model: the live (unwrapped) model; a deep copy becomes the shadow.
        decay: EMA decay (0.9999 in the reference).
    Methods: :meth:`update` (after each optimizer step), :meth:`state_dict` / :meth:`load_state_dict`
    (the shadow's full state_dict plus the update counter), :meth:`copy_to` (write EMA weights into a
    model with the same structure).
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999) -> None:
        self.decay = float(decay)
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.num_updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One EMA step from the live `model` (same structure as the shadow)."""
        d = self.decay
        live = dict(model.named_parameters())
        for name, p_ema in self.module.named_parameters():
            p = live.get(name)
            if p is None:
                continue
            if p_ema.dtype.is_floating_point:
                p_ema.lerp_(p.detach().to(p_ema.dtype), 1.0 - d)
            else:
                p_ema.copy_(p.detach())
        live_buf = dict(model.named_buffers())
        for name, b in self.module.named_buffers():
            src = live_buf.get(name)
            if src is not None:
                b.copy_(src.detach())
        self.num_updates += 1

    def state_dict(self) -> Dict[str, Tensor]:
        """The shadow model's state_dict (tensors shared, not cloned)."""
        return self.module.state_dict()

    def load_state_dict(self, state: Dict[str, Tensor]) -> None:
        """Restore the shadow from :meth:`state_dict` output."""
        self.module.load_state_dict(state)

    def to(self, device: torch.device) -> "EMAModel":
        """Move the shadow to `device`."""
        self.module.to(device)
        return self

    def copy_to(self, model: nn.Module) -> None:
        """Load the EMA weights into `model` (same structure)."""
        model.load_state_dict(self.module.state_dict())


class EMAState:
    """Checkpointable wrapper (``state_dict``/``load_state_dict``) for Accelerate's ``register_for_checkpointing``."""

    def __init__(self, ema: EMAModel) -> None:
        self.ema = ema

    def state_dict(self) -> Dict[str, object]:
        return {"shadow": self.ema.state_dict(), "num_updates": self.ema.num_updates, "decay": self.ema.decay}

    def load_state_dict(self, state: Dict[str, object]) -> None:
        self.ema.load_state_dict(state["shadow"])  # type: ignore[arg-type]
        self.ema.num_updates = int(state.get("num_updates", 0))  # type: ignore[arg-type]


__all__ = ["EMAModel", "EMAState"]
