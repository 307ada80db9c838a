"""``MSDeformAttn``: the multi-scale deformable attention module of Deformable DETR.

Parameter names (``sampling_offsets``, ``attention_weights``, ``value_proj``,
``output_proj``), constructor arguments and initialisation follow the official
implementation, so its checkpoints load unchanged.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ddetr.ops import module_linear, ms_deform_attn
from ddetr.ops.levels import as_level_table


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention.

    Args:
        d_model: channels of queries and values (divisible by ``n_heads``).
        n_levels: feature levels sampled (L).
        n_heads: attention heads (M).
        n_points: sampling points per head and level (P).
    """

    def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8,
                 n_points: int = 4):
        super().__init__()
        for name, v in (("d_model", d_model), ("n_levels", n_levels), ("n_heads", n_heads),
                        ("n_points", n_points)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected a positive int, got {v!r}")
        if d_model % n_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        self.d_model, self.n_levels, self.n_heads, self.n_points = d_model, n_levels, n_heads, n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        # Offsets start at zero weight; the bias points head m at angle 2*pi*m/M, scaled so
        # the larger coordinate is 1, and point p at (p + 1) times that: a ring per head.
        nn.init.zeros_(self.sampling_offsets.weight)
        angles = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        direction = torch.stack([angles.cos(), angles.sin()], -1)
        direction = direction / direction.abs().max(-1, keepdim=True).values
        scale = torch.arange(1, self.n_points + 1, dtype=torch.float32)
        # (M, 2) -> (M, L, P, 2)
        bias = direction[:, None, None, :] * scale[None, None, :, None]
        bias = bias.expand(self.n_heads, self.n_levels, self.n_points, 2)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(bias.reshape(-1))
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(self, query: Tensor, reference_points: Tensor, input_flatten: Tensor,
                input_spatial_shapes: Tensor, input_level_start_index: Tensor | None = None,
                input_padding_mask: Tensor | None = None) -> Tensor:
        """
        Args:
            query: (N, Lq, d_model).
            reference_points: (N, Lq, L, 2) normalised (x, y) centres, or (N, Lq, L, 4)
                (cx, cy, w, h) boxes; offsets are then scaled by half the box size.
            input_flatten: (N, S, d_model) flattened multi-scale features.
            input_spatial_shapes: (L, 2) (H_l, W_l), a list of pairs, or a
                ``LevelTable`` (``Flattened.levels``; the start index is then not read).
            input_level_start_index: (L,) or None.
            input_padding_mask: (N, S) bool, True on padding (those values are zeroed).

        Returns:
            (N, Lq, d_model).
        """
        self.check_inputs(query, reference_points, input_flatten, input_spatial_shapes,
                    input_padding_mask)
        value = self.project_value(input_flatten, input_padding_mask)
        return self.attend(query, reference_points, value, input_spatial_shapes,
                           input_level_start_index)

    def project_value(self, input_flatten: Tensor,
                      input_padding_mask: Tensor | None = None) -> Tensor:
        """(N, S, d_model) features -> (N, S, M, D) values, zero on padding."""
        n, s, _ = input_flatten.shape
        value = module_linear(self.value_proj, input_flatten)
        if input_padding_mask is not None:
            value = value.masked_fill(input_padding_mask[..., None], 0.0)
        return value.view(n, s, self.n_heads, self.d_model // self.n_heads)

    def sampling_locations(self, query: Tensor, reference_points: Tensor,
                           input_spatial_shapes) -> tuple[Tensor, Tensor]:
        """``(locations (N, Lq, M, L, P, 2), weights (N, Lq, M, L, P))``: where each head
        samples, normalised (x, y) on the padded maps, and its softmaxed weights."""
        n, lq, _ = query.shape
        m, lv, p = self.n_heads, self.n_levels, self.n_points
        # (N, Lq, M*L*P*2) -> (N, Lq, M, L, P, 2)
        offsets = module_linear(self.sampling_offsets, query).view(n, lq, m, lv, p, 2)
        # (N, Lq, M*L*P) -> softmax over L*P -> (N, Lq, M, L, P)
        logits = module_linear(self.attention_weights, query)
        weights = F.softmax(logits.view(n, lq, m, lv * p), -1)
        ref = reference_points[:, :, None, :, None, :]
        if reference_points.shape[-1] == 2:
            table = as_level_table(input_spatial_shapes, None, query.device)
            shapes = table.spatial_shapes.to(query.device)
            # offsets are in pixels of each level: divided by (W, H), as (1, 1, 1, L, 1, 2);
            # addcdiv is ref + offsets / normalizer in one pass, with the same rounding
            normalizer = shapes.flip(-1).to(offsets.dtype)[None, None, None, :, None, :]
            locations = torch.addcdiv(ref, offsets, normalizer)
        else:
            # boxes: offsets scaled by half the box size (the official formula and order)
            locations = ref[..., :2] + offsets / p * ref[..., 2:] * 0.5
        return locations, weights.view(n, lq, m, lv, p)

    def attend(self, query: Tensor, reference_points: Tensor, value: Tensor,
               input_spatial_shapes, input_level_start_index: Tensor | None = None) -> Tensor:
        """The attention of ``forward`` over already projected ``value`` (N, S, M, D)."""
        table = as_level_table(input_spatial_shapes, input_level_start_index, query.device)
        locations, weights = self.sampling_locations(query, reference_points, table)
        out = ms_deform_attn(value, table, None, locations, weights)
        return module_linear(self.output_proj, out)

    def check_inputs(self, query, reference_points, input_flatten, shapes, padding_mask) -> None:
        """ValueError naming the argument whose shape does not fit this module."""
        if query.dim() != 3 or query.shape[-1] != self.d_model:
            raise ValueError(f"query: expected (N, Lq, {self.d_model}), got {tuple(query.shape)}")
        n, lq = query.shape[:2]
        if input_flatten.dim() != 3 or input_flatten.shape[0] != n \
                or input_flatten.shape[-1] != self.d_model:
            raise ValueError(f"input_flatten: expected ({n}, S, {self.d_model}), "
                             f"got {tuple(input_flatten.shape)}")
        if tuple(reference_points.shape[:3]) != (n, lq, self.n_levels) \
                or reference_points.shape[-1] not in (2, 4) or reference_points.dim() != 4:
            raise ValueError(f"reference_points: expected ({n}, {lq}, {self.n_levels}, 2 or 4), "
                             f"got {tuple(reference_points.shape)}")
        if len(shapes) != self.n_levels:
            raise ValueError(f"input_spatial_shapes: expected {self.n_levels} levels, "
                             f"got {len(shapes)}")
        if padding_mask is not None and (padding_mask.dtype != torch.bool
                                         or tuple(padding_mask.shape) != tuple(input_flatten.shape[:2])):
            raise ValueError(f"input_padding_mask: expected a bool tensor of shape "
                             f"{tuple(input_flatten.shape[:2])}, got {padding_mask.dtype} "
                             f"{tuple(padding_mask.shape)}")
