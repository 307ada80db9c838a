"""Linear layers on the CPU through OpenBLAS (the scipy-openblas32 wheel).

At the transformer's shapes OpenBLAS's sgemm runs well ahead of torch's CPU matmul on
the machines we measured (on two Zen 5 cores, for (22223 x 256) x (256 x 256 | 1024):
about 420-450 GFLOP/s with its AVX-512 kernels, 230-250 with the AVX2 ones that
OPENBLAS_CORETYPE=Haswell forces, against 155-220 for torch), so ``linear`` sends
float32 and float64 CPU work there, forward and backward:

    forward   out = x W^T + b          (b, and optionally ReLU, added to each block of
                                        rows right after its GEMM, while in cache)
    backward  grad_x = grad_out W,  grad_W = grad_out^T x,  grad_b = sum of grad_out rows

Anything else (CUDA, bfloat16 or float16, no extension, no scipy-openblas32, tracing
under torch.compile) is ``torch.nn.functional.linear``. ``module_linear`` is how ddetr's
layers call their ``nn.Linear`` sub-modules: natively only for a plain ``nn.Linear``
with no hooks, so a replaced or hooked module (LoRA, quantisation, feature capture)
still runs its own forward; ddetr's own ``Int8Linear`` (``ddetr.ops.int8``) runs its int8
kernel with the ReLU fused.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules import module as _module_mod

from ddetr._native import gemm as native
from ddetr.ops import bf16_cpu
from ddetr.ops.int8 import Int8Linear

blas_available = native.blas_available
blas_core = native.blas_core


@torch.library.custom_op("ddetr::linear", mutates_args=())
def _linear_op(x: Tensor, weight: Tensor, bias: Tensor | None, relu: bool) -> Tensor:
    # x (M, K), weight (N, K), bias (N,) or None: out (M, N); bias and ReLU applied to
    # blocks of rows right after their GEMM
    out = x.new_empty(x.shape[0], weight.shape[0])
    native.gemm(x, weight, False, True, out, None if bias is None else bias.contiguous(), relu)
    return out


@_linear_op.register_fake
def _(x, weight, bias, relu):
    return x.new_empty(x.shape[0], weight.shape[0])


@torch.library.custom_op("ddetr::blas_mm", mutates_args=())
def _mm_op(a: Tensor, b: Tensor, trans_a: bool, trans_b: bool) -> Tensor:
    m = a.shape[1] if trans_a else a.shape[0]
    n = b.shape[0] if trans_b else b.shape[1]
    out = a.new_empty(m, n)
    native.gemm(a, b, trans_a, trans_b, out)
    return out


@_mm_op.register_fake
def _(a, b, trans_a, trans_b):
    return a.new_empty(a.shape[1] if trans_a else a.shape[0], b.shape[0] if trans_b else b.shape[1])


def _mm_setup_context(ctx, inputs, output):
    a, b, ctx.trans_a, ctx.trans_b = inputs
    ctx.save_for_backward(a, b)


def _mm_backward(ctx, grad):
    # C = op(a) op(b): d op(a) = G op(b)^T and d op(b) = op(a)^T G, each written as one
    # blas_mm of the stored operands (so double backward through linear works too)
    a, b = ctx.saved_tensors
    ta, tb = ctx.trans_a, ctx.trans_b
    grad = grad.contiguous()
    grad_a = grad_b = None
    if ctx.needs_input_grad[0]:
        grad_a = _mm_op(b, grad, tb, True) if ta else _mm_op(grad, b, False, not tb)
    if ctx.needs_input_grad[1]:
        grad_b = _mm_op(grad, a, True, ta) if tb else _mm_op(a, grad, not ta, False)
    return grad_a, grad_b, None, None


_mm_op.register_autograd(_mm_backward, setup_context=_mm_setup_context)


def _setup_context(ctx, inputs, output):
    x, weight, bias, relu = inputs
    ctx.has_bias, ctx.relu = bias is not None, relu
    ctx.save_for_backward(x, weight, output if relu else None)


def _backward(ctx, grad_out):
    x, weight, out = ctx.saved_tensors
    grad_out = grad_out.contiguous()
    if ctx.relu:
        grad_out = grad_out.masked_fill(out <= 0, 0.0)
    grad_x = grad_w = grad_b = None
    if ctx.needs_input_grad[0]:
        grad_x = _mm_op(grad_out, weight, False, False)   # (M, N) (N, K) -> (M, K)
    if ctx.needs_input_grad[1]:
        grad_w = _mm_op(grad_out, x, True, False)         # (N, M) (M, K) -> (N, K)
    if ctx.has_bias and ctx.needs_input_grad[2]:
        grad_b = grad_out.sum(0)
    return grad_x, grad_w, grad_b, None


_linear_op.register_autograd(_backward, setup_context=_setup_context)


def _native_ok(x: Tensor, weight: Tensor, bias: Tensor | None) -> bool:
    return (x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)
            and weight.dtype == x.dtype and weight.device.type == "cpu" and weight.dim() == 2
            and (bias is None or (bias.dtype == x.dtype and bias.device.type == "cpu"))
            and x.dim() >= 1 and x.shape[-1] == weight.shape[1] > 0
            and not torch.compiler.is_compiling() and blas_available())


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, relu: bool = False) -> Tensor:
    """``F.linear(x, weight, bias)`` (then ReLU with ``relu``): x (..., K), weight (N, K),
    bias (N,) -> (..., N). In bfloat16 on a CPU without oneDNN's bfloat16: in float32,
    rounded once (``ddetr.ops.bf16_cpu``)."""
    if not _native_ok(x, weight, bias):
        out = bf16_cpu.linear(x, weight, bias) if bf16_cpu.widened(x, weight) else \
            F.linear(x, weight, bias)
        return F.relu(out) if relu else out
    lead = x.shape[:-1]
    # (..., K) -> (M, K)
    out = _linear_op(x.reshape(-1, x.shape[-1]).contiguous(), weight.contiguous(), bias, relu)
    return out.view(*lead, weight.shape[0])


def _hooked(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks
                or _module_mod._global_forward_hooks or _module_mod._global_forward_pre_hooks)


def module_linear(module: nn.Module, x: Tensor, relu: bool = False) -> Tensor:
    """``module(x)`` (then ReLU with ``relu``) for an ``nn.Linear`` sub-module: through
    ``linear`` when it is a plain, unhooked ``nn.Linear``, otherwise its own forward."""
    if type(module) is nn.Linear and not _hooked(module):
        return linear(x, module.weight, module.bias, relu)
    if type(module) is Int8Linear and not _hooked(module):
        return module.linear(x, relu)
    out = module(x)
    return F.relu(out) if relu else out
