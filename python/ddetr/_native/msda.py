"""Multi-scale deformable attention (cpp/msda_cpu.cpp, cuda/msda_*.cu)."""

from __future__ import annotations

import torch
from torch import Tensor

from ddetr._native.loader import _C
from ddetr._native.common import DTYPE_NAMES, device_of


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype of a storage dtype: float64 for float64, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _sizes(value: Tensor, loc: Tensor) -> tuple[int, ...]:
    n, s, m, d = value.shape
    _, lq, _, levels, points, _ = loc.shape
    return (n, s, m, d, lq, levels, points)


def forward(value: Tensor, levels: list[tuple[int, int, int]], loc: Tensor,
            attn: Tensor) -> Tensor:
    """(N, Lq, M * D) output; inputs checked and contiguous, ``levels`` (H, W, start)."""
    n, _, m, d = value.shape
    out = torch.empty((n, loc.shape[1], m * d), dtype=value.dtype, device=value.device)
    dev = device_of(value)
    _C.msda_forward(DTYPE_NAMES[value.dtype], dev.kind, dev.index, _sizes(value, loc), levels,
                    value.data_ptr(), loc.data_ptr(), attn.data_ptr(), out.data_ptr(),
                    dev.threads, dev.stream)
    return out


def backward(grad_out: Tensor, value: Tensor, levels: list[tuple[int, int, int]], loc: Tensor,
             attn: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients (value, sampling_locations, attention_weights)."""
    grad_out = grad_out.contiguous()
    dev = device_of(value)
    sizes = _sizes(value, loc)
    deterministic = torch.are_deterministic_algorithms_enabled()
    grad_value = torch.zeros(value.shape, dtype=acc_dtype(value.dtype), device=value.device)
    grad_loc = torch.empty_like(loc)
    grad_attn = torch.empty_like(attn)
    ws_bytes = _C.msda_backward_workspace_bytes(dev.kind, dev.index, sizes, levels,
                                                deterministic)
    workspace = torch.empty(ws_bytes, dtype=torch.uint8, device=value.device)
    _C.msda_backward(DTYPE_NAMES[value.dtype], dev.kind, dev.index, sizes, levels,
                     value.data_ptr(), loc.data_ptr(), attn.data_ptr(), grad_out.data_ptr(),
                     grad_value.data_ptr(), grad_loc.data_ptr(), grad_attn.data_ptr(),
                     workspace.data_ptr(), ws_bytes, deterministic, dev.threads, dev.stream)
    return grad_value.to(value.dtype), grad_loc, grad_attn
