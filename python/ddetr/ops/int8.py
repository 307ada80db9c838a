"""int8 linear layers on the CPU (cpp/gemm_int8.cpp): int8 weights, one symmetric scale
per output channel, and int8 activations quantised per row (per token) on the fly:

    out[m, n] = int32(sum_k xq[m, k] wq[n, k]) * x_scale[m] * w_scale[n] + bias[n]
    x_scale[m] = max_k |x[m, k]| / 127,   xq = round_half_even(clamp(x / x_scale, +-127))
    w_scale[n] = max_k |W[n, k]| / 127,   wq likewise per row of W

The products are summed exactly in int32 by a real int8 kernel (AVX512-VNNI, AVX2 or
portable C++: ``ddetr._native.gemm.int8_kernel()``); nothing is dequantised to float
before the GEMM. Error: each x and w is off by at most half its step, so
|out - x W^T - b| <= (w_scale[n] sum_k |x[m, k]| + x_scale[m] sum_k |wq[n, k] w_scale[n]|) / 2
(plus float rounding), the bound the tests check.

``Int8Linear`` holds ``weight_int8`` (N, K) int8, ``weight_scale`` (N,) float32 and
``bias`` (N,) float32 (or None) as buffers (its state dict), and packs the weights for
the kernel the first time it runs (kept beside the module, not in the state dict). It is
inference-only in its weights; gradients flow to its input (as if the activations were
not rounded: d out / d x = W dequantised) so a model around it can still be trained.
Float32 only, on the CPU only, with the native extension; anything else is a clear error.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ddetr import _native
from ddetr._native import gemm as native
from ddetr.ops import portable


def quantize_weight(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Per-output-channel symmetric int8: W (N, K) float -> (wq (N, K) int8, w_scale (N,)
    float32), w_scale = max |W[n]| / 127 (0 for a zero row, whose wq is 0)."""
    w = weight.detach().to(torch.float32)
    scale = w.abs().amax(dim=1) / 127
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round((w / safe[:, None]).clamp(-127, 127))
    return q.masked_fill((scale == 0)[:, None], 0).to(torch.int8), scale


def quantize_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """The activations' quantisation, natively: x (R, C) float32 on the CPU -> (q (R, C)
    int8, scale (R,) float32), as ``quantize_weight`` does per row (a row holding NaN or
    inf gets scale NaN and q 0)."""
    _check_native()
    _check_tensor("x", x, torch.float32, 2)
    x = x.contiguous()
    q = torch.empty(x.shape, dtype=torch.int8)
    scale = torch.empty(x.shape[0], dtype=torch.float32)
    native.quantize_rows_int8(x, q, scale)
    return q, scale


def _check_native() -> None:
    if not _native.available():
        raise RuntimeError(f"int8 linear layers need ddetr's native extension, which did not "
                           f"import ({_native.IMPORT_ERROR}); reinstall with `pip install .`")


def _check_tensor(name: str, t, dtype: torch.dtype, dim: int | None = None) -> None:
    if not isinstance(t, Tensor):
        raise ValueError(f"{name}: expected a tensor, got {type(t).__name__}")
    if t.device.type != "cpu":
        raise ValueError(f"{name}: int8 layers run on the CPU only (no int8 kernel on "
                         f"{t.device.type} yet), got a tensor on {t.device}")
    if t.dtype != dtype:
        raise ValueError(f"{name}: expected {dtype}, got {t.dtype}")
    if dim is not None and t.dim() != dim:
        raise ValueError(f"{name}: expected {dim} dimensions, got shape {tuple(t.shape)}")


def check_int8_linear(x: Tensor, weight_int8: Tensor, weight_scale: Tensor,
                      bias: Tensor | None) -> None:
    """ValueError naming the argument that does not fit (dtype, device, shape)."""
    _check_tensor("x", x, torch.float32)
    _check_tensor("weight_int8", weight_int8, torch.int8, 2)
    n, k = weight_int8.shape
    if x.dim() < 1 or x.shape[-1] != k:
        raise ValueError(f"x: expected (..., {k}) (in_features), got shape {tuple(x.shape)}")
    _check_tensor("weight_scale", weight_scale, torch.float32, 1)
    if weight_scale.shape[0] != n:
        raise ValueError(f"weight_scale: expected ({n},), got {tuple(weight_scale.shape)}")
    if bias is not None:
        _check_tensor("bias", bias, torch.float32, 1)
        if bias.shape[0] != n:
            raise ValueError(f"bias: expected ({n},), got {tuple(bias.shape)}")


class _Int8Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2d: Tensor, packed, weight_int8: Tensor, weight_scale: Tensor,
                bias: Tensor | None, relu: bool) -> Tensor:
        out = torch.empty(x2d.shape[0], packed.n, dtype=torch.float32)
        native.gemm_int8(x2d, packed, weight_scale, out, bias, relu)
        ctx.relu = relu
        ctx.save_for_backward(weight_int8, weight_scale, out if relu else None)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        # the rounding of x passed straight through: d out / d x = W dequantised
        weight_int8, weight_scale, out = ctx.saved_tensors
        if ctx.relu:
            grad_out = grad_out.masked_fill(out <= 0, 0.0)
        w = weight_int8.to(torch.float32) * weight_scale[:, None]
        grad_out = grad_out.contiguous()
        if not native.blas_available():
            return grad_out @ w, None, None, None, None, None
        # (M, N) (N, K) -> (M, K), on OpenBLAS: the same bits at every thread count
        grad_x = grad_out.new_empty(grad_out.shape[0], w.shape[1])
        native.gemm(grad_out, w, False, False, grad_x)
        return grad_x, None, None, None, None, None


def int8_linear(x: Tensor, weight_int8: Tensor, weight_scale: Tensor,
                bias: Tensor | None = None, relu: bool = False,
                packed: native.PackedInt8 | None = None) -> Tensor:
    """x (..., K) float32 -> (..., N) float32 through the int8 kernel (then ReLU with
    ``relu``); ``packed``: ``weight_int8`` already packed (``pack``), else packed here."""
    _check_native()
    check_int8_linear(x, weight_int8, weight_scale, bias)
    n, k = weight_int8.shape
    if packed is None:
        packed = pack(weight_int8)
    elif (packed.n, packed.k) != (n, k):
        raise ValueError(f"packed: holds a ({packed.n}, {packed.k}) weight, not ({n}, {k})")
    lead = x.shape[:-1]
    # (..., K) -> (M, K)
    x2d = x.reshape(-1, k).contiguous()
    out = _Int8Linear.apply(x2d, packed, weight_int8, weight_scale.contiguous(),
                            None if bias is None else bias.contiguous(), relu)
    return out.view(*lead, n)


def int8_linear_portable(x: Tensor, weight_int8: Tensor, weight_scale: Tensor,
                         bias: Tensor | None = None, relu: bool = False) -> Tensor:
    """``int8_linear`` in standard operations, the form exported graphs hold: the same
    per-row quantisation (scale max |x| / 127, round to nearest even, a non-finite row
    gives NaN), the integer products summed as float32 (exact while in_features * 127^2
    < 2^24, i.e. in_features <= 1040), then the two scales and the bias."""
    scale = x.abs().amax(-1, keepdim=True) / 127  # (..., 1)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round((x / safe).clamp(-127, 127))
    q = torch.where(torch.isfinite(q), q, torch.zeros_like(q))
    # (..., K) @ (K, N): integer-valued float32 products
    out = (q @ weight_int8.to(q.dtype).t()) * (scale * weight_scale)
    if bias is not None:
        out = out + bias
    return torch.relu(out) if relu else out


def pack(weight_int8: Tensor, kernel: str = "auto") -> native.PackedInt8:
    """``weight_int8`` (N, K) packed for the int8 ``kernel`` (default: this CPU's best)."""
    _check_native()
    _check_tensor("weight_int8", weight_int8, torch.int8, 2)
    if kernel not in native.INT8_KERNELS:
        raise ValueError(f"kernel: expected one of {native.INT8_KERNELS}, got {kernel!r}")
    if not native.int8_kernel_supported(kernel):
        raise ValueError(f"kernel: this CPU cannot run the {kernel} int8 kernel")
    return native.pack_int8(weight_int8.contiguous(), kernel)


class Int8Linear(nn.Module):
    """``nn.Linear(in_features, out_features)`` with int8 weights (see the module's
    docstring for the formula and its error bound). Build it with ``from_linear``."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight_int8",
                             torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.zeros(out_features))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        self._packed = None  # (the weight tensor and its version when packed, the pack)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        """The int8 version of ``linear`` (per-output-channel weights; bias kept in float32)."""
        new = cls(linear.in_features, linear.out_features, linear.bias is not None)
        q, scale = quantize_weight(linear.weight)
        new.weight_int8.copy_(q)
        new.weight_scale.copy_(scale)
        if linear.bias is not None:
            new.bias.copy_(linear.bias.detach())
        return new.to(linear.weight.device)

    def packed(self) -> native.PackedInt8:
        """The weights packed for this CPU's int8 kernel, packed again whenever
        ``weight_int8`` was replaced or changed in place (loading a state dict)."""
        w = self.weight_int8
        # (a tensor's _version counts its in-place changes: copy_ by load_state_dict too)
        if self._packed is None or self._packed[0] is not w or self._packed[1] != w._version:
            self._packed = (w, w._version, pack(w))
        return self._packed[2]

    def linear(self, x: Tensor, relu: bool = False) -> Tensor:
        """The layer on x (..., in_features) float32 on the CPU, then ReLU with ``relu``."""
        if portable.active():
            return int8_linear_portable(x, self.weight_int8, self.weight_scale, self.bias, relu)
        _check_native()
        check_int8_linear(x, self.weight_int8, self.weight_scale, self.bias)
        return int8_linear(x, self.weight_int8, self.weight_scale, self.bias, relu,
                           self.packed())

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, weights=int8 per channel, "
                f"activations=int8 per token")
