"""Multi-scale deformable attention: the public op, its torch.library registration
and the official drop-in ``MSDeformAttnFunction``.

Semantics (the official op's): ``out[n, q, m*D:(m+1)*D] = sum over levels l and points p
of attention_weights[n, q, m, l, p] * bilinear(value level l, head m, at
sampling_locations[n, q, m, l, p])`` with locations normalised to [0, 1] over the
(padded) level, ``align_corners=False`` and zeros outside the map. A location that is
NaN or infinite counts as outside the map: it contributes nothing and gets zero
gradient. Precision: value and the output keep their dtype (float32, float64,
bfloat16, float16); sampling_locations and attention_weights are used in float32
(float64 when value is float64), and all sums accumulate in float32 (float64).

The registered op takes the level table twice: as the official tensors and, optionally,
as the flat host list ``[H_0, W_0, start_0, H_1, ...]`` of a ``LevelTable``; with the list
the kernels read the levels without copying the tensors to the host on every call.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ddetr import _native
from ddetr._native import msda as native
from ddetr.ops import portable
from ddetr.ops.levels import LevelTable, as_level_table
from ddetr.ops.msda_checks import check_inputs
from ddetr.ops.reference import ms_deform_attn_reference


def _rows(spatial_shapes: Tensor, level_start_index: Tensor,
          levels: list[int] | None) -> list[tuple[int, int, int]]:
    """(H, W, start) per level, from the host list when given (no device copy)."""
    if levels is None:
        return [(h, w, s) for (h, w), s in zip(spatial_shapes.tolist(),
                                                level_start_index.tolist())]
    return list(zip(levels[0::3], levels[1::3], levels[2::3]))


@torch.library.custom_op("ddetr::ms_deform_attn", mutates_args=())
def _msda_op(value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor,
             sampling_locations: Tensor, attention_weights: Tensor,
             levels: list[int] | None = None) -> Tensor:
    return native.forward(value, _rows(spatial_shapes, level_start_index, levels),
                          sampling_locations, attention_weights)


@_msda_op.register_fake
def _(value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
      levels=None):
    n, _, m, d = value.shape
    return value.new_empty((n, sampling_locations.shape[1], m * d))


@torch.library.custom_op("ddetr::ms_deform_attn_backward", mutates_args=())
def _msda_backward_op(grad_output: Tensor, value: Tensor, spatial_shapes: Tensor,
                      level_start_index: Tensor, sampling_locations: Tensor,
                      attention_weights: Tensor, levels: list[int] | None = None
                      ) -> tuple[Tensor, Tensor, Tensor]:
    return native.backward(grad_output, value, _rows(spatial_shapes, level_start_index, levels),
                           sampling_locations, attention_weights)


@_msda_backward_op.register_fake
def _(grad_output, value, spatial_shapes, level_start_index, sampling_locations,
      attention_weights, levels=None):
    return (torch.empty_like(value), torch.empty_like(sampling_locations),
            torch.empty_like(attention_weights))


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:5])
    ctx.levels = inputs[5]


def _backward(ctx, grad_output):
    value, spatial_shapes, level_start_index, loc, attn = ctx.saved_tensors
    grad_value, grad_loc, grad_attn = _msda_backward_op(
        grad_output, value, spatial_shapes, level_start_index, loc, attn, ctx.levels)
    return grad_value, None, None, grad_loc, grad_attn, None


_msda_op.register_autograd(_backward, setup_context=_setup_context)


def _prepare(value, spatial_shapes, level_start_index, sampling_locations, attention_weights
             ) -> tuple[Tensor, LevelTable, Tensor, Tensor]:
    """Checks the arguments and brings them to the layouts and dtypes the kernels take."""
    if not isinstance(value, Tensor):
        raise ValueError(f"value: expected a torch.Tensor, got {type(value).__name__}")
    table = as_level_table(spatial_shapes, level_start_index, value.device)
    check_inputs(value, len(table), sampling_locations, attention_weights)
    acc = native.acc_dtype(value.dtype)
    return (value.contiguous(), table, sampling_locations.to(acc).contiguous(),
            attention_weights.to(acc).contiguous())


def _cpu_half(value: Tensor) -> bool:
    return value.device.type == "cpu" and value.dtype == torch.float16


def ms_deform_attn(value: Tensor, spatial_shapes, level_start_index: Tensor | None,
                   sampling_locations: Tensor, attention_weights: Tensor) -> Tensor:
    """Multi-scale deformable attention (see the module docstring for the semantics).

    Args:
        value: (N, S, M, D), S = sum of H_l * W_l over the levels.
        spatial_shapes: (L, 2) int64 tensor of (H_l, W_l), a list of pairs, or a
            ``LevelTable`` (``Flattened.levels``; level_start_index is then not read).
        level_start_index: (L,) int64 start row of each level in S, or None to compute it.
        sampling_locations: (N, Lq, M, L, P, 2) normalised (x, y).
        attention_weights: (N, Lq, M, L, P).

    Returns:
        (N, Lq, M * D) in value's dtype. Differentiable in value, sampling_locations and
        attention_weights. Raises ValueError for inconsistent arguments.
    """
    value, table, loc, attn = _prepare(value, spatial_shapes, level_start_index,
                                       sampling_locations, attention_weights)
    if portable.active():
        return portable.ms_deform_attn(value, table.spatial_shapes, table.level_start_index,
                                       loc, attn)
    if not _native.runs_natively(value, "ms_deform_attn"):
        return ms_deform_attn_reference(value, table.spatial_shapes, None, loc, attn)
    flat = [size for row in table.rows for size in row]
    if _cpu_half(value):
        # The CPU kernels have no float16 path; float32 gives the same numbers.
        return _msda_op(value.float(), table.spatial_shapes, table.level_start_index, loc,
                        attn, flat).half()
    return _msda_op(value, table.spatial_shapes, table.level_start_index, loc, attn, flat)


class MSDeformAttnFunction(torch.autograd.Function):
    """Drop-in for the official ``MSDeformAttnFunction``.

    ``MSDeformAttnFunction.apply(value, spatial_shapes, level_start_index,
    sampling_locations, attention_weights, im2col_step)``: ``im2col_step`` is accepted
    for compatibility and ignored (the kernels need no batch chunking).
    """

    @staticmethod
    def forward(ctx, value, spatial_shapes, level_start_index, sampling_locations,
                attention_weights, im2col_step=None):
        value, table, loc, attn = _prepare(value, spatial_shapes, level_start_index,
                                           sampling_locations, attention_weights)
        ctx.save_for_backward(value, loc, attn)
        ctx.table = table
        ctx.dtypes = (value.dtype, sampling_locations.dtype, attention_weights.dtype)
        ctx.native = _native.runs_natively(value, "MSDeformAttnFunction")
        if not ctx.native:
            return ms_deform_attn_reference(value, table.spatial_shapes, None, loc, attn)
        if _cpu_half(value):  # (no float16 CPU kernel: float32 gives the same numbers)
            return native.forward(value.float(), list(table.rows), loc, attn).half()
        return native.forward(value, list(table.rows), loc, attn)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        value, loc, attn = ctx.saved_tensors
        table = ctx.table
        if not ctx.native:
            with torch.enable_grad():
                leaves = [t.detach().requires_grad_() for t in (value, loc, attn)]
                out = ms_deform_attn_reference(leaves[0], table.spatial_shapes, None,
                                               leaves[1], leaves[2])
                grads = torch.autograd.grad(out, leaves, grad_output)
        elif _cpu_half(value):
            grads = native.backward(grad_output.float(), value.float(), list(table.rows), loc,
                                    attn)
        else:
            grads = native.backward(grad_output, value, list(table.rows), loc, attn)
        grad_value, grad_loc, grad_attn = (g.to(dt) for g, dt in zip(grads, ctx.dtypes))
        return grad_value, None, None, grad_loc, grad_attn, None
