"""Where the flattening ops' tensors become pointers and sizes for ``ddetr._C``.

The checks here name the argument and the level (``masks[2]: expected ...``); the native
side re-checks the sizes, the pointer lists and the workspace. Lists of per-level
tensors cross the boundary as lists of pointers, the level table as (H, W) pairs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ddetr import _ext
from ddetr.ops._native import _DTYPE_NAMES, _device, _fail, check_device
from ddetr.ops.flatten_reference import ratio_dtype


def _check_list(name: str, items, length: int | None) -> None:
    if isinstance(items, Tensor) or not isinstance(items, Sequence):
        _fail(name, "a list of tensors, one per level", type(items).__name__)
    if length is None and len(items) == 0:
        _fail(name, "at least one level", "an empty list")
    if length is not None and len(items) != length:
        _fail(name, f"{length} tensors, one per level of features", f"{len(items)}")
    for i, t in enumerate(items):
        if not isinstance(t, Tensor):
            _fail(f"{name}[{i}]", "a torch.Tensor", type(t).__name__)


def _check_floating(name: str, t: Tensor, device: torch.device) -> None:
    if not t.dtype.is_floating_point:
        _fail(name, "a floating-point tensor (float32, float64, float16 or bfloat16)", t.dtype)
    if t.device != device:
        _fail(name, f"a tensor on {device} like features[0]", t.device)


def check_pyramid(features, masks, pos_embeds, level_embed) -> None:
    """Raises ValueError naming the first argument (and level) that does not fit."""
    n, c = _check_features(features)
    device = features[0].device
    _check_list("pos_embeds", pos_embeds, len(features))
    for i, (p, f) in enumerate(zip(pos_embeds, features)):
        _check_floating(f"pos_embeds[{i}]", p, device)
        if p.shape != f.shape:
            _fail(f"pos_embeds[{i}]", f"shape {tuple(f.shape)} to match features[{i}]",
                  tuple(p.shape))
    if not (masks is None or (isinstance(masks, (list, tuple)) and len(masks) == 0)):
        _check_masks(masks, features)
    if level_embed is not None:
        if not isinstance(level_embed, Tensor):
            _fail("level_embed", "a (L, C) tensor or None", type(level_embed).__name__)
        _check_floating("level_embed", level_embed, device)
        if tuple(level_embed.shape) != (len(features), c):
            _fail("level_embed", f"shape (L, C) = ({len(features)}, {c})",
                  tuple(level_embed.shape))
    check_device("features[0]", features[0])


def _check_features(features) -> tuple[int, int]:
    """N and C shared by every level."""
    _check_list("features", features, None)
    first = features[0]
    if first.dim() != 4:
        _fail("features[0]", "4 dims (N, C, H, W)", tuple(first.shape))
    n, c = first.shape[:2]
    for i, f in enumerate(features):
        _check_floating(f"features[{i}]", f, first.device)
        if f.dim() != 4 or tuple(f.shape[:2]) != (n, c):
            _fail(f"features[{i}]", f"shape (N, C, H, W) with N = {n} and C = {c} like "
                  "features[0]", tuple(f.shape))
        if f.shape[2] < 1 or f.shape[3] < 1:
            _fail(f"features[{i}]", "H and W >= 1", tuple(f.shape))
    return n, c


def _check_masks(masks, features) -> None:
    _check_list("masks", masks, len(features))
    device = features[0].device
    for i, (m, f) in enumerate(zip(masks, features)):
        if m.dtype != torch.bool:
            _fail(f"masks[{i}]", "a bool tensor (True on padding)", m.dtype)
        want = (f.shape[0], *f.shape[2:])
        if tuple(m.shape) != want:
            _fail(f"masks[{i}]", f"shape {want} to match features[{i}]", tuple(m.shape))
        if m.device != device:
            _fail(f"masks[{i}]", f"a tensor on {device} like features[0]", m.device)


def _sizes(features) -> list[tuple[int, int]]:
    return [(f.shape[2], f.shape[3]) for f in features]


def _ptrs(tensors) -> list[int]:
    return [t.data_ptr() for t in tensors]


def forward(features: list[Tensor], masks: list[Tensor], pos_embeds: list[Tensor],
            level_embed: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """src, mask, pos, valid_ratios of the native forward.

    Inputs already checked, contiguous and in one dtype the kernels take; ``masks``
    empty for "no padding".
    """
    first = features[0]
    n, c = first.shape[:2]
    s = sum(h * w for h, w in _sizes(features))
    src = first.new_empty((n, s, c))
    pos = first.new_empty((n, s, c))
    mask = torch.empty((n, s), dtype=torch.bool, device=first.device)
    ratios = torch.empty((n, len(features), 2), dtype=ratio_dtype(first.dtype),
                         device=first.device)
    device, index, stream = _device(first)
    _ext._C.flatten_forward(_DTYPE_NAMES[first.dtype], device, index, n, c, _sizes(features),
                            _ptrs(features), _ptrs(masks), _ptrs(pos_embeds),
                            0 if level_embed is None else level_embed.data_ptr(),
                            src.data_ptr(), pos.data_ptr(), mask.data_ptr(), ratios.data_ptr(),
                            torch.get_num_threads(), stream)
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
    device, index, stream = _device(grad_src)
    ws_bytes = _ext._C.flatten_backward_workspace_bytes(device, n, c, list(sizes),
                                                        want_level_embed)
    workspace = torch.empty(ws_bytes, dtype=torch.uint8, device=grad_src.device)
    _ext._C.flatten_backward(_DTYPE_NAMES[grad_src.dtype], device, index, n, c, list(sizes),
                             grad_src.data_ptr(), grad_pos.data_ptr(), _ptrs(grad_features),
                             _ptrs(grad_pos_embeds),
                             grad_level_embed.data_ptr() if want_level_embed else 0,
                             workspace.data_ptr(), ws_bytes, torch.get_num_threads(), stream)
    return grad_features, grad_pos_embeds, grad_level_embed


def check_reference_points(sizes: list[tuple[int, int]], valid_ratios: Tensor) -> None:
    if not isinstance(valid_ratios, Tensor):
        _fail("valid_ratios", "a (N, L, 2) tensor", type(valid_ratios).__name__)
    if not valid_ratios.dtype.is_floating_point:
        _fail("valid_ratios", "a floating-point tensor", valid_ratios.dtype)
    if valid_ratios.dim() != 3 or tuple(valid_ratios.shape[1:]) != (len(sizes), 2):
        _fail("valid_ratios", f"shape (N, L, 2) with L = {len(sizes)} levels of "
              "spatial_shapes", tuple(valid_ratios.shape))
    check_device("valid_ratios", valid_ratios)


def reference_points(sizes: list[tuple[int, int]], valid_ratios: Tensor) -> Tensor:
    """(N, S, L, 2) native reference points; valid_ratios float32 / float64, contiguous."""
    n, levels, _ = valid_ratios.shape
    s = sum(h * w for h, w in sizes)
    out = valid_ratios.new_empty((n, s, levels, 2))
    device, index, stream = _device(valid_ratios)
    _ext._C.encoder_reference_points(_DTYPE_NAMES[valid_ratios.dtype], device, index, n,
                                     list(sizes), valid_ratios.data_ptr(), out.data_ptr(),
                                     torch.get_num_threads(), stream)
    return out
