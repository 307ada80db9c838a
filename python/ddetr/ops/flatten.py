"""Multi-scale flattening and encoder reference points: the public ops, their
torch.library registration and autograd formulas.

``flatten_multiscale`` turns an L-level pyramid into the encoder's token sequence in
one native pass (forward and backward) instead of PyTorch's flatten / transpose / add /
cat per level. ``encoder_reference_points`` computes the encoder's reference points in
one native pass. Semantics are the official Deformable DETR code's (see
``flatten_reference.py``), except that a level whose first row or column is entirely
padding counts one valid row / column: its valid ratio is 1 / size rather than 0, so
nothing downstream divides by zero (the official code gives NaN reference points).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ddetr import _native
from ddetr._native import flatten as native
from ddetr.ops import flatten_checks, portable
from ddetr.ops.flatten_reference import (Flattened, common_dtype, flatten_multiscale_reference,
                                         ratio_dtype, reference_points_of_sizes)
from ddetr.ops.levels import LevelTable, fail

# ---------------------------------------------------------------- flatten_multiscale


@torch.library.custom_op("ddetr::flatten_multiscale", mutates_args=())
def _flatten_op(features: list[Tensor], masks: list[Tensor], pos_embeds: list[Tensor],
                level_embed: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return native.forward(features, masks, pos_embeds, level_embed, ratio_dtype(features[0].dtype))


@_flatten_op.register_fake
def _(features, masks, pos_embeds, level_embed):
    first = features[0]
    n, c = first.shape[:2]
    s = sum(f.shape[2] * f.shape[3] for f in features)
    return (first.new_empty((n, s, c)), first.new_empty((n, s), dtype=torch.bool),
            first.new_empty((n, s, c)),
            first.new_empty((n, len(features), 2), dtype=ratio_dtype(first.dtype)))


@torch.library.custom_op("ddetr::flatten_multiscale_backward", mutates_args=())
def _flatten_backward_op(grad_src: Tensor, grad_pos: Tensor, level_sizes: list[int],
                         want_features: bool, want_pos_embeds: bool,
                         want_level_embed: bool) -> tuple[list[Tensor], list[Tensor], Tensor]:
    sizes = list(zip(level_sizes[::2], level_sizes[1::2]))
    return native.backward(grad_src, grad_pos, sizes,
                           (want_features, want_pos_embeds, want_level_embed))


@_flatten_backward_op.register_fake
def _(grad_src, grad_pos, level_sizes, want_features, want_pos_embeds, want_level_embed):
    n, _, c = grad_src.shape
    sizes = list(zip(level_sizes[::2], level_sizes[1::2]))

    def maps(wanted):
        return [grad_src.new_empty((n, c, h, w)) for h, w in sizes] if wanted else []

    return (maps(want_features), maps(want_pos_embeds),
            grad_src.new_empty((len(sizes), c) if want_level_embed else (0,)))


def _flatten_setup_context(ctx, inputs, output):
    features, masks, pos_embeds, level_embed = inputs
    ctx.mark_non_differentiable(output[1], output[3])  # mask, valid_ratios
    ctx.level_sizes = [size for f in features for size in f.shape[2:]]
    ctx.num_masks = len(masks)
    ctx.want = (any(f.requires_grad for f in features),
                any(p.requires_grad for p in pos_embeds),
                level_embed is not None and level_embed.requires_grad)


def _flatten_backward(ctx, grad_src, grad_mask, grad_pos, grad_ratios):
    levels = len(ctx.level_sizes) // 2
    grad_features, grad_pos_embeds, grad_level_embed = _flatten_backward_op(
        grad_src, grad_pos, ctx.level_sizes, *ctx.want)
    # Gradients mirror the inputs: one entry per list element, None where not wanted.
    return (grad_features or [None] * levels, [None] * ctx.num_masks,
            grad_pos_embeds or [None] * levels, grad_level_embed if ctx.want[2] else None)


_flatten_op.register_autograd(_flatten_backward, setup_context=_flatten_setup_context)


def flatten_multiscale(features: Sequence[Tensor], masks: Sequence[Tensor] | None,
                       pos_embeds: Sequence[Tensor], level_embed: Tensor | None = None
                       ) -> Flattened:
    """The encoder's token sequence from an L-level pyramid, in one native pass.

    Args:
        features: L tensors (N, C, H_l, W_l).
        masks: L bool tensors (N, H_l, W_l), True on padding; None (or an empty list)
            for a batch without padding.
        pos_embeds: L tensors (N, C, H_l, W_l), the position embedding of each level.
        level_embed: (L, C) learned per-level embedding added to pos, or None.

    Returns:
        ``Flattened(src, mask, pos, spatial_shapes, level_start_index, valid_ratios,
        levels)``
        (see ``Flattened``). src and pos are in the promoted dtype of features,
        pos_embeds and level_embed; valid_ratios in float32 (float64 for float64).
        Differentiable in features, pos_embeds and level_embed; the gradients are
        bitwise reproducible (level_embed's sum runs in float64 in a fixed order).
        A level whose first row or column is all padding gets the ratio 1 / size
        there instead of 0 (no NaN downstream). Raises ValueError naming the argument
        for lists of different lengths, mismatched N or C, a mask that does not match
        its map, non-bool masks or a level_embed that is not (L, C).
    """
    flatten_checks.check_pyramid(features, masks, pos_embeds, level_embed)
    dtype = common_dtype(features, pos_embeds, level_embed)
    if portable.active() or not _native.runs_natively(features[0], "flatten_multiscale"):
        return flatten_multiscale_reference(features, masks, pos_embeds, level_embed)
    device = features[0].device
    # The CPU kernels have no float16 path; float32 gives the same numbers.
    run = torch.float32 if device.type == "cpu" and dtype == torch.float16 else dtype
    src, mask, pos, ratios = _flatten_op(
        [f.to(run).contiguous() for f in features],
        [m.contiguous() for m in masks] if masks else [],
        [p.to(run).contiguous() for p in pos_embeds],
        None if level_embed is None else level_embed.to(run).contiguous())
    table = LevelTable.from_sizes([f.shape[2:] for f in features], device)
    return Flattened(src.to(dtype), mask, pos.to(dtype), table.spatial_shapes,
                     table.level_start_index, ratios, table)


# ---------------------------------------------------------------- encoder_reference_points


@torch.library.custom_op("ddetr::encoder_reference_points", mutates_args=())
def _reference_points_op(valid_ratios: Tensor, level_sizes: list[int]) -> Tensor:
    return native.reference_points(list(zip(level_sizes[::2], level_sizes[1::2])),
                                   valid_ratios)


@_reference_points_op.register_fake
def _(valid_ratios, level_sizes):
    n, levels, _ = valid_ratios.shape
    s = sum(h * w for h, w in zip(level_sizes[::2], level_sizes[1::2]))
    return valid_ratios.new_empty((n, s, levels, 2))


def _reference_points_setup_context(ctx, inputs, output):
    valid_ratios, level_sizes = inputs
    ctx.save_for_backward(valid_ratios)
    ctx.level_sizes = level_sizes


def _reference_points_backward(ctx, grad_out):
    # Rarely needed (ratios usually come from masks), so the formula is the
    # reference's, differentiated by autograd; the ratios are only (N, L, 2).
    (valid_ratios,) = ctx.saved_tensors
    with torch.enable_grad():
        leaf = valid_ratios.detach().requires_grad_()
        sizes = list(zip(ctx.level_sizes[::2], ctx.level_sizes[1::2]))
        (grad,) = torch.autograd.grad(reference_points_of_sizes(sizes, leaf), leaf, grad_out)
    return grad, None


_reference_points_op.register_autograd(_reference_points_backward,
                                       setup_context=_reference_points_setup_context)


def _level_sizes(spatial_shapes) -> list[tuple[int, int]]:
    """(H, W) pairs of a LevelTable, a (L, 2) integer tensor or a sequence of pairs."""
    if isinstance(spatial_shapes, LevelTable):
        return spatial_shapes.sizes
    if isinstance(spatial_shapes, Tensor):
        if spatial_shapes.dtype.is_floating_point or spatial_shapes.dtype == torch.bool:
            fail("spatial_shapes", "an integer tensor", spatial_shapes.dtype)
        if spatial_shapes.dim() != 2 or spatial_shapes.shape[1] != 2:
            fail("spatial_shapes", "shape (L, 2)", tuple(spatial_shapes.shape))
        if torch.compiler.is_compiling():
            # The output length is the sum of H * W: a traced tensor's values are unknown.
            raise ValueError(
                "spatial_shapes: under torch.compile pass the (H, W) pairs as Python ints, "
                "e.g. [f.shape[-2:] for f in features], not a tensor")
        spatial_shapes = spatial_shapes.tolist()
    elif not isinstance(spatial_shapes, Sequence):
        fail("spatial_shapes", "a (L, 2) int64 tensor or a list of (H, W) pairs",
              type(spatial_shapes).__name__)
    if len(spatial_shapes) < 1 or any(
            not isinstance(hw, Sequence) or len(hw) != 2 for hw in spatial_shapes):
        fail("spatial_shapes", "L >= 1 pairs (H, W)", spatial_shapes)
    sizes = [(h, w) for h, w in spatial_shapes]
    if any(h < 1 or w < 1 for h, w in sizes):
        fail("spatial_shapes", "every H and W >= 1", sizes)
    return sizes


def encoder_reference_points(spatial_shapes, valid_ratios: Tensor) -> Tensor:
    """Reference points of every encoder token on every level, in one native pass.

    Token (i, j) of level l sits at the centre of its pixel, normalised by the valid
    part of the level: ``((j + 0.5) / (valid_ratios[n, l, 0] * W_l), (i + 0.5) /
    (valid_ratios[n, l, 1] * H_l))``, then scaled by every level's valid ratios, as in
    the official code.

    Args:
        spatial_shapes: (L, 2) integer tensor of (H_l, W_l), or a list of (H, W) pairs.
            Under torch.compile it must be the pairs (``[f.shape[-2:] for f in
            features]``): the output has sum(H * W) rows, and a traced tensor's values
            are not known (passing a tensor there raises ValueError saying so).
        valid_ratios: (N, L, 2) (width, height) ratios, > 0 (a zero ratio gives inf and
            NaN as in the official code; ``flatten_multiscale`` never returns one).

    Returns:
        (N, S, L, 2) in valid_ratios' dtype (computed in float32, or float64).
    """
    sizes = _level_sizes(spatial_shapes)
    flatten_checks.check_reference_points(sizes, valid_ratios)
    if portable.active() or not _native.runs_natively(valid_ratios, "encoder_reference_points"):
        return reference_points_of_sizes(sizes, valid_ratios)
    run = ratio_dtype(valid_ratios.dtype)
    out = _reference_points_op(valid_ratios.to(run).contiguous(),
                               [size for hw in sizes for size in hw])
    return out.to(valid_ratios.dtype)
