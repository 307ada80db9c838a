"""Pure-PyTorch multi-scale deformable attention, built on ``F.grid_sample``.

An independent implementation of the op's semantics for the tests, and the fallback
when the native extension is missing. It materialises every sample
((N*M, D, Lq, L*P) values), so it is slow and memory-hungry; it exists to be obviously
right, not fast.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ddetr.ops.levels import LevelTable


def ms_deform_attn_reference(value: Tensor, spatial_shapes, level_start_index,
                             sampling_locations: Tensor, attention_weights: Tensor) -> Tensor:
    """Same arguments and result as ``ddetr.ops.ms_deform_attn``.

    ``level_start_index`` is not needed (levels are consecutive) and may be None.
    Non-finite locations are moved far off the map so they contribute nothing, the
    documented semantics of the native op (grid_sample alone would read NaN as -1).
    """
    n, _, m, d = value.shape
    _, lq, _, num_levels, num_points, _ = sampling_locations.shape
    if isinstance(spatial_shapes, LevelTable):
        spatial_shapes = spatial_shapes.spatial_shapes
    shapes = [(int(h), int(w)) for h, w in torch.as_tensor(spatial_shapes).tolist()]
    loc = sampling_locations.to(value.dtype)
    finite = torch.isfinite(loc).all(dim=-1, keepdim=True)
    loc = torch.where(finite, loc, torch.full_like(loc, -100.0))
    grids = 2 * loc - 1  # grid_sample wants [-1, 1]
    per_level = value.split([h * w for h, w in shapes], dim=1)
    samples = []
    for lvl, (h, w) in enumerate(shapes):
        # (N, H*W, M, D) -> (N*M, D, H, W)
        v = per_level[lvl].permute(0, 2, 3, 1).reshape(n * m, d, h, w)
        # (N, Lq, M, P, 2) -> (N*M, Lq, P, 2)
        grid = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)
        samples.append(F.grid_sample(v, grid, mode="bilinear", padding_mode="zeros",
                                     align_corners=False))  # (N*M, D, Lq, P)
    # (N, Lq, M, L, P) -> (N*M, 1, Lq, L*P)
    weights = attention_weights.to(value.dtype).transpose(1, 2).reshape(
        n * m, 1, lq, num_levels * num_points)
    # L x (N*M, D, Lq, P) -> (N*M, D, Lq, L*P) -> (N*M, D, Lq)
    out = (torch.stack(samples, dim=-2).flatten(-2) * weights).sum(-1)
    # (N*M, D, Lq) -> (N, M*D, Lq) -> (N, Lq, M*D)
    return out.view(n, m * d, lq).transpose(1, 2).contiguous()
