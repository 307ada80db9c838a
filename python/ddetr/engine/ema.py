"""An exponential moving average of a model's weights during training (``ddetr train
--ema_decay``), as DINO's and RT-DETR's code keep one: evaluation, the checkpoint's
inference weights and ``ddetr eval`` / ``predict`` / ``compress`` / ``export`` use the
average, while the optimiser keeps training the model itself.

After update ``t`` (counting from 1) every floating-point parameter and buffer (batch
norm statistics too) of the average moves towards the model's by ``1 - d_t``, with
``d_t = min(decay, (1 + t) / (10 + t))``: the average follows the model closely in the
first steps, where it would otherwise be dominated by the random initial weights, and
settles at ``decay`` (a time constant of ``1 / (1 - decay)`` steps). Integer buffers
are copied.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ddetr.models import weights


class WeightAverage:
    """The average (``module``, a copy of the model in eval mode without gradients) and
    its update count. ``decay`` in (0, 1)."""

    def __init__(self, model: nn.Module, decay: float):
        if not isinstance(decay, (int, float)) or not 0.0 < decay < 1.0:
            raise ValueError(f"ema_decay: expected a number in (0, 1) (0 disables the "
                             f"average), got {decay!r}")
        self.decay = float(decay)
        self.updates = 0
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    def current_decay(self) -> float:
        """``d_t`` of the next update."""
        t = self.updates + 1
        return min(self.decay, (1 + t) / (10 + t))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Moves the average towards ``model`` (the same architecture) by one step."""
        weight = 1.0 - self.current_decay()
        mine, theirs = _tensors(self.module), _tensors(model)
        if mine.keys() != theirs.keys():
            raise ValueError("model: its parameters and buffers differ from those of the "
                             "averaged copy (the model was changed after the average was made)")
        floats = [k for k, v in mine.items() if v.is_floating_point()]
        if floats:
            torch._foreach_lerp_([mine[k] for k in floats],
                                 [theirs[k].detach().to(mine[k].dtype) for k in floats], weight)
        for k, v in mine.items():
            if not v.is_floating_point():
                v.copy_(theirs[k])
        self.updates += 1

    def state_dict(self) -> dict:
        return {"model": self.module.state_dict(), "decay": self.decay,
                "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        weights.load_weights(self.module, state["model"], source="checkpoint['ema']",
                             unexpected_ok=True)
        self.updates = int(state.get("updates", 0))


def _tensors(model: nn.Module) -> dict:
    """Every parameter and buffer by name (shared tensors once)."""
    found = dict(model.named_parameters())
    found.update(model.named_buffers())
    return found
