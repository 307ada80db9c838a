"""Multi-scale flattening and the encoder reference points (cpp/flatten_cpu.cpp,
cuda/flatten.cu) through one ``_C.FlattenCall`` per call. Lists of per-level tensors cross
as lists of pointers, the level table as ``_C.LevelSize`` (H, W) structs (the starts and
S are derived natively)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ddetr._native.common import DTYPE_NAMES, device_of, ptr, ptrs
from ddetr._native.loader import _C


def _levels(sizes) -> list:
    return [_C.LevelSize(H=h, W=w) for h, w in sizes]


def _call(t: Tensor, n: int, c: int, sizes, **fields):
    """The FlattenCall of a batch of n, c channels and levels of ``sizes`` (H, W) on t's
    dtype and device, with the given fields."""
    return _C.FlattenCall(dtype=DTYPE_NAMES[t.dtype], device=device_of(t), N=n, C=c,
                          levels=_levels(sizes), **fields)


def forward(features: list[Tensor], masks: list[Tensor], pos_embeds: list[Tensor],
            level_embed: Tensor | None, ratio_dtype: torch.dtype
            ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """src, mask, pos, valid_ratios. Inputs checked, contiguous and in one dtype the
    kernels take; ``masks`` empty for "no padding"."""
    first = features[0]
    n, c = first.shape[:2]
    sizes = [(f.shape[2], f.shape[3]) for f in features]
    s = sum(h * w for h, w in sizes)
    src = first.new_empty((n, s, c))
    pos = first.new_empty((n, s, c))
    mask = torch.empty((n, s), dtype=torch.bool, device=first.device)
    ratios = torch.empty((n, len(features), 2), dtype=ratio_dtype, device=first.device)
    _C.flatten_forward(_call(first, n, c, sizes, features=ptrs(features), masks=ptrs(masks),
                             pos_embeds=ptrs(pos_embeds), level_embed=ptr(level_embed),
                             src=ptr(src), pos=ptr(pos), mask=ptr(mask),
                             valid_ratios=ptr(ratios)))
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
    call = _call(grad_src, n, c, sizes, grad_src=ptr(grad_src), grad_pos=ptr(grad_pos),
                 grad_features=ptrs(grad_features), grad_pos_embeds=ptrs(grad_pos_embeds),
                 grad_level_embed=ptr(grad_level_embed) if want_level_embed else 0)
    ws_bytes = _C.flatten_backward_workspace_bytes(call)
    workspace = torch.empty(ws_bytes, dtype=torch.uint8, device=grad_src.device)
    call.workspace, call.workspace_bytes = ptr(workspace), ws_bytes
    _C.flatten_backward(call)
    return grad_features, grad_pos_embeds, grad_level_embed


def reference_points(sizes: list[tuple[int, int]], valid_ratios: Tensor) -> Tensor:
    """(N, S, L, 2) reference points; valid_ratios float32 / float64, contiguous."""
    n, levels, _ = valid_ratios.shape
    s = sum(h * w for h, w in sizes)
    out = valid_ratios.new_empty((n, s, levels, 2))
    _C.encoder_reference_points(_call(valid_ratios, n, 0, sizes,
                                      valid_ratios=ptr(valid_ratios),
                                      reference_points=ptr(out)))
    return out
