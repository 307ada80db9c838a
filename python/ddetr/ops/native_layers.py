"""Whole encoder and decoder layers in one native call per pass (cpp/layers_cpu.cpp,
cuda/layers.cu; the math is in cpp/include/ddetr/layers.h).

A layer call computes exactly what the layer's ``forward`` computes on the pure-PyTorch
path, forward and backward, with every elementwise step fused and nothing between the
steps in Python:

- the backward keeps only what it needs (values, the offset/logit projection, the
  sampled features, LayerNorms' normalised inputs and 1/std, the FFN hidden activations
  and the decoder's attention probabilities), and with ``recompute=True`` not even the
  last two (it recomputes them: one more GEMM);
- dropout masks come from Philox (seed from torch's generator, so ``torch.manual_seed``
  fixes them) and are regenerated in the backward, never stored;
- GEMMs run on OpenBLAS (scipy-openblas32) on the CPU and on cuBLAS on CUDA, both
  loaded at run time.

bfloat16 layers (a model converted with ``.to(torch.bfloat16)``, or any float32 model
under ``torch.autocast(dtype=torch.bfloat16)``, whose parameters and inputs are then
cast, as autocast casts them for its matmuls) store every tensor and saved activation in
bfloat16 and compute in float32: GEMMs accumulate in float32 (on the CPU, ddetr's own
AVX512-BF16 GEMM, or OpenBLAS's sgemm on panels widened from bfloat16 on CPUs without
those instructions, since OpenBLAS has no bfloat16 GEMM; on CUDA, cuBLAS's bf16 GEMM
with float32 compute), sampling locations and weights stay float32 and so do the value
gradients while they accumulate. Their reference points are float32 (as the detector
keeps them; bf16 ones are widened).

This module is the tensor-level half: ``run(call, x, pos, ref, memory, mask, params)``
with the sizes and options in a ``LayerCall`` and the parameters in the native order
(``PARAM_NAMES``). Which layers can take this path, and reading their parameters, is
``ddetr.models.native_layers``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ddetr import _native
from ddetr._native import layers as native
from ddetr._native.gemm import blas_available
from ddetr._native.layers import LayerCall, cublas_available

__all__ = ["LAYER_DTYPES", "LayerCall", "PARAM_NAMES", "cublas_available", "library_ready",
           "run"]

LAYER_DTYPES = (torch.float32, torch.float64, torch.bfloat16)

# The parameters in the order the native side reads them (the decoder's first six are
# its dense self-attention; an encoder passes None there). Names as in the checkpoint.
PARAM_NAMES = (
    "self_attn.in_proj_weight", "self_attn.in_proj_bias", "self_attn.out_proj.weight",
    "self_attn.out_proj.bias", "norm2.weight", "norm2.bias",  # decoder only
    "value_proj.weight", "value_proj.bias",
    "sampling_offsets+attention_weights.weight", "sampling_offsets+attention_weights.bias",
    "output_proj.weight", "output_proj.bias", "attention norm.weight", "attention norm.bias",
    "linear1.weight", "linear1.bias", "linear2.weight", "linear2.bias",
    "ffn norm.weight", "ffn norm.bias")


def library_ready(x: Tensor, dtype: torch.dtype | None = None) -> bool:
    """Whether the native layers can run on x's device in ``dtype`` (default x's)."""
    if not _native.available() or (dtype or x.dtype) not in LAYER_DTYPES:
        return False
    if x.device.type == "cpu":
        return blas_available()
    return x.device.type == "cuda" and cublas_available()


class _NativeLayer(torch.autograd.Function):
    @staticmethod
    def forward(ctx, call: LayerCall, x, pos, ref, memory, mask, *params):
        saved = [torch.empty(n, dtype=x.dtype, device=x.device) if call.training and n else None
                 for n in native.saved_sizes(call, x)]
        out = native.forward(call, [x, pos, ref, memory, mask], list(params), saved)
        ctx.call = call
        ctx.present = [s is not None for s in saved]
        ctx.num_params = len(params)
        ctx.save_for_backward(x, pos, ref, memory, mask, *params,
                              *[s for s in saved if s is not None])
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        if not ctx.call.training:
            raise RuntimeError("a native layer run without saved activations cannot be "
                               "differentiated")
        tensors = ctx.saved_tensors
        inputs = list(tensors[:5])
        params = list(tensors[5:5 + ctx.num_params])
        stored = iter(tensors[5 + ctx.num_params:])
        saved = [next(stored) if present else None for present in ctx.present]
        x, pos, _, memory, _ = inputs
        need = ctx.needs_input_grad
        grads = [torch.empty_like(x),
                 torch.empty_like(pos) if pos is not None and need[2] else None,
                 torch.empty_like(inputs[2]) if need[3] else None,
                 torch.empty_like(memory) if memory is not None and need[4] else None]
        gparams = [None if p is None else torch.empty_like(p) for p in params]
        native.backward(ctx.call, inputs, params, saved, grad_out.contiguous(), grads, gparams)
        return (None, *grads, None, *gparams)


def run(call: LayerCall, x: Tensor, pos: Tensor | None, ref: Tensor, memory: Tensor | None,
        mask: Tensor | None, params: list) -> Tensor:
    """One layer pass (differentiable in x, pos, ref, memory and the parameters). Inputs
    already checked; ``params`` in ``PARAM_NAMES`` order, of x's dtype and device."""
    mask_u8 = None if mask is None else mask.contiguous().view(torch.uint8)
    tensors = [None if t is None else t.contiguous() for t in (x, pos, ref, memory, *params)]
    return _NativeLayer.apply(call, *tensors[:4], mask_u8, *tensors[4:])
