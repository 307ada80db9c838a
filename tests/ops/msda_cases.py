"""Inputs for the MSDA tests: random problems with locations inside, outside and on
the borders of every level."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Case:
    shapes: tuple[tuple[int, int], ...]  # (H_l, W_l) per level
    n: int = 2        # batch
    m: int = 2        # heads
    d: int = 8        # channels per head
    lq: int = 5       # queries
    p: int = 2        # points

    @property
    def s(self) -> int:
        return sum(h * w for h, w in self.shapes)

    def __str__(self) -> str:
        levels = "+".join(f"{h}x{w}" for h, w in self.shapes)
        return f"N{self.n}_M{self.m}_D{self.d}_Lq{self.lq}_P{self.p}_{levels}"


# 1 to 5 levels with 1x1 and non-square maps, P 1..8, D in {4, 8, 16, 24, 32, 64}, N up to 3
# (16, 32 and 64 take the CPU backward's AVX-512 path on machines that have it).
CASES = [
    Case(((1, 1),), n=1, m=1, d=4, lq=3, p=1),
    Case(((6, 4),), n=3, m=2, d=8, lq=7, p=4),
    Case(((5, 7), (3, 4)), n=2, m=3, d=24, lq=6, p=3),
    Case(((9, 2), (1, 1), (2, 9)), n=1, m=4, d=32, lq=11, p=8),
    Case(((8, 13), (4, 7), (2, 4), (1, 2)), n=2, m=8, d=32, lq=9, p=4),
    Case(((11, 3), (6, 2), (3, 1), (2, 1), (1, 1)), n=3, m=1, d=64, lq=4, p=2),
    Case(((4, 4), (2, 2)), n=2, m=2, d=4, lq=13, p=5),
    Case(((7, 5), (3, 3)), n=2, m=3, d=16, lq=10, p=3),
]

# 1024 queries or more: the CPU backward visits them in strips of its largest level (here
# the second), not in the given order
MANY_QUERIES = Case(((6, 20), (16, 40), (2, 3)), n=2, m=2, d=32, lq=1100, p=2)


def level_start(shapes) -> torch.Tensor:
    sizes = torch.tensor([h * w for h, w in shapes])
    return torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])


def border_locations(case: Case, dtype=torch.float64) -> torch.Tensor:
    """Coordinates exactly on pixel centres, on the map edges 0 and 1, half a pixel
    outside, and far outside, for every level (x and y drawn independently)."""
    specials = []
    for h, w in case.shapes:
        size = max(h, w)
        specials.append(torch.tensor([0.0, 1.0, 0.5 / size, 1 - 0.5 / size, 1.0 / size,
                                      -0.25 / size, 1 + 0.25 / size, -3.0, 4.0, 0.5],
                                     dtype=dtype))
    picks = torch.randint(0, 10, (case.n, case.lq, case.m, len(case.shapes), case.p, 2))
    table = torch.stack(specials)  # (L, 10)
    lvl = torch.arange(len(case.shapes)).view(1, 1, 1, -1, 1, 1).expand_as(picks)
    return table[lvl, picks]


def make_inputs(case: Case, dtype=torch.float64, device="cpu", kind="random", seed=0):
    """value, spatial_shapes, level_start_index, locations, weights for `case`.

    kind: "random" (uniform in [-0.2, 1.2]: inside and outside), "border" (see
    border_locations), "inside" (uniform in [0.05, 0.95], away from the edges).
    """
    g = torch.Generator().manual_seed(seed)
    L = len(case.shapes)
    value = torch.randn(case.n, case.s, case.m, case.d, generator=g, dtype=torch.float64)
    shape6 = (case.n, case.lq, case.m, L, case.p, 2)
    if kind == "border":
        torch.manual_seed(seed)
        loc = border_locations(case)
    elif kind == "inside":
        loc = torch.rand(shape6, generator=g, dtype=torch.float64) * 0.9 + 0.05
    else:
        loc = torch.rand(shape6, generator=g, dtype=torch.float64) * 1.4 - 0.2
    attn = torch.rand(shape6[:-1], generator=g, dtype=torch.float64)
    shapes = torch.tensor(case.shapes, dtype=torch.int64, device=device)
    return (value.to(device, dtype), shapes, level_start(case.shapes).to(device),
            loc.to(device, dtype), attn.to(device, dtype))
