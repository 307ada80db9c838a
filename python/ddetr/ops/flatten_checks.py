"""Argument checks of the flattening ops: ValueError naming the argument and the level
(``masks[2]: expected ...``). The native side re-checks the sizes, the pointer lists and
the workspace."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ddetr.ops.levels import fail as _fail
from ddetr.ops.msda_checks import check_device


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


def check_reference_points(sizes: list[tuple[int, int]], valid_ratios: Tensor) -> None:
    if not isinstance(valid_ratios, Tensor):
        _fail("valid_ratios", "a (N, L, 2) tensor", type(valid_ratios).__name__)
    if not valid_ratios.dtype.is_floating_point:
        _fail("valid_ratios", "a floating-point tensor", valid_ratios.dtype)
    if valid_ratios.dim() != 3 or tuple(valid_ratios.shape[1:]) != (len(sizes), 2):
        _fail("valid_ratios", f"shape (N, L, 2) with L = {len(sizes)} levels of "
              "spatial_shapes", tuple(valid_ratios.shape))
    check_device("valid_ratios", valid_ratios)
