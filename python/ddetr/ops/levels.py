"""The level table of a multi-scale map, built once and handed down as is.

``LevelTable`` holds each level's (H, W, start row) as Python ints, which the native
calls take without a device-to-host copy (a ``.tolist()`` of a CUDA tensor blocks until
the GPU catches up and cannot be captured in a CUDA graph), together with the (L, 2) and
(L,) int64 tensors of the official API (``spatial_shapes``, ``level_start_index``).
``flatten_multiscale`` builds it from the feature maps' shapes; the transformer passes
it wherever the official code passes ``spatial_shapes``. ``as_level_table`` accepts a
table, a tensor or a list of (H, W) pairs, so the public ops keep the official
signatures.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


def fail(name: str, expected: str, got: object) -> None:
    raise ValueError(f"{name}: expected {expected}, got {got}")


@dataclass(frozen=True, eq=False)
class LevelTable:
    rows: tuple[tuple[int, int, int], ...]  # (H, W, start) per level
    spatial_shapes: Tensor                  # (L, 2) int64
    level_start_index: Tensor               # (L,) int64

    @classmethod
    def from_sizes(cls, sizes, device) -> LevelTable:
        """From (H, W) per level (ints, or symbolic sizes under tracing)."""
        rows, start = [], 0
        for h, w in sizes:
            rows.append((h, w, start))
            start = start + h * w
        shapes = torch.tensor([[h, w] for h, w, _ in rows], dtype=torch.int64, device=device)
        starts = torch.tensor([r[2] for r in rows], dtype=torch.int64, device=device)
        return cls(tuple(rows), shapes, starts)

    @property
    def sizes(self) -> list[tuple[int, int]]:
        return [(h, w) for h, w, _ in self.rows]

    @property
    def pixels(self) -> int:
        """S, the rows of a flattened map."""
        return sum(h * w for h, w, _ in self.rows)

    def __len__(self) -> int:
        return len(self.rows)


def _int_table(name: str, items, device) -> Tensor:
    """A Python list of sizes as an int64 tensor; floats (4.9) are refused, not truncated."""
    try:
        t = torch.as_tensor(items, device=device)
    except (TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"{name}: expected integers, got {items!r} ({e})") from None
    _check_int_table(name, t, device)
    return t


def _check_int_table(name: str, t: Tensor, device) -> None:
    """An integer tensor on the CPU or on the value's device (it is read on the host)."""
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        fail(name, "an integer tensor (int64)", t.dtype)
    if t.device.type != "cpu" and t.device != torch.device(device):
        fail(name, f"a tensor on the CPU or on {device} like value", t.device)


def as_level_tensors(spatial_shapes, level_start_index, device) -> tuple[Tensor, Tensor]:
    """Checked (L, 2) and (L,) int64 tensors (the start computed when None)."""
    if not isinstance(spatial_shapes, Tensor):
        if not isinstance(spatial_shapes, Sequence):
            fail("spatial_shapes", "a (L, 2) int64 tensor or a list of (H, W) pairs",
                 type(spatial_shapes).__name__)
        spatial_shapes = _int_table("spatial_shapes", spatial_shapes, device)
    _check_int_table("spatial_shapes", spatial_shapes, device)
    if spatial_shapes.dim() != 2 or spatial_shapes.shape[1] != 2 or spatial_shapes.shape[0] < 1:
        fail("spatial_shapes", "shape (L, 2) with L >= 1", tuple(spatial_shapes.shape))
    spatial_shapes = spatial_shapes.to(torch.int64)
    if level_start_index is None:
        sizes = spatial_shapes[:, 0] * spatial_shapes[:, 1]
        level_start_index = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    elif not isinstance(level_start_index, Tensor):
        level_start_index = _int_table("level_start_index", level_start_index,
                                       spatial_shapes.device)
    _check_int_table("level_start_index", level_start_index, device)
    if tuple(level_start_index.shape) != (spatial_shapes.shape[0],):
        fail("level_start_index", f"shape ({spatial_shapes.shape[0]},) to match spatial_shapes",
             tuple(level_start_index.shape))
    return spatial_shapes, level_start_index.to(torch.int64)


def as_level_table(spatial_shapes, level_start_index, device) -> LevelTable:
    """A ``LevelTable`` as given, or built from a tensor / list of (H, W) pairs and an
    optional start index (one host copy of the tensors); ValueError naming the argument.
    The native side checks the values (positive sizes, starts that follow the sizes)."""
    if isinstance(spatial_shapes, LevelTable):
        return spatial_shapes
    shapes, starts = as_level_tensors(spatial_shapes, level_start_index, device)
    rows = tuple((h, w, s) for (h, w), s in zip(shapes.tolist(), starts.tolist()))
    return LevelTable(rows, shapes, starts)
