"""Convolutions and linear layers in bfloat16 that stay fast on every CPU.

torch runs a bfloat16 convolution or matrix product on the CPU through oneDNN only where
the CPU has AVX512-BW/VL/DQ or AVX-NE-CONVERT; elsewhere (AVX2 CPUs: AMD Zen 2/3, Intel
client chips) it takes reference kernels that are 10-150x slower than the same operation
in float32 (one Zen 3 core: a 64 -> 64 channel 3x3 convolution on a 32x32 map 68 ms
against 0.5 ms; a (2000, 256) x (256, 256) linear 33 ms against 3.2 ms). There
``conv2d`` and ``linear`` widen instead: the bfloat16 inputs and weights become float32
(exactly), the operation runs in float32, and the result is rounded to bfloat16 once, as
ddetr's bfloat16 GEMMs do on such CPUs (``gemm_bf16_kernel`` "widen"). Under CPU
autocast to bfloat16 the same applies to what autocast would run in bfloat16.
Everything else (float32, CUDA, CPUs with oneDNN's bfloat16) is torch's own call.

The path is chosen once per process: ``bf16_cpu_path()`` says which ("onednn" or
"widen"); the environment variable ``DDETR_BF16_CPU`` (``auto``, ``widen``, ``torch``)
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


def bf16_cpu_path() -> str:
    """How a CPU bfloat16 convolution or linear layer runs here: ``"onednn"`` (torch's,
    through oneDNN, where the CPU has its bfloat16 support) or ``"widen"`` (in float32,
    rounded to bfloat16 once); ``DDETR_BF16_CPU`` = ``widen`` / ``torch`` forces one
    (``"torch"``: torch's reference kernels, on a CPU without oneDNN's bfloat16)."""
    choice = os.environ.get("DDETR_BF16_CPU", "auto").strip().lower() or "auto"
    if choice not in _CHOICES:
        raise ValueError(f"DDETR_BF16_CPU: expected one of {_CHOICES}, got {choice!r}")
    if choice == "widen":
        return "widen"
    if choice == "torch":
        return "onednn" if _onednn_bf16() else "torch"
    return "onednn" if _onednn_bf16() else "widen"


def widened(x: Tensor, weight: Tensor) -> bool:
    """Whether an operation of ``x`` with ``weight`` runs in bfloat16 on the CPU (their
    dtype, or autocast's) on the widened path."""
    if x.device.type != "cpu":
        return False
    if torch.is_autocast_enabled("cpu"):
        in_bf16 = torch.get_autocast_dtype("cpu") == torch.bfloat16
    else:
        in_bf16 = x.dtype == torch.bfloat16 and weight.dtype == torch.bfloat16
    return in_bf16 and bf16_cpu_path() == "widen"


def conv2d(x: Tensor, weight: Tensor, bias: Tensor | None = None, stride=1, padding=0,
           dilation=1, groups: int = 1) -> Tensor:
    """``F.conv2d(x, weight, bias, stride, padding, dilation, groups)``; a CPU bfloat16
    convolution on a CPU without oneDNN's bfloat16 runs in float32 and is rounded to
    bfloat16 once (differentiable either way)."""
    if not widened(x, weight):
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    with torch.autocast("cpu", enabled=False):
        out = F.conv2d(x.float(), weight.float(), None if bias is None else bias.float(),
                       stride, padding, dilation, groups)
    return out.to(torch.bfloat16)


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear(x, weight, bias)`` in float32, rounded to bfloat16 once (for the calls
    ``widened`` says so)."""
    with torch.autocast("cpu", enabled=False):
        out = F.linear(x.float(), weight.float(), None if bias is None else bias.float())
    return out.to(torch.bfloat16)


def linear_module(module: nn.Module, x: Tensor) -> Tensor:
    """``module(x)``; a plain ``nn.Linear`` whose call ``widened`` says goes through
    ``linear`` (the heads and query projections, outside the native layers)."""
    if type(module) is nn.Linear and not (module._forward_hooks or module._forward_pre_hooks) \
            and widened(x, module.weight):
        return linear(x, module.weight, module.bias)
    return module(x)


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` (the same parameters and state dict; zero padding) whose bfloat16
    convolution on the CPU goes through ``conv2d``."""

    def forward(self, x: Tensor) -> Tensor:
        if self.padding_mode != "zeros":
            return super().forward(x)
        return conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation,
                      self.groups)
