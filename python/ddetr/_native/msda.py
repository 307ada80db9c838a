"""Multi-scale deformable attention (cpp/msda_cpu.cpp, cuda/msda_*.cu) through one
``_C.MsdaCall`` per pass."""

from __future__ import annotations

import torch
from torch import Tensor

from ddetr._native.common import DTYPE_NAMES, device_of, levels as level_structs, ptr
from ddetr._native.loader import _C


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype of a storage dtype: float64 for float64, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _call(value: Tensor, levels: list[tuple[int, int, int]], loc: Tensor, attn: Tensor,
          **pointers):
    """The MsdaCall of these inputs: sizes from value (N, S, M, D) and loc
    (N, Lq, M, L, P, 2), ``levels`` (H, W, start) per level, and the given pointers."""
    n, s, m, d = value.shape
    _, lq, _, num_levels, points, _ = loc.shape
    return _C.MsdaCall(dtype=DTYPE_NAMES[value.dtype], device=device_of(value), N=n, S=s, M=m,
                       D=d, Lq=lq, L=num_levels, P=points, levels=level_structs(levels),
                       value=ptr(value), sampling_locations=ptr(loc),
                       attention_weights=ptr(attn), **pointers)


def forward(value: Tensor, levels: list[tuple[int, int, int]], loc: Tensor,
            attn: Tensor) -> Tensor:
    """(N, Lq, M * D) output; inputs checked and contiguous, ``levels`` (H, W, start)."""
    n, _, m, d = value.shape
    out = torch.empty((n, loc.shape[1], m * d), dtype=value.dtype, device=value.device)
    _C.msda_forward(_call(value, levels, loc, attn, output=ptr(out)))
    return out


def backward(grad_out: Tensor, value: Tensor, levels: list[tuple[int, int, int]], loc: Tensor,
             attn: Tensor, forward_rows: bool = False) -> tuple[Tensor, ...]:
    """Gradients (value, sampling_locations, attention_weights); with ``forward_rows`` (CPU
    only) also the forward's output, which the CPU backward computes from the corners it
    gathers (the native encoder layer's backward takes its sampled features from there)."""
    grad_out = grad_out.contiguous()
    grad_value = torch.zeros(value.shape, dtype=acc_dtype(value.dtype), device=value.device)
    grad_loc = torch.empty_like(loc)
    grad_attn = torch.empty_like(attn)
    rows = {}
    if forward_rows:
        if value.device.type != "cpu":
            raise ValueError("forward_rows: only the CPU backward computes them")
        n, _, m, d = value.shape
        rows["output"] = torch.empty((n, loc.shape[1], m * d), dtype=value.dtype,
                                     device=value.device)
    call = _call(value, levels, loc, attn, **{k: ptr(v) for k, v in rows.items()},
                 grad_output=ptr(grad_out),
                 grad_value=ptr(grad_value), grad_sampling_locations=ptr(grad_loc),
                 grad_attention_weights=ptr(grad_attn),
                 deterministic=torch.are_deterministic_algorithms_enabled())
    ws_bytes = _C.msda_backward_workspace_bytes(call)
    workspace = torch.empty(ws_bytes, dtype=torch.uint8, device=value.device)
    call.workspace, call.workspace_bytes = ptr(workspace), ws_bytes
    _C.msda_backward(call)
    return (grad_value.to(value.dtype), grad_loc, grad_attn, *rows.values())


# The CPU kernels' run-time settings (ddetr/msda.h MsdaCpuTuning); the pass codes by name.
PASSES = {"auto": 0, "generic": 1, "avx2": 2, "avx512": 3}


def cpu_tuning() -> dict:
    """The settings now in force: the three prefetch distances, and ``vector_pass`` by
    name."""
    t = dict(_C.msda_cpu_tuning())
    t["vector_pass"] = {v: k for k, v in PASSES.items()}[t["vector_pass"]]
    return t


def set_cpu_tuning(corners_ahead_forward: int, corners_ahead_backward: int,
                   queries_ahead: int, vector_pass: str) -> None:
    """Sets them all (the extension checks the ranges and that it has the pass)."""
    _C.set_msda_cpu_tuning(corners_ahead_forward, corners_ahead_backward, queries_ahead,
                           PASSES[vector_pass])


def cpu_passes() -> list[str]:
    """The vector passes this build has, narrowest first (``auto`` runs the last)."""
    widest = _C.msda_cpu_widest_pass()
    return [name for name, code in PASSES.items() if 0 < code <= widest]
