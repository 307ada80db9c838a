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
"""

from __future__ import annotations

import torch
from torch import Tensor

from ddetr import _ext
from ddetr.ops import _native
from ddetr.ops.reference import ms_deform_attn_reference


@torch.library.custom_op("ddetr::ms_deform_attn", mutates_args=())
def _msda_op(value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor,
             sampling_locations: Tensor, attention_weights: Tensor) -> Tensor:
    return _native.forward(value, spatial_shapes, level_start_index, sampling_locations,
                           attention_weights)


@_msda_op.register_fake
def _(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    n, _, m, d = value.shape
    return value.new_empty((n, sampling_locations.shape[1], m * d))


@torch.library.custom_op("ddetr::ms_deform_attn_backward", mutates_args=())
def _msda_backward_op(grad_output: Tensor, value: Tensor, spatial_shapes: Tensor,
                      level_start_index: Tensor, sampling_locations: Tensor,
                      attention_weights: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return _native.backward(grad_output, value, spatial_shapes, level_start_index,
                            sampling_locations, attention_weights)


@_msda_backward_op.register_fake
def _(grad_output, value, spatial_shapes, level_start_index, sampling_locations,
      attention_weights):
    return (torch.empty_like(value), torch.empty_like(sampling_locations),
            torch.empty_like(attention_weights))


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad_output):
    value, spatial_shapes, level_start_index, loc, attn = ctx.saved_tensors
    grad_value, grad_loc, grad_attn = _msda_backward_op(
        grad_output, value, spatial_shapes, level_start_index, loc, attn)
    return grad_value, None, None, grad_loc, grad_attn


_msda_op.register_autograd(_backward, setup_context=_setup_context)


def _prepare(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    """Checks the arguments and brings them to the layouts and dtypes the kernels take."""
    if not isinstance(value, Tensor):
        raise ValueError(f"value: expected a torch.Tensor, got {type(value).__name__}")
    spatial_shapes, level_start_index = _native.as_level_tensors(
        spatial_shapes, level_start_index, value.device)
    _native.check_inputs(value, spatial_shapes, sampling_locations, attention_weights)
    acc = _native.acc_dtype(value.dtype)
    return (value.contiguous(), spatial_shapes, level_start_index,
            sampling_locations.to(acc).contiguous(), attention_weights.to(acc).contiguous())


def _cpu_half(value: Tensor) -> bool:
    return value.device.type == "cpu" and value.dtype == torch.float16


def ms_deform_attn(value: Tensor, spatial_shapes, level_start_index: Tensor | None,
                   sampling_locations: Tensor, attention_weights: Tensor) -> Tensor:
    """Multi-scale deformable attention (see the module docstring for the semantics).

    Args:
        value: (N, S, M, D), S = sum of H_l * W_l over the levels.
        spatial_shapes: (L, 2) int64 tensor of (H_l, W_l), or a list of pairs.
        level_start_index: (L,) int64 start row of each level in S, or None to compute it.
        sampling_locations: (N, Lq, M, L, P, 2) normalised (x, y).
        attention_weights: (N, Lq, M, L, P).

    Returns:
        (N, Lq, M * D) in value's dtype. Differentiable in value, sampling_locations and
        attention_weights. Raises ValueError for inconsistent arguments.
    """
    value, spatial_shapes, level_start_index, loc, attn = _prepare(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    if not _ext.available():
        _ext.warn_fallback("ms_deform_attn")
        return ms_deform_attn_reference(value, spatial_shapes, level_start_index, loc, attn)
    if _cpu_half(value):
        # The CPU kernels have no float16 path; float32 gives the same numbers.
        return _msda_op(value.float(), spatial_shapes, level_start_index, loc, attn).half()
    return _msda_op(value, spatial_shapes, level_start_index, loc, attn)


class MSDeformAttnFunction(torch.autograd.Function):
    """Drop-in for the official ``MSDeformAttnFunction``.

    ``MSDeformAttnFunction.apply(value, spatial_shapes, level_start_index,
    sampling_locations, attention_weights, im2col_step)``: ``im2col_step`` is accepted
    for compatibility and ignored (the kernels need no batch chunking).
    """

    @staticmethod
    def forward(ctx, value, spatial_shapes, level_start_index, sampling_locations,
                attention_weights, im2col_step=None):
        inputs = _prepare(value, spatial_shapes, level_start_index, sampling_locations,
                          attention_weights)
        ctx.save_for_backward(*inputs)
        ctx.dtypes = (value.dtype, sampling_locations.dtype, attention_weights.dtype)
        if not _ext.available():
            _ext.warn_fallback("MSDeformAttnFunction")
            return ms_deform_attn_reference(*inputs)
        if _cpu_half(inputs[0]):  # (no float16 CPU kernel: float32 gives the same numbers)
            return _native.forward(inputs[0].float(), *inputs[1:]).half()
        return _native.forward(*inputs)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        value, spatial_shapes, level_start_index, loc, attn = ctx.saved_tensors
        if not _ext.available():
            with torch.enable_grad():
                leaves = [t.detach().requires_grad_() for t in (value, loc, attn)]
                out = ms_deform_attn_reference(leaves[0], spatial_shapes, level_start_index,
                                               leaves[1], leaves[2])
                grads = torch.autograd.grad(out, leaves, grad_output)
        elif _cpu_half(value):
            grads = _native.backward(grad_output.float(), value.float(), spatial_shapes,
                                     level_start_index, loc, attn)
        else:
            grads = _native.backward(grad_output, value, spatial_shapes, level_start_index,
                                     loc, attn)
        grad_value, grad_loc, grad_attn = (g.to(dt) for g, dt in zip(grads, ctx.dtypes))
        return grad_value, None, None, grad_loc, grad_attn, None
