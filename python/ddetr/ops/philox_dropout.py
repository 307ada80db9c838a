"""Dropout whose backward regenerates the mask, and ReLU fused with dropout.

``dropout(x, p)`` keeps each element with probability 1 - p and scales it by 1 / (1 - p),
like ``torch.nn.functional.dropout``, but draws its mask from a counter-based generator
(Philox4x32-10 keyed by a seed taken from torch's default generator, so
``torch.manual_seed`` makes it reproducible): the backward recomputes the mask from the
seed instead of keeping a mask tensor, and the mask of an element depends only on
(seed, element index), so it is the same on the CPU and on CUDA, for any thread count.

``relu_dropout(x, p)`` is ``dropout(relu(x), p)`` in one pass whose backward needs only
its output (an element passes gradient exactly where the output is positive): the FFN of
every transformer layer uses it, and saves neither the ReLU's input nor a mask.

Both run natively (CPU: float32, float64, bfloat16; CUDA: also float16); float16 on the
CPU, a build without the extension, other devices and ``torch.compile`` tracing use
torch's own dropout (a different random stream). ``philox_keep_mask`` and
``dropout_reference`` are the pure-PyTorch statement of the native math, for tests.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ddetr import _native
from ddetr._native import dropout as native
from ddetr.ops.levels import fail as _fail

_PHILOX_M = (0xD2511F53, 0xCD9E8D57)
_PHILOX_W = (0x9E3779B9, 0xBB67AE85)
_U32 = 0xFFFFFFFF


@torch.library.custom_op("ddetr::dropout", mutates_args=())
def _dropout_op(x: Tensor, p: float, seed: int, relu: bool) -> Tensor:
    return native.dropout(x, p, seed, relu)


@_dropout_op.register_fake
def _(x, p, seed, relu):
    return torch.empty_like(x)


@torch.library.custom_op("ddetr::relu_dropout_backward", mutates_args=())
def _relu_dropout_backward_op(out: Tensor, grad_out: Tensor, p: float) -> Tensor:
    return native.relu_dropout_backward(out, grad_out, p)


@_relu_dropout_backward_op.register_fake
def _(out, grad_out, p):
    return torch.empty_like(out)


def _setup_context(ctx, inputs, output):
    _, ctx.p, ctx.seed, ctx.relu = inputs
    if ctx.relu:
        ctx.save_for_backward(output)


def _backward(ctx, grad_out):
    grad_out = grad_out.contiguous()
    if ctx.relu:
        (out,) = ctx.saved_tensors
        return _relu_dropout_backward_op(out, grad_out, ctx.p), None, None, None
    # the same mask on the gradient: the same op with the same seed
    return _dropout_op(grad_out, ctx.p, ctx.seed, False), None, None, None


_dropout_op.register_autograd(_backward, setup_context=_setup_context)


def _native_ok(x: Tensor) -> bool:
    if not _native.available() or torch.compiler.is_compiling():
        return False
    if x.device.type == "cpu":
        return x.dtype in (torch.float32, torch.float64, torch.bfloat16)
    return x.device.type == "cuda" and _native.cuda_usable()


def _check(x: Tensor, p: float) -> None:
    if not isinstance(x, Tensor) or not x.dtype.is_floating_point:
        _fail("x", "a floating-point tensor", getattr(x, "dtype", type(x).__name__))
    if not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
        _fail("p", "a probability in [0, 1]", p)


def seed_from_torch() -> int:
    """A dropout seed drawn from torch's default CPU generator."""
    # from torch's default CPU generator, so torch.manual_seed fixes every mask
    return int(torch.empty((), dtype=torch.int64).random_())


def dropout(x: Tensor, p: float = 0.1, training: bool = True) -> Tensor:
    """``F.dropout(x, p, training)`` with a regenerated (not stored) mask. Returns ``x``
    itself when not training or p = 0."""
    _check(x, p)
    if not training or p == 0:
        return x
    if not _native_ok(x):
        return F.dropout(x, p, True)
    return _dropout_op(x.contiguous(), float(p), seed_from_torch(), False)


def relu_dropout(x: Tensor, p: float = 0.1, training: bool = True) -> Tensor:
    """``F.dropout(F.relu(x), p, training)`` in one pass; the backward keeps only the
    output. Not training (or p = 0): ``F.relu(x)``."""
    _check(x, p)
    if not training or p == 0:
        return F.relu(x)
    if not _native_ok(x):
        return F.dropout(F.relu(x), p, True)
    return _dropout_op(x.contiguous(), float(p), seed_from_torch(), True)


# ---------------------------------------------------------------- reference

def _mulhilo(a: int, b: Tensor) -> tuple[Tensor, Tensor]:
    # b < 2^32 in int64: the product's 64-bit pattern wraps like uint64; shifting the
    # (possibly negative) pattern right and masking gives its high word
    prod = b * a
    return (prod >> 32) & _U32, prod & _U32


def philox_words(seed: int, offset: int, blocks: int) -> Tensor:
    """(blocks, 4) int64 words of Philox4x32-10 for counters 0 .. blocks - 1."""
    idx = torch.arange(blocks, dtype=torch.int64)
    c0, c1 = idx & _U32, (idx >> 32) & _U32
    c2 = torch.full_like(idx, offset & _U32)
    c3 = torch.full_like(idx, (offset >> 32) & _U32)
    k0, k1 = seed & _U32, (seed >> 32) & _U32
    for _ in range(10):
        hi0, lo0 = _mulhilo(_PHILOX_M[0], c0)
        hi1, lo1 = _mulhilo(_PHILOX_M[1], c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + _PHILOX_W[0]) & _U32, (k1 + _PHILOX_W[1]) & _U32
    return torch.stack([c0, c1, c2, c3], 1)


def philox_keep_mask(numel: int, p: float, seed: int, offset: int = 0) -> Tensor:
    """(numel,) bool: which elements the native dropout keeps for this seed and offset
    (p is rounded to float32 first, as the kernels take it)."""
    p = float(np.float32(p))
    if p >= 1:
        return torch.zeros(numel, dtype=torch.bool)
    threshold = min(int(p * 2.0**32 + 0.5), _U32)
    words = philox_words(seed, offset, (numel + 3) // 4).reshape(-1)[:numel]
    return words >= threshold


def dropout_reference(x: Tensor, p: float, seed: int, relu: bool = False) -> Tensor:
    """What the native op computes for ``seed``, in pure PyTorch (``x`` in its own dtype,
    math in float32, or float64 for float64)."""
    keep = philox_keep_mask(x.numel(), p, seed).reshape(x.shape).to(x.device)
    acc = x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    # the kernels' scale: 1 / (1 - p) in float32
    scale = 0.0 if p >= 1 else float(np.float32(1) / (np.float32(1) - np.float32(p)))
    if relu:
        keep = keep & (acc > 0)
    return torch.where(keep, acc * scale, torch.zeros_like(acc)).to(x.dtype)
