"""Dropout with masks regenerated from Philox (cpp/dropout_cpu.cpp, cuda/dropout.cu)
through one ``_C.DropoutCall`` per call."""

from __future__ import annotations

import torch
from torch import Tensor

from ddetr._native.common import DTYPE_NAMES, device_of, ptr
from ddetr._native.loader import _C


def dropout(x: Tensor, p: float, seed: int, relu: bool) -> Tensor:
    """x contiguous; the mask of element i depends on (seed, i) only."""
    out = torch.empty_like(x)
    _C.dropout(_C.DropoutCall(dtype=DTYPE_NAMES[x.dtype], device=device_of(x), n=x.numel(), p=p,
                              seed=seed, offset=0, relu=relu, x=ptr(x), out=ptr(out)))
    return out


def relu_dropout_backward(out: Tensor, grad_out: Tensor, p: float) -> Tensor:
    """The gradient of relu_dropout from its output (contiguous) and grad_out."""
    grad_x = torch.empty_like(out)
    _C.relu_dropout_backward(_C.DropoutCall(dtype=DTYPE_NAMES[out.dtype], device=device_of(out),
                                            n=out.numel(), p=p, out=ptr(out),
                                            grad_out=ptr(grad_out), grad_x=ptr(grad_x)))
    return grad_x
