"""The one place where torch tensors become pointers and sizes for ``ddetr._C``.

Everything handed to the extension is checked here first (ranks, sizes, dtypes,
devices) so a user gets a ``ValueError`` naming the argument; the native side
re-checks the sizes and the level table and raises ``ValueError`` too.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ddetr import _ext

_DTYPE_NAMES = {
    torch.float32: "float32",
    torch.float64: "float64",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
}


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype of a storage dtype: float64 for float64, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _fail(name: str, expected: str, got: object) -> None:
    raise ValueError(f"{name}: expected {expected}, got {got}")


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
        _fail(name, "an integer tensor (int64)", t.dtype)
    if t.device.type != "cpu" and t.device != torch.device(device):
        _fail(name, f"a tensor on the CPU or on {device} like value", t.device)


def as_level_tensors(spatial_shapes, level_start_index, device) -> tuple[Tensor, Tensor]:
    """Normalise the level table: (L, 2) and (L,) int64 tensors (start computed if None)."""
    if not isinstance(spatial_shapes, Tensor):
        if not isinstance(spatial_shapes, Sequence):
            _fail("spatial_shapes", "a (L, 2) int64 tensor or a list of (H, W) pairs",
                  type(spatial_shapes).__name__)
        spatial_shapes = _int_table("spatial_shapes", spatial_shapes, device)
    _check_int_table("spatial_shapes", spatial_shapes, device)
    if spatial_shapes.dim() != 2 or spatial_shapes.shape[1] != 2 or spatial_shapes.shape[0] < 1:
        _fail("spatial_shapes", "shape (L, 2) with L >= 1", tuple(spatial_shapes.shape))
    spatial_shapes = spatial_shapes.to(torch.int64)
    if level_start_index is None:
        sizes = spatial_shapes[:, 0] * spatial_shapes[:, 1]
        level_start_index = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    elif not isinstance(level_start_index, Tensor):
        level_start_index = _int_table("level_start_index", level_start_index,
                                       spatial_shapes.device)
    _check_int_table("level_start_index", level_start_index, device)
    if tuple(level_start_index.shape) != (spatial_shapes.shape[0],):
        _fail("level_start_index", f"shape ({spatial_shapes.shape[0]},) to match spatial_shapes",
              tuple(level_start_index.shape))
    return spatial_shapes, level_start_index.to(torch.int64)


def check_inputs(value: Tensor, spatial_shapes: Tensor, sampling_locations: Tensor,
                 attention_weights: Tensor) -> None:
    """Static checks (shapes, dtypes, devices); the level table's values are checked natively."""
    named = {"value": value, "sampling_locations": sampling_locations,
             "attention_weights": attention_weights}
    for name, t in named.items():
        if not isinstance(t, Tensor):
            _fail(name, "a torch.Tensor", type(t).__name__)
        if not t.dtype.is_floating_point:
            _fail(name, "a floating-point tensor (float32, float64, float16 or bfloat16)", t.dtype)
        if t.device != value.device:
            _fail(name, f"a tensor on {value.device} like value", t.device)
    if value.dim() != 4:
        _fail("value", "4 dims (N, S, M, D)", tuple(value.shape))
    if sampling_locations.dim() != 6 or sampling_locations.shape[-1] != 2:
        _fail("sampling_locations", "6 dims (N, Lq, M, L, P, 2)", tuple(sampling_locations.shape))
    n, _, m, _ = value.shape
    _, lq, _, _, points, _ = sampling_locations.shape
    expect_loc = (n, lq, m, spatial_shapes.shape[0], points, 2)
    if tuple(sampling_locations.shape) != expect_loc:
        _fail("sampling_locations", f"shape (N, Lq, M, L, P, 2) = {expect_loc} from value "
              f"{tuple(value.shape)} and the {spatial_shapes.shape[0]} levels of spatial_shapes",
              tuple(sampling_locations.shape))
    expect_attn = expect_loc[:-1]
    if tuple(attention_weights.shape) != expect_attn:
        _fail("attention_weights", f"shape (N, Lq, M, L, P) = {expect_attn}",
              tuple(attention_weights.shape))
    check_device("value", value)


def check_device(name: str, t: Tensor) -> None:
    """A CPU tensor, or a CUDA tensor with the CUDA kernels built in."""
    if t.is_cuda and not _ext.cuda_built():
        raise RuntimeError(
            f"{name} is a CUDA tensor but ddetr was built without CUDA kernels. Reinstall on a "
            "machine with the CUDA toolkit (nvcc on PATH): DDETR_CUDA=ON pip install .")
    if t.device.type not in ("cpu", "cuda"):
        _fail(name, "a CPU or CUDA tensor", t.device)


def _levels(spatial_shapes: Tensor, level_start_index: Tensor) -> list[tuple[int, int, int]]:
    return [(h, w, s) for (h, w), s in zip(spatial_shapes.tolist(), level_start_index.tolist())]


def _sizes(value: Tensor, loc: Tensor) -> tuple[int, ...]:
    n, s, m, d = value.shape
    _, lq, _, levels, points, _ = loc.shape
    return (n, s, m, d, lq, levels, points)


def _device(t: Tensor) -> tuple[str, int, int]:
    if t.is_cuda:
        return "cuda", t.device.index, torch.cuda.current_stream(t.device).cuda_stream
    return "cpu", -1, 0


def forward(value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor, loc: Tensor,
            attn: Tensor) -> Tensor:
    """(N, Lq, M * D) output of the native forward; inputs already checked and contiguous."""
    n, _, m, d = value.shape
    out = torch.empty((n, loc.shape[1], m * d), dtype=value.dtype, device=value.device)
    device, index, stream = _device(value)
    _ext._C.msda_forward(_DTYPE_NAMES[value.dtype], device, index, _sizes(value, loc),
                         _levels(spatial_shapes, level_start_index), value.data_ptr(),
                         loc.data_ptr(), attn.data_ptr(), out.data_ptr(),
                         torch.get_num_threads(), stream)
    return out


def backward(grad_out: Tensor, value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor,
             loc: Tensor, attn: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients (value, sampling_locations, attention_weights) of the native backward."""
    grad_out = grad_out.contiguous()
    device, index, stream = _device(value)
    sizes, levels = _sizes(value, loc), _levels(spatial_shapes, level_start_index)
    deterministic = torch.are_deterministic_algorithms_enabled()
    grad_value = torch.zeros(value.shape, dtype=acc_dtype(value.dtype), device=value.device)
    grad_loc = torch.empty_like(loc)
    grad_attn = torch.empty_like(attn)
    ws_bytes = _ext._C.msda_backward_workspace_bytes(device, index, sizes, levels,
                                                     deterministic)
    workspace = torch.empty(ws_bytes, dtype=torch.uint8, device=value.device)
    _ext._C.msda_backward(_DTYPE_NAMES[value.dtype], device, index, sizes, levels,
                          value.data_ptr(), loc.data_ptr(), attn.data_ptr(), grad_out.data_ptr(),
                          grad_value.data_ptr(), grad_loc.data_ptr(), grad_attn.data_ptr(),
                          workspace.data_ptr(), ws_bytes, deterministic,
                          torch.get_num_threads(), stream)
    return grad_value.to(value.dtype), grad_loc, grad_attn
