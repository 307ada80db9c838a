"""Two-stage Deformable DETR: one box proposal per encoder pixel, and the sine
embedding of the selected proposals that seeds the decoder queries.

The official ``gen_encoder_output_proposals`` / ``get_proposal_pos_embed`` semantics:
the pixel (i, j) of level l, of a map whose valid (unpadded) size is (h, w), proposes
the box centred at ((j + 0.5) / w, (i + 0.5) / h) with width and height 0.05 * 2**l
(l the level's index in the model's full pyramid, also when some levels were dropped).
Proposals with a coordinate outside (0.01, 0.99), and proposals on padding, are
invalid: their logits are +inf and their encoder features are zeroed.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ddetr.models.position_encoding import interleave_sin_cos, sine_frequencies
from ddetr.models.size_cache import SizeCache, known_unpadded


def proposal_boxes(padding_mask: Tensor, spatial_shapes, dtype=torch.float32,
                   level_ids=None) -> Tensor:
    """(N, S) padding mask and the (H, W) of each level ((L, 2) tensor or pairs) -> (N, S, 4)
    boxes_cxcywh, normalised by each image's valid extent on each level (padding pixels
    get boxes past 1). ``level_ids``: each level's index in the full pyramid, which sets
    its box size (None: 0, 1, ...)."""
    n = padding_mask.shape[0]
    device = padding_mask.device
    boxes, start = [], 0
    if isinstance(spatial_shapes, Tensor):
        spatial_shapes = spatial_shapes.tolist()
    for lvl, (h, w) in enumerate(spatial_shapes):
        # (N, H*W) -> (N, H, W)
        level_mask = padding_mask[:, start:start + h * w].view(n, h, w)
        valid_h = torch.sum(~level_mask[:, :, 0], 1)
        valid_w = torch.sum(~level_mask[:, 0, :], 1)
        # arange, not the official linspace(0, h - 1, h): the same integers, and a
        # symbolic h (torch.export with dynamic sizes) stays symbolic
        ys, xs = torch.meshgrid(torch.arange(h, dtype=dtype, device=device),
                                torch.arange(w, dtype=dtype, device=device), indexing="ij")
        grid = torch.stack([xs, ys], -1)  # (H, W, 2) as (x, y)
        # (N, 2) valid (w, h) -> (N, 1, 1, 2)
        valid = torch.stack([valid_w, valid_h], -1).view(n, 1, 1, 2)
        centres = (grid[None].expand(n, -1, -1, -1) + 0.5) / valid
        level = lvl if level_ids is None else level_ids[lvl]
        sizes = torch.ones_like(centres) * (0.05 * 2.0 ** level)
        # (N, H, W, 4) -> (N, H*W, 4)
        boxes.append(torch.cat([centres, sizes], -1).view(n, -1, 4))
        start += h * w
    return torch.cat(boxes, 1)


def encoder_proposals(padding_mask: Tensor, spatial_shapes, dtype=torch.float32,
                      level_ids=None) -> tuple[Tensor, Tensor]:
    """Returns ``(logits (N, S, 4), keep (N, S, 1) bool)``: the proposals as
    inverse-sigmoid box coordinates (+inf where invalid) and which ones are valid
    (``level_ids`` as ``proposal_boxes``). Without padding (asked on the CPU only, where
    asking costs no device sync) they depend on the sizes alone and are made once per
    sizes (``UNPADDED``), not on every call."""
    if not known_unpadded(padding_mask):
        return _proposals(padding_mask, spatial_shapes, dtype, level_ids)
    if isinstance(spatial_shapes, Tensor):
        spatial_shapes = spatial_shapes.tolist()
    key = (tuple(tuple(int(v) for v in hw) for hw in spatial_shapes),
           None if level_ids is None else tuple(level_ids), dtype, str(padding_mask.device))
    cached = UNPADDED.get(key, lambda: _proposals(padding_mask[:1].clone(), spatial_shapes,
                                                  dtype, level_ids))
    n = padding_mask.shape[0]
    return tuple(t.expand(n, -1, -1) for t in cached)  # (read only: added, masked by)


# the unpadded proposals of the last 8 sizes
UNPADDED = SizeCache(8)


def _proposals(padding_mask: Tensor, spatial_shapes, dtype, level_ids) -> tuple[Tensor, Tensor]:
    boxes = proposal_boxes(padding_mask, spatial_shapes, dtype, level_ids)
    inside = ((boxes > 0.01) & (boxes < 0.99)).all(-1, keepdim=True)
    keep = inside & ~padding_mask[..., None]
    logits = torch.log(boxes / (1 - boxes))
    return logits.masked_fill(~keep, float("inf")), keep


def proposal_pos_embed(logits: Tensor, num_pos_feats: int = 128,
                       temperature: float = 10000) -> Tensor:
    """(N, Q, 4) box logits -> (N, Q, 4 * num_pos_feats) sine embedding of the boxes
    (sigmoid, scaled to [0, 2*pi]; per coordinate, sin on even and cos on odd channels)."""
    return sine_embed(logits.sigmoid(), num_pos_feats, temperature)


def sine_embed(coords: Tensor, num_pos_feats: int = 128, temperature: float = 10000) -> Tensor:
    """(N, Q, K) coordinates in [0, 1] -> (N, Q, K * num_pos_feats) float32: each coordinate
    scaled to [0, 2*pi] and divided by ``num_pos_feats`` frequencies, sin on even and cos on
    odd channels, the coordinates one after the other."""
    freq = sine_frequencies(num_pos_feats, temperature, coords.device)
    angles = (coords.float() * (2 * math.pi))[..., None] / freq  # (N, Q, K, F)
    return interleave_sin_cos(angles).flatten(2)
