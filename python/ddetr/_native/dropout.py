"""Dropout with masks regenerated from Philox (cpp/dropout_cpu.cpp, cuda/dropout.cu)."""

from __future__ import annotations

import torch
from torch import Tensor

from ddetr._native.loader import _C
from ddetr._native.common import DTYPE_NAMES, device_of


def dropout(x: Tensor, p: float, seed: int, relu: bool) -> Tensor:
    """x contiguous; the mask of element i depends on (seed, i) only."""
    out = torch.empty_like(x)
    dev = device_of(x)
    _C.dropout(DTYPE_NAMES[x.dtype], dev.kind, dev.index, x.numel(), p, seed, 0, relu,
               x.data_ptr(), out.data_ptr(), dev.threads, dev.stream)
    return out


def relu_dropout_backward(out: Tensor, grad_out: Tensor, p: float) -> Tensor:
    """The gradient of relu_dropout from its output (contiguous) and grad_out."""
    grad_x = torch.empty_like(out)
    dev = device_of(out)
    _C.relu_dropout_backward(DTYPE_NAMES[out.dtype], dev.kind, dev.index, out.numel(), p,
                             out.data_ptr(), grad_out.data_ptr(), grad_x.data_ptr(),
                             dev.threads, dev.stream)
    return grad_x
