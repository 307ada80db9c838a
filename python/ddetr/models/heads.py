"""Prediction heads: a linear class head and a 3-layer box MLP per decoder layer.

Official initialisation: class bias -log((1 - 0.01) / 0.01) (focal-loss prior of 0.01),
box MLP last layer zero, with its (w, h) bias at -2 (small initial boxes) on the first
(or only, shared) box head, and 0 in two-stage mode. Without box refinement every layer
shares one class and one box head; the ModuleList repeats the same module so the
checkpoint still holds one key copy per layer, as the official one does.
"""

from __future__ import annotations

import copy
import math

import torch.nn.functional as F
from torch import Tensor, nn

from ddetr.ops.bf16_cpu import linear_module


class MLP(nn.Module):
    """``num_layers`` linear layers with ReLU between them (the official box head)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        dims_in = [input_dim] + [hidden_dim] * (num_layers - 1)
        dims_out = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims_in, dims_out))

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers[:-1]:
            x = F.relu(linear_module(layer, x))
        return linear_module(self.layers[-1], x)


def build_heads(d_model: int, num_classes: int, num_pred: int, with_box_refine: bool,
                two_stage: bool) -> tuple[nn.ModuleList, nn.ModuleList]:
    """Returns ``(class_embed, bbox_embed)``, each a ModuleList of ``num_pred`` heads:
    independent copies with box refinement, one shared module otherwise."""
    class_head = nn.Linear(d_model, num_classes)
    nn.init.constant_(class_head.bias, -math.log((1 - 0.01) / 0.01))
    box_head = MLP(d_model, d_model, 4, 3)
    nn.init.zeros_(box_head.layers[-1].weight)
    nn.init.zeros_(box_head.layers[-1].bias)
    if with_box_refine:
        class_embed = nn.ModuleList(copy.deepcopy(class_head) for _ in range(num_pred))
        bbox_embed = nn.ModuleList(copy.deepcopy(box_head) for _ in range(num_pred))
    else:
        class_embed = nn.ModuleList([class_head] * num_pred)
        bbox_embed = nn.ModuleList([box_head] * num_pred)
    size_bias = 0.0 if two_stage else -2.0
    nn.init.constant_(bbox_embed[0].layers[-1].bias[2:], size_bias)
    return class_embed, bbox_embed
