"""Multi-scale flattening and the encoder reference points (cpp/flatten_cpu.cpp,
cuda/flatten.cu). Lists of per-level tensors cross as lists of pointers, the level table
as (H, W) pairs (the starts and S are derived natively)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ddetr._native.loader import _C
from ddetr._native.common import DTYPE_NAMES, device_of, ptr, ptrs


def _sizes(features) -> list[tuple[int, int]]:
    return [(f.shape[2], f.shape[3]) for f in features]


def forward(features: list[Tensor], masks: list[Tensor], pos_embeds: list[Tensor],
            level_embed: Tensor | None, ratio_dtype: torch.dtype
            ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """src, mask, pos, valid_ratios. Inputs checked, contiguous and in one dtype the
    kernels take; ``masks`` empty for "no padding"."""
    first = features[0]
    n, c = first.shape[:2]
    s = sum(h * w for h, w in _sizes(features))
    src = first.new_empty((n, s, c))
    pos = first.new_empty((n, s, c))
    mask = torch.empty((n, s), dtype=torch.bool, device=first.device)
    ratios = torch.empty((n, len(features), 2), dtype=ratio_dtype, device=first.device)
    dev = device_of(first)
    _C.flatten_forward(DTYPE_NAMES[first.dtype], dev.kind, dev.index, n, c, _sizes(features),
                       ptrs(features), ptrs(masks), ptrs(pos_embeds), ptr(level_embed),
                       src.data_ptr(), pos.data_ptr(), mask.data_ptr(), ratios.data_ptr(),
                       dev.threads, dev.stream)
    return src, mask, pos, ratios


def backward(grad_src: Tensor, grad_pos: Tensor, sizes: Sequence[tuple[int, int]],
             want: tuple[bool, bool, bool]) -> tuple[list[Tensor], list[Tensor], Tensor]:
    """Gradients of (features, pos_embeds, level_embed) from those of (src, pos).

    ``want`` says which of the three to compute; the others come back as an empty list
    (or an empty tensor for level_embed).
    """
    want_features, want_pos_embeds, want_level_embed = want
    # An unused upstream gradient is never read: no copy (it may be an expanded scalar).
    grad_src = grad_src.contiguous() if want_features else grad_src
    grad_pos = grad_pos.contiguous() if want_pos_embeds or want_level_embed else grad_pos
    n, _, c = grad_src.shape

    def maps(wanted):
        return [grad_src.new_empty((n, c, h, w)) for h, w in sizes] if wanted else []

    grad_features, grad_pos_embeds = maps(want_features), maps(want_pos_embeds)
    grad_level_embed = grad_src.new_empty((len(sizes), c) if want_level_embed else (0,))
    dev = device_of(grad_src)
    ws_bytes = _C.flatten_backward_workspace_bytes(dev.kind, n, c, list(sizes),
                                                   want_level_embed)
    workspace = torch.empty(ws_bytes, dtype=torch.uint8, device=grad_src.device)
    _C.flatten_backward(DTYPE_NAMES[grad_src.dtype], dev.kind, dev.index, n, c, list(sizes),
                        grad_src.data_ptr(), grad_pos.data_ptr(), ptrs(grad_features),
                        ptrs(grad_pos_embeds),
                        grad_level_embed.data_ptr() if want_level_embed else 0,
                        workspace.data_ptr(), ws_bytes, dev.threads, dev.stream)
    return grad_features, grad_pos_embeds, grad_level_embed


def reference_points(sizes: list[tuple[int, int]], valid_ratios: Tensor) -> Tensor:
    """(N, S, L, 2) reference points; valid_ratios float32 / float64, contiguous."""
    n, levels, _ = valid_ratios.shape
    s = sum(h * w for h, w in sizes)
    out = valid_ratios.new_empty((n, s, levels, 2))
    dev = device_of(valid_ratios)
    _C.encoder_reference_points(DTYPE_NAMES[valid_ratios.dtype], dev.kind, dev.index, n,
                                list(sizes), valid_ratios.data_ptr(), out.data_ptr(),
                                dev.threads, dev.stream)
    return out
