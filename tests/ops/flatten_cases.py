"""Inputs for the flattening tests: random pyramids whose images are padded in
different ways within one batch."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# How an image of the batch is padded, on every level:
#   none   no padding;
#   pad    the image covers a random fraction of the batch's size (bottom / right padding,
#          the same fraction on every level, rounded up as the backbone's masks are);
#   empty  as pad, but the last level is entirely padding;
#   ragged random mask bits (not a rectangle: checks that only the first row and column
#          decide the valid ratios, as in the official code).
PADDINGS = ("none", "pad", "empty", "ragged")


@dataclass(frozen=True)
class Pyramid:
    shapes: tuple[tuple[int, int], ...]  # (H_l, W_l) per level
    c: int = 32
    padding: tuple[str, ...] = ("none", "pad")  # one per image: N = len(padding)

    @property
    def n(self) -> int:
        return len(self.padding)

    def __str__(self) -> str:
        levels = "+".join(f"{h}x{w}" for h, w in self.shapes)
        return f"C{self.c}_{levels}_{'-'.join(self.padding)}"


# 1 to 5 levels, odd sizes, C in {32, 256}, N up to 4, padded and unpadded images together.
CASES = [
    Pyramid(((7, 9),), c=32, padding=("pad",)),
    Pyramid(((1, 1),), c=32, padding=("none", "empty")),
    Pyramid(((13, 21), (7, 11)), c=256, padding=("none", "pad")),
    Pyramid(((25, 41), (13, 21), (7, 11)), c=32, padding=("pad", "none", "empty")),
    Pyramid(((25, 42), (13, 21), (7, 11), (4, 6)), c=256, padding=("none", "pad")),
    Pyramid(((33, 17), (17, 9), (9, 5), (5, 3), (3, 1)), c=32,
            padding=("pad", "none", "ragged", "empty")),
    Pyramid(((5, 3), (1, 1), (3, 5)), c=256, padding=("ragged", "pad", "none", "pad")),
]

# gradcheck perturbs every element: tiny pyramids only.
GRADCHECK_CASES = [
    Pyramid(((3, 2),), c=3, padding=("pad",)),
    Pyramid(((3, 5), (2, 3), (1, 1)), c=2, padding=("none", "pad")),
]


def make_masks(p: Pyramid, g: torch.Generator) -> list[torch.Tensor]:
    masks = [torch.zeros(p.n, h, w, dtype=torch.bool) for h, w in p.shapes]
    for i, kind in enumerate(p.padding):
        frac_h, frac_w = (0.3 + 0.6 * torch.rand(2, generator=g)).tolist()
        for lvl, (h, w) in enumerate(p.shapes):
            if kind == "ragged":
                masks[lvl][i] = torch.rand(h, w, generator=g) < 0.4
            elif kind in ("pad", "empty"):
                masks[lvl][i, math.ceil(h * frac_h):] = True
                masks[lvl][i, :, math.ceil(w * frac_w):] = True
        if kind == "empty":
            masks[-1][i] = True
    return masks


def make_pyramid(p: Pyramid, dtype=torch.float32, device="cpu", seed=0):
    """features, masks, pos_embeds, level_embed of `p` (values drawn in float64)."""
    g = torch.Generator().manual_seed(seed)
    feats = [torch.randn(p.n, p.c, h, w, generator=g, dtype=torch.float64) for h, w in p.shapes]
    pos = [torch.randn(p.n, p.c, h, w, generator=g, dtype=torch.float64) for h, w in p.shapes]
    embed = torch.randn(len(p.shapes), p.c, generator=g, dtype=torch.float64)
    masks = make_masks(p, g)
    return ([f.to(device, dtype) for f in feats], [m.to(device) for m in masks],
            [q.to(device, dtype) for q in pos], embed.to(device, dtype))


def leaves(*groups):
    """Fresh leaves requiring grad: each group a tensor or a list of tensors."""
    out = []
    for grp in groups:
        if isinstance(grp, torch.Tensor):
            out.append(grp.detach().clone().requires_grad_())
        else:
            out.append([t.detach().clone().requires_grad_() for t in grp])
    return out
