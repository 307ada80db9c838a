"""Multi-scale deformable attention written with gathers: the form ``ddetr export``
puts in an ONNX graph (``--msda standard``), so any runtime runs it.

Every bilinear corner of every sampling point becomes one row index into the flat
value table plus one weight (bilinear weight times attention weight, 0 for a corner
outside its level or a NaN/inf location); the output is the weighted sum of the
gathered rows. Only tensor operations on ``spatial_shapes`` and ``level_start_index``
(no Python ints from them), so a graph traced with dynamic image sizes stays valid for
every size, and no GridSample (which some runtimes lack or miscompile). Same semantics
as ``ms_deform_attn`` (``align_corners=False``, zeros outside the map); the memory it
needs is one (N, M, Lq, L*P, D) gather at a time (one per corner).
"""

from __future__ import annotations

import torch
from torch import Tensor

# the four bilinear corners as (dx, dy) offsets from the floor of the location
_CORNERS = ((0, 0), (1, 0), (0, 1), (1, 1))


def ms_deform_attn_gather(value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor,
                          sampling_locations: Tensor, attention_weights: Tensor) -> Tensor:
    """Same arguments and result as ``ms_deform_attn`` with tensor level tables:
    value (N, S, M, D), spatial_shapes (L, 2) int64, level_start_index (L,) int64,
    sampling_locations (N, Lq, M, L, P, 2), attention_weights (N, Lq, M, L, P);
    returns (N, Lq, M * D) in value's dtype."""
    n, s, m, d = value.shape
    lq, levels, points = sampling_locations.shape[1], sampling_locations.shape[3], \
        sampling_locations.shape[4]
    acc = torch.float64 if value.dtype == torch.float64 else torch.float32

    def as_acc(t: Tensor) -> Tensor:  # (no cast node in a traced graph when not needed)
        return t if t.dtype == acc else t.to(acc)

    # (N, S, M, D) -> (N, M, S, D) -> (N*M*S, D): row (n*M + m)*S + s
    table = as_acc(value).permute(0, 2, 1, 3).reshape(-1, d)
    # (N*M,) -> (N, M, 1, 1, 1): the first row of each (image, head) block
    base = (torch.arange(n * m, device=value.device) * s).view(n, m, 1, 1, 1)
    # (N, Lq, M, L, P, 2) -> (N, M, Lq, L, P, 2)
    loc = as_acc(sampling_locations).permute(0, 2, 1, 3, 4, 5)
    attn = as_acc(attention_weights).permute(0, 2, 1, 3, 4)  # (N, M, Lq, L, P)
    # (L,) -> (L, 1): each level's width, height and first row, beside the L axis
    w_int, h_int = spatial_shapes[:, 1].view(levels, 1), spatial_shapes[:, 0].view(levels, 1)
    w, h = w_int.to(acc), h_int.to(acc)
    start = level_start_index.view(levels, 1)
    # normalised -> pixel coordinates with pixel centres at +0.5 (align_corners=False)
    x = loc[..., 0] * w - 0.5  # (N, M, Lq, L, P)
    y = loc[..., 1] * h - 0.5
    x0, y0 = torch.floor(x), torch.floor(y)
    fx, fy = x - x0, y - y0
    out = table.new_zeros((n, m, lq, d))
    for dx, dy in _CORNERS:
        cx, cy = x0 + dx, y0 + dy
        # NaN and inf fail these comparisons: such a point adds nothing
        inside = (cx >= 0) & (cx < w) & (cy >= 0) & (cy < h)
        weight = (fx if dx else 1 - fx) * (fy if dy else 1 - fy) * attn
        weight = torch.where(inside, weight, torch.zeros_like(weight))
        # integer rows (exact for any S); a corner outside reads row 0 with weight 0
        cx = torch.where(inside, cx, torch.zeros_like(cx)).to(torch.int64)
        cy = torch.where(inside, cy, torch.zeros_like(cy)).to(torch.int64)
        row = base + start + cy * w_int + cx  # (N, M, Lq, L, P)
        # (N*M*Lq*L*P,) rows -> (N, M, Lq, L*P, D)
        gathered = table.index_select(0, row.reshape(-1)).view(n, m, lq, levels * points, d)
        # (N, M, Lq, L, P) -> (N, M, Lq, L*P, 1): weighted sum over the points of all levels
        out = out + (gathered * weight.reshape(n, m, lq, levels * points, 1)).sum(3)
    # (N, M, Lq, D) -> (N, Lq, M, D) -> (N, Lq, M*D)
    out = out.permute(0, 2, 1, 3).reshape(n, lq, m * d)
    return out if out.dtype == value.dtype else out.to(value.dtype)
