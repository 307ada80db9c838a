"""Pure-PyTorch multi-scale flattening and encoder reference points.

Written the way the official Deformable DETR code does it (flatten, transpose, add,
cat per level; meshgrid per level), with the one documented departure of
the native op: a level whose first row or column is entirely padding counts one valid
row / column, so its valid ratio is 1 / size instead of 0 (the official code would
turn that level's reference points into NaN). Used by the tests, the benchmark and as
the fallback when the native extension is missing.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
from torch import Tensor

from ddetr.ops.levels import LevelTable


class Flattened(NamedTuple):
    """The encoder's input sequence built from an L-level pyramid (S = sum of H_l * W_l).

    src: (N, S, C) the feature maps' pixels as tokens, level after level.
    mask: (N, S) bool, True on padding.
    pos: (N, S, C) position embeddings plus each level's level_embed row.
    spatial_shapes: (L, 2) int64 (H_l, W_l).
    level_start_index: (L,) int64 first token of each level.
    valid_ratios: (N, L, 2) (width ratio, height ratio): the unpadded fraction of each
        level per image; float32 (float64 for float64 inputs).
    levels: the same level table as a ``LevelTable`` (Python ints beside those two
        tensors): pass it where the official code passes spatial_shapes, and the native
        calls read the levels without a device-to-host copy.
    """

    src: Tensor
    mask: Tensor
    pos: Tensor
    spatial_shapes: Tensor
    level_start_index: Tensor
    valid_ratios: Tensor
    levels: LevelTable


def common_dtype(features, pos_embeds, level_embed) -> torch.dtype:
    """The dtype src and pos are computed and returned in: all inputs promoted."""
    tensors = list(features) + list(pos_embeds) + ([level_embed] if level_embed is not None
                                                    else [])
    return functools.reduce(torch.promote_types, [t.dtype for t in tensors])


def ratio_dtype(dtype: torch.dtype) -> torch.dtype:
    """valid_ratios (and reference points) dtype: float64 for float64, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def valid_ratio_reference(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """(N, 2) (w, h) ratios of one (N, H, W) padding mask (official formula, clamped)."""
    _, h, w = mask.shape
    valid_h = torch.sum(~mask[:, :, 0], 1).clamp(min=1)
    valid_w = torch.sum(~mask[:, 0, :], 1).clamp(min=1)
    return torch.stack([valid_w.to(dtype) / w, valid_h.to(dtype) / h], -1)


def flatten_multiscale_reference(features, masks, pos_embeds, level_embed=None) -> Flattened:
    """Same arguments and result as ``ddetr.ops.flatten_multiscale``."""
    dtype = common_dtype(features, pos_embeds, level_embed)
    n = features[0].shape[0]
    if not masks:
        masks = [torch.zeros(n, *f.shape[-2:], dtype=torch.bool, device=f.device)
                 for f in features]
    src, mask, pos, sizes = [], [], [], []
    for lvl, (feature, m, pos_embed) in enumerate(zip(features, masks, pos_embeds)):
        sizes.append(tuple(feature.shape[-2:]))
        src.append(feature.to(dtype).flatten(2).transpose(1, 2))  # (N, C, H, W) -> (N, HW, C)
        mask.append(m.flatten(1))                                  # (N, H, W) -> (N, HW)
        p = pos_embed.to(dtype).flatten(2).transpose(1, 2)         # (N, C, H, W) -> (N, HW, C)
        if level_embed is not None:
            p = p + level_embed[lvl].to(dtype).view(1, 1, -1)
        pos.append(p)
    ratios = torch.stack([valid_ratio_reference(m, ratio_dtype(dtype)) for m in masks], 1)
    table = LevelTable.from_sizes(sizes, features[0].device)
    return Flattened(torch.cat(src, 1), torch.cat(mask, 1), torch.cat(pos, 1),
                     table.spatial_shapes, table.level_start_index, ratios, table)


def encoder_reference_points_reference(spatial_shapes, valid_ratios: Tensor) -> Tensor:
    """Same arguments and result as ``ddetr.ops.encoder_reference_points``: (N, S, L, 2)."""
    if isinstance(spatial_shapes, LevelTable):
        spatial_shapes = spatial_shapes.sizes
    elif isinstance(spatial_shapes, Tensor):
        spatial_shapes = spatial_shapes.tolist()
    return reference_points_of_sizes([(h, w) for h, w in spatial_shapes], valid_ratios)


def reference_points_of_sizes(sizes, valid_ratios: Tensor) -> Tensor:
    """The official computation for levels of (H, W) = ``sizes`` (Python ints)."""
    dtype, device = valid_ratios.dtype, valid_ratios.device
    points = []
    for lvl, (h, w) in enumerate(sizes):
        # arange + 0.5: the official linspace(0.5, h - 0.5, h)'s exact values, and a
        # symbolic h (torch.export with dynamic sizes) stays symbolic
        ref_y, ref_x = torch.meshgrid(torch.arange(h, dtype=dtype, device=device) + 0.5,
                                      torch.arange(w, dtype=dtype, device=device) + 0.5,
                                      indexing="ij")
        ref_y = ref_y.reshape(-1)[None] / (valid_ratios[:, None, lvl, 1] * h)  # (N, HW)
        ref_x = ref_x.reshape(-1)[None] / (valid_ratios[:, None, lvl, 0] * w)
        points.append(torch.stack((ref_x, ref_y), -1))                        # (N, HW, 2)
    ref = torch.cat(points, 1)                                                # (N, S, 2)
    return ref[:, :, None] * valid_ratios[:, None]                            # (N, S, L, 2)
