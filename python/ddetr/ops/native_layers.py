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
with the sizes and options in a ``LayerCall`` and the parameters by name (``PARAM_NAMES``,
those of the checkpoint). Which layers can take this path, and reading their parameters,
is ``ddetr.models.native_layers``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ddetr import _native
from ddetr._native import layers as native
from ddetr._native.gemm import blas_available
from ddetr._native.layers import PARAM_NAMES, LayerCall, cublas_available

__all__ = ["LAYER_DTYPES", "LayerCall", "PARAM_NAMES", "cublas_available", "library_ready",
           "run"]

LAYER_DTYPES = (torch.float32, torch.float64, torch.bfloat16)


def library_ready(x: Tensor, dtype: torch.dtype | None = None) -> bool:
    """Whether the native layers can run on x's device in ``dtype`` (default x's)."""
    if not _native.available() or (dtype or x.dtype) not in LAYER_DTYPES:
        return False
    if x.device.type == "cpu":
        return blas_available()
    return x.device.type == "cuda" and cublas_available()


class _NativeLayer(torch.autograd.Function):
    # (autograd takes tensors positionally: x, pos, ref, memory, mask, sa_bias, then the
    # parameters in PARAM_NAMES order; everything below goes by name)
    @staticmethod
    def forward(ctx, call: LayerCall, x, pos, ref, memory, mask, sa_bias, *param_list):
        inputs = {"x": x, "pos": pos, "reference_points": ref, "memory": memory, "mask": mask,
                  "sa_bias": sa_bias}
        params = dict(zip(PARAM_NAMES, param_list))
        out, saved = native.forward(call, inputs, params)
        ctx.call = call
        ctx.saved_names = tuple(saved)
        ctx.save_for_backward(x, pos, ref, memory, mask, sa_bias, *param_list,
                              *saved.values())
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        if not ctx.call.training:
            raise RuntimeError("a native layer run without saved activations cannot be "
                               "differentiated")
        x, pos, ref, memory, mask, sa_bias, *rest = ctx.saved_tensors
        params = dict(zip(PARAM_NAMES, rest[:len(PARAM_NAMES)]))
        saved = dict(zip(ctx.saved_names, rest[len(PARAM_NAMES):]))
        inputs = {"x": x, "pos": pos, "reference_points": ref, "memory": memory, "mask": mask,
                  "sa_bias": sa_bias}
        need = ctx.needs_input_grad
        grads = {"x": torch.empty_like(x),
                 "pos": torch.empty_like(pos) if pos is not None and need[2] else None,
                 "reference_points": torch.empty_like(ref) if need[3] else None,
                 "memory": torch.empty_like(memory) if memory is not None and need[4] else None}
        grad_params = {name: None if p is None else torch.empty_like(p)
                       for name, p in params.items()}
        native.backward(ctx.call, inputs, params, saved, grad_out.contiguous(), grads,
                        grad_params)
        return (None, *grads.values(), None, None, *grad_params.values())


def run(call: LayerCall, x: Tensor, pos: Tensor | None, ref: Tensor, memory: Tensor | None,
        mask: Tensor | None, params: dict, sa_bias: Tensor | None = None) -> Tensor:
    """One layer pass (differentiable in x, pos, ref, memory and the parameters). Inputs
    already checked; ``params`` by ``PARAM_NAMES`` (absent or None: none, as the decoder's
    self-attention in an encoder), of x's dtype and device; ``sa_bias``: a decoder's
    (Lq, Lq) self-attention score bias (0 / -inf) in the accumulation dtype (float32 for
    bfloat16 x), or None."""
    unknown = sorted(set(params) - set(PARAM_NAMES))
    if unknown:
        raise ValueError(f"params: no native layer parameter is named {', '.join(unknown)}")
    mask_u8 = None if mask is None else mask.contiguous().view(torch.uint8)
    tensors = [None if t is None else t.contiguous() for t in (x, pos, ref, memory)]
    param_list = [None if params.get(name) is None else params[name].contiguous()
                  for name in PARAM_NAMES]
    bias = None if sa_bias is None else sa_bias.contiguous()
    if not (torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (*tensors, *param_list))):
        # nothing to differentiate (inference): the native forward directly, without
        # autograd's bookkeeping, which cost as much as a small layer's work
        inputs = dict(zip(native.INPUT_NAMES, (*tensors, mask_u8, bias)))
        return native.forward(call, inputs, dict(zip(PARAM_NAMES, param_list)))[0]
    return _NativeLayer.apply(call, *tensors, mask_u8, bias, *param_list)
