"""The input projections of the deformable detectors: every backbone level and the extra
stride-2 levels projected to d_model (the official ``input_proj`` modules)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ddetr.ops.bf16_cpu import Conv2d


class _GroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` that also takes groups of a single value (d_model 32 on a 1x1 map
    at batch 1, which torch refuses with "Expected more than 1 value per channel"): such a
    value normalises to 0, so the output is the bias. Same parameters and state dict."""

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() >= 2 and x.shape[1] // self.num_groups * x[0, 0].numel() == 1:
            shape = (1, -1) + (1,) * (x.dim() - 2)
            return torch.zeros_like(x) * self.weight.view(shape) + self.bias.view(shape)
        return super().forward(x)


def input_proj(num_channels: list[int], d_model: int, num_levels: int) -> nn.ModuleList:
    """1x1 conv + GroupNorm(32) per backbone level, then 3x3 stride-2 conv + GroupNorm
    per extra level (the first on the last backbone level, the next on the previous)."""
    projs = [nn.Sequential(Conv2d(c, d_model, 1), _GroupNorm(32, d_model))
             for c in num_channels]
    in_ch = num_channels[-1]
    for _ in range(num_levels - len(num_channels)):
        projs.append(nn.Sequential(Conv2d(in_ch, d_model, 3, stride=2, padding=1),
                                   _GroupNorm(32, d_model)))
        in_ch = d_model
    for proj in projs:
        nn.init.xavier_uniform_(proj[0].weight, gain=1)
        nn.init.zeros_(proj[0].bias)
    return nn.ModuleList(projs)
