"""Argument checks of the MSDA op: ValueError naming the argument (the native side
re-checks the sizes and the level table's values and raises ValueError too)."""

from __future__ import annotations

from torch import Tensor

from ddetr import _native
from ddetr.ops.levels import fail as _fail


def check_inputs(value: Tensor, num_levels: int, sampling_locations: Tensor,
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
    expect_loc = (n, lq, m, num_levels, points, 2)
    if tuple(sampling_locations.shape) != expect_loc:
        _fail("sampling_locations", f"shape (N, Lq, M, L, P, 2) = {expect_loc} from value "
              f"{tuple(value.shape)} and the {num_levels} levels of spatial_shapes",
              tuple(sampling_locations.shape))
    expect_attn = expect_loc[:-1]
    if tuple(attention_weights.shape) != expect_attn:
        _fail("attention_weights", f"shape (N, Lq, M, L, P) = {expect_attn}",
              tuple(attention_weights.shape))
    check_device("value", value)


def check_device(name: str, t: Tensor) -> None:
    """A CPU tensor, or a CUDA tensor with the CUDA kernels built in."""
    if t.is_cuda and not _native.cuda_built():
        raise RuntimeError(
            f"{name} is a CUDA tensor but ddetr was built without CUDA kernels. Reinstall on a "
            "machine with the CUDA toolkit (nvcc on PATH): DDETR_CUDA=ON pip install .")
    if t.device.type not in ("cpu", "cuda"):
        _fail(name, "a CPU or CUDA tensor", t.device)
