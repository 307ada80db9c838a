"""2-D convolution with bfloat16 that stays fast on every CPU.

torch runs a bfloat16 convolution on the CPU through oneDNN only where the CPU has
AVX512-BW/VL/DQ or AVX-NE-CONVERT; elsewhere (AVX2 CPUs: AMD Zen 2/3, Intel client
chips) it takes its reference kernel, which is 50-150x slower than the same convolution
in float32 (68 ms against 0.5 ms for 64 -> 64 channels, 3x3, on a 32x32 map, one Zen 3
core). There ``conv2d`` widens instead: the bfloat16 input and weights become float32
(exactly), the convolution runs in float32, and the result is rounded to bfloat16 once,
as ddetr's bfloat16 GEMMs do on such CPUs (``gemm_bf16_kernel`` "widen"). Under CPU
autocast to bfloat16 the same applies to the convolution autocast would run in
bfloat16. Everything else (float32, CUDA, CPUs with oneDNN's bfloat16) is ``F.conv2d``.

The path is chosen once per process: ``bf16_conv_path()`` says which ("onednn" or
"widen"); the environment variable ``DDETR_BF16_CONV`` (``auto``, ``widen``, ``torch``)
forces one, read at each call (tests force both on any CPU).
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_CHOICES = ("auto", "widen", "torch")


@functools.lru_cache(maxsize=1)
def _onednn_bf16() -> bool:
    return bool(torch.backends.mkldnn.is_available()
                and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def bf16_conv_path() -> str:
    """How a CPU bfloat16 convolution runs here: ``"onednn"`` (torch's, through oneDNN,
    where the CPU has its bfloat16 support) or ``"widen"`` (in float32, rounded to
    bfloat16 once); ``DDETR_BF16_CONV`` = ``widen`` / ``torch`` forces one."""
    choice = os.environ.get("DDETR_BF16_CONV", "auto").strip().lower() or "auto"
    if choice not in _CHOICES:
        raise ValueError(f"DDETR_BF16_CONV: expected one of {_CHOICES}, got {choice!r}")
    if choice == "widen":
        return "widen"
    if choice == "torch":
        return "onednn" if _onednn_bf16() else "torch"
    return "onednn" if _onednn_bf16() else "widen"


def _runs_in_bf16(x: Tensor, weight: Tensor) -> bool:
    if x.device.type != "cpu":
        return False
    if torch.is_autocast_enabled("cpu"):
        return torch.get_autocast_dtype("cpu") == torch.bfloat16
    return x.dtype == torch.bfloat16 and weight.dtype == torch.bfloat16


def conv2d(x: Tensor, weight: Tensor, bias: Tensor | None = None, stride=1, padding=0,
           dilation=1, groups: int = 1) -> Tensor:
    """``F.conv2d(x, weight, bias, stride, padding, dilation, groups)``; a CPU bfloat16
    convolution on a CPU without oneDNN's bfloat16 runs in float32 and is rounded to
    bfloat16 once (differentiable either way)."""
    if not (_runs_in_bf16(x, weight) and bf16_conv_path() == "widen"):
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    with torch.autocast("cpu", enabled=False):
        out = F.conv2d(x.float(), weight.float(), None if bias is None else bias.float(),
                       stride, padding, dilation, groups)
    return out.to(torch.bfloat16)


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` (the same parameters and state dict; zero padding) whose bfloat16
    convolution on the CPU goes through ``conv2d``."""

    def forward(self, x: Tensor) -> Tensor:
        if self.padding_mode != "zeros":
            return super().forward(x)
        return conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation,
                      self.groups)
