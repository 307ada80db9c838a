"""Whole encoder and decoder layers in one native call per pass (cpp/layers_cpu.cpp,
cuda/layers.cu; the math is in cpp/include/ddetr/layers.h).

``encoder_layer(layer, ...)`` and ``decoder_layer(layer, ...)`` compute exactly what
``layer.forward`` computes on the pure-PyTorch path (the same parameters, read from the
module), forward and backward, with every elementwise step fused and nothing between
the steps in Python:

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

``supports(layer, x)`` says whether a layer and input can take this path: float32,
float64 or bfloat16 (or bfloat16 autocast), ReLU, one dropout probability for all the
layer's dropouts, LayerNorm eps 1e-5, plain ``nn.Linear`` / ``MSDeformAttn`` /
``nn.MultiheadAttention`` sub-modules without hooks, not while ``torch.compile`` traces,
and the native library (and OpenBLAS or cuBLAS) present. Everything else stays on the
PyTorch path, which is the reference.
"""

from __future__ import annotations

import ctypes.util
import logging
import re
import threading
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ddetr import _ext
from ddetr.ops._native import _DTYPE_NAMES, _device, _levels, as_level_tensors
from ddetr.ops.blas import blas_available, load_first
from ddetr.ops.philox_dropout import _seed

logger = logging.getLogger(__name__)

_LAYER_DTYPES = (torch.float32, torch.float64, torch.bfloat16)
_cublas_state: bool | None = None
# CPU workspaces are kept between calls, one per thread (two threads may run layers at
# once): a fresh multi-MB buffer costs a page fault per 4 KB on first touch, which the
# layers would otherwise pay on every call. It holds the largest workspace a layer of
# the thread has needed (about 50 MB at 800x1333).
_cpu_workspace = threading.local()


def cublas_available() -> bool:
    """True once cuBLAS is loaded into the extension (found where torch loaded it)."""
    global _cublas_state
    if _cublas_state is None:
        _cublas_state = _load_cublas()
    return _cublas_state


def _load_cublas() -> bool:
    if not (_ext.cuda_built() and torch.cuda.is_available()):
        return False
    if _ext._C.cublas_loaded():
        return True
    torch.cuda.current_blas_handle()  # makes torch load its cuBLAS
    candidates = []
    try:
        with open("/proc/self/maps") as maps:
            found = re.finditer(r"/\S*libcublas\.so[.\d]*", maps.read())
            candidates = sorted({m.group(0) for m in found})
    except OSError:
        pass
    found = ctypes.util.find_library("cublas")
    if found:
        candidates.append(found)
    if load_first(_ext._C.load_cublas, candidates, "native layers stay off on CUDA"):
        return True
    logger.info("cuBLAS not found: the native layers stay off on CUDA")
    return False


def _library_ready(x: Tensor, dtype: torch.dtype | None = None) -> bool:
    """Whether the native layers can run on x's device in ``dtype`` (default x's)."""
    if not _ext.available() or (dtype or x.dtype) not in _LAYER_DTYPES:
        return False
    if x.device.type == "cpu":
        return blas_available()
    return x.device.type == "cuda" and cublas_available()


def _companion_dtypes(x: Tensor) -> tuple[torch.dtype, ...]:
    # dtypes the other inputs may have: x's, and float32 reference points for bf16 x
    return (x.dtype, torch.float32) if x.dtype == torch.bfloat16 else (x.dtype,)


def _ref_dtype(x: Tensor) -> torch.dtype:
    # the reference points' dtype on the native side (MSDA's location type)
    return torch.float32 if x.dtype == torch.bfloat16 else x.dtype


def _plain(module: nn.Module, kind: type) -> bool:
    return type(module) is kind and not (module._forward_hooks or module._forward_pre_hooks
                                         or module._backward_hooks)


def _dropouts(layer: nn.Module) -> list[float]:
    ps = [m.p for m in layer.modules() if isinstance(m, nn.Dropout)]
    attn = getattr(layer, "self_attn", None)
    if isinstance(attn, nn.MultiheadAttention):
        ps.append(attn.dropout)
    return ps


def _autocast(device_type: str) -> bool:
    """Whether autocast is on for this device type."""
    return torch.is_autocast_enabled(device_type)


def supports(layer: nn.Module, x: Tensor, *others: Tensor | None) -> bool:
    """Whether ``layer`` (an encoder or decoder layer of ddetr) on input ``x`` and the
    other tensor inputs ``others`` can run natively with the same result as its PyTorch
    path: all of one dtype and device, or, under bfloat16 autocast, float32 / bfloat16
    tensors and parameters (the layer then runs in bfloat16, like autocast's matmuls)."""
    if torch.compiler.is_compiling() or x.numel() == 0:
        return False  # (empty batches: the PyTorch path handles them)
    return unsupported(layer, x, *others) is None


def _dtype_problem(layer: nn.Module, x: Tensor, tensors: list[Tensor]) -> str | None:
    params = list(layer.parameters())
    if _autocast(x.device.type):
        castable = (torch.float32, torch.bfloat16)
        if torch.get_autocast_dtype(x.device.type) != torch.bfloat16:
            return "autocast to a dtype other than bfloat16"
        if not _library_ready(x, torch.bfloat16):
            return f"no native bfloat16 layers on {x.device.type}"
        if any(t.dtype not in castable for t in tensors + params):
            return "under bfloat16 autocast, tensors and parameters must be float32 or bfloat16"
    elif not _library_ready(x):
        return (f"no native layers for {x.dtype} on {x.device.type} (float32, float64 or "
                "bfloat16 with the native library and OpenBLAS / cuBLAS)")
    elif any(t.dtype not in _companion_dtypes(x) for t in tensors):
        return f"the inputs must all be {x.dtype} like x"
    elif any(p.dtype != x.dtype for p in params):
        return f"the layer's parameters must be {x.dtype} like x (got {params[0].dtype} ...)"
    if any(t.device != x.device for t in tensors + params):
        return f"the inputs and the layer's parameters must all be on {x.device}"
    return None


def _module_problem(layer: nn.Module) -> str | None:
    from ddetr.models.ms_deform_attn import MSDeformAttn
    from ddetr.models.transformer_layers import _relu

    if getattr(layer, "activation", None) is not _relu:
        return "the activation must be ReLU"
    if len(set(_dropouts(layer))) > 1:
        return "all the layer's dropouts must have one probability"
    attn = layer.cross_attn if hasattr(layer, "cross_attn") else layer.self_attn
    if not _plain(attn, MSDeformAttn) or not all(
            _plain(m, nn.Linear) for m in (attn.value_proj, attn.sampling_offsets,
                                           attn.attention_weights, attn.output_proj,
                                           layer.linear1, layer.linear2)):
        return "the attention and linear sub-modules must be plain MSDeformAttn / nn.Linear"
    norms = [m for m in layer.children() if isinstance(m, nn.LayerNorm)]
    if not all(_plain(n, nn.LayerNorm) and n.eps == 1e-5 and n.weight is not None
               and n.bias is not None for n in norms):
        return "the LayerNorms must be plain, affine, with eps 1e-5"
    if hasattr(layer, "cross_attn"):
        sa = layer.self_attn
        if not (_plain(sa, nn.MultiheadAttention) and sa.batch_first and sa._qkv_same_embed_dim
                and sa.in_proj_bias is not None and sa.bias_k is None and not sa.add_zero_attn
                and _plain(sa.out_proj, type(sa.out_proj)) and sa.out_proj.bias is not None):
            return "the self-attention must be a plain batch-first nn.MultiheadAttention"
    return None


def unsupported(layer: nn.Module, x: Tensor, *others: Tensor | None) -> str | None:
    """Why ``layer`` cannot run natively on these inputs, or None when it can (see
    ``supports``, which also leaves empty inputs and ``torch.compile`` to PyTorch)."""
    tensors = [x, *(t for t in others if t is not None)]
    return _dtype_problem(layer, x, tensors) or _module_problem(layer)


@dataclass(frozen=True)
class _Call:
    """What one layer call hands the native side besides tensors."""
    decoder: bool
    dims: tuple[int, int, int, int, int]      # N, Lq, C, F, ref_dim
    sizes: tuple[int, ...]                    # N, S, M, D, Lq, L, P
    levels: list
    options: tuple[bool, bool, float, int]    # training, recompute, p, seed

    def head(self, x: Tensor) -> tuple:
        """The arguments every native layer entry point starts with."""
        device, index, _ = _device(x)
        return (_DTYPE_NAMES[x.dtype], device, index, self.decoder, self.dims, self.sizes,
                self.levels, self.options)


def _deform_params(attn: nn.Module, norm: nn.LayerNorm) -> list[Tensor]:
    # (M*L*P*2 + M*L*P, C): one GEMM for the offsets and the attention logits
    oa_w = torch.cat([attn.sampling_offsets.weight, attn.attention_weights.weight])
    oa_b = torch.cat([attn.sampling_offsets.bias, attn.attention_weights.bias])
    return [attn.value_proj.weight, attn.value_proj.bias, oa_w, oa_b, attn.output_proj.weight,
            attn.output_proj.bias, norm.weight, norm.bias]


def _ffn_params(layer: nn.Module, norm: nn.LayerNorm) -> list[Tensor]:
    return [layer.linear1.weight, layer.linear1.bias, layer.linear2.weight, layer.linear2.bias,
            norm.weight, norm.bias]


def _ptr(t: Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _workspace(call: _Call, x: Tensor, backward: bool) -> tuple[Tensor, bool]:
    """The workspace of a pass (kept per thread on the CPU), and whether it runs the
    deterministic CUDA backward."""
    deterministic = torch.are_deterministic_algorithms_enabled()
    nbytes = _ext._C.layer_workspace_bytes(*call.head(x), backward, deterministic)
    if x.device.type != "cpu":
        return torch.empty(max(nbytes, 1), dtype=torch.uint8, device=x.device), deterministic
    ws = getattr(_cpu_workspace, "buffer", None)
    if ws is None or ws.numel() < nbytes:
        ws = torch.empty(max(nbytes, 1), dtype=torch.uint8)
        _cpu_workspace.buffer = ws
    return ws, deterministic


class _NativeLayer(torch.autograd.Function):
    @staticmethod
    def forward(ctx, call: _Call, x, pos, ref, memory, mask, *params):
        head = call.head(x)
        training = call.options[0]
        saved = [torch.empty(n, dtype=x.dtype, device=x.device) if training and n else None
                 for n in _ext._C.layer_saved_sizes(*head[3:])]
        out = torch.empty_like(x)
        ws, deterministic = _workspace(call, x, backward=False)
        _ext._C.layer_forward(*head, [_ptr(p) for p in params],
                              [_ptr(t) for t in (x, pos, ref, memory, mask)], out.data_ptr(),
                              [_ptr(s) for s in saved], ws.data_ptr(), ws.numel(),
                              deterministic, torch.get_num_threads(), _device(x)[2])
        ctx.call = call
        ctx.present = [s is not None for s in saved]
        ctx.save_for_backward(x, pos, ref, memory, mask, *params,
                              *[s for s in saved if s is not None])
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        call = ctx.call
        if not call.options[0]:
            raise RuntimeError("a native layer run without saved activations cannot be "
                               "differentiated")
        tensors = ctx.saved_tensors
        x, pos, ref, memory, mask = tensors[:5]
        params = tensors[5:25]
        stored = iter(tensors[25:])
        saved = [next(stored) if present else None for present in ctx.present]
        need = ctx.needs_input_grad
        gx = torch.empty_like(x)
        gpos = torch.empty_like(pos) if pos is not None and need[2] else None
        gref = torch.empty_like(ref) if need[3] else None
        gmem = torch.empty_like(memory) if memory is not None and need[4] else None
        gparams = [None if p is None else torch.empty_like(p) for p in params]
        ws, deterministic = _workspace(call, x, backward=True)
        _ext._C.layer_backward(*call.head(x), [_ptr(p) for p in params],
                               [_ptr(t) for t in (x, pos, ref, memory, mask)],
                               [_ptr(s) for s in saved], grad_out.contiguous().data_ptr(),
                               [_ptr(t) for t in (gx, gpos, gref, gmem)],
                               [_ptr(g) for g in gparams], ws.data_ptr(), ws.numel(),
                               deterministic, torch.get_num_threads(), _device(x)[2])
        return (None, gx, gpos, gref, gmem, None, *gparams)


def _check(attn: nn.Module, x: Tensor, pos: Tensor | None, ref: Tensor, value_in: Tensor,
           spatial_shapes, mask: Tensor | None) -> None:
    """Shapes, dtypes and devices of a layer call; ValueError naming the argument."""
    if not isinstance(x, Tensor) or x.dtype not in _LAYER_DTYPES:
        raise ValueError(f"x: expected a float32, float64 or bfloat16 tensor, got "
                         f"{getattr(x, 'dtype', type(x).__name__)}")
    attn._check(x, ref, value_in, spatial_shapes, mask)
    if pos is not None and tuple(pos.shape) != tuple(x.shape):
        raise ValueError(f"pos: expected shape {tuple(x.shape)}, got {tuple(pos.shape)}")
    for name, t in (("pos", pos), ("reference_points", ref), ("memory", value_in)):
        allowed = _companion_dtypes(x) if name == "reference_points" else (x.dtype,)
        if t is not None and (t.dtype not in allowed or t.device != x.device):
            want = " or ".join(str(d) for d in allowed)
            raise ValueError(f"{name}: expected {want} on {x.device} like the queries, "
                             f"got {t.dtype} on {t.device}")
    if mask is not None and mask.device != x.device:
        raise ValueError(f"padding mask: expected a tensor on {x.device}, got {mask.device}")
    if not _library_ready(x):
        raise RuntimeError(f"native layers on {x.device.type}: the native library (and "
                           "OpenBLAS on the CPU, cuBLAS on CUDA) is not available")


def _expected_shapes(layer: nn.Module, decoder: bool) -> list[tuple[int, ...] | None]:
    """The shape of each entry of the native parameter list (see encoder_layer)."""
    attn = layer.cross_attn if decoder else layer.self_attn
    c, f = attn.d_model, layer.linear1.out_features
    oa = attn.n_heads * attn.n_levels * attn.n_points * 3  # offsets (x, y) and logits
    self_attn = [(3 * c, c), (3 * c,), (c, c), (c,), (c,), (c,)] if decoder else [None] * 6
    return self_attn + [(c, c), (c,), (oa, c), (oa,), (c, c), (c,), (c,), (c,),
                        (f, c), (f,), (c, f), (c,), (c,), (c,)]


def _check_params(layer: nn.Module, decoder: bool, x: Tensor, params: list) -> None:
    """Every parameter of the layer has the shape its sizes imply (the native side reads
    them by those sizes), and x's dtype and device."""
    for i, (p, shape) in enumerate(zip(params, _expected_shapes(layer, decoder))):
        if shape is None:
            continue
        if tuple(p.shape) != shape or p.dtype != x.dtype or p.device != x.device:
            raise ValueError(f"layer parameter {i} of the native list: expected {x.dtype} "
                             f"{shape} on {x.device}, got {p.dtype} {tuple(p.shape)} on "
                             f"{p.device} (a sub-module of another size than the layer's)")


def _run(layer: nn.Module, decoder: bool, x: Tensor, pos: Tensor | None, ref: Tensor,
         memory: Tensor | None, spatial_shapes, level_start_index, mask: Tensor | None,
         params: list, recompute: bool) -> Tensor:
    attn = layer.cross_attn if decoder else layer.self_attn
    if not isinstance(x, Tensor) or x.dtype not in _LAYER_DTYPES:
        raise ValueError(f"x: expected a float32, float64 or bfloat16 tensor, got "
                         f"{getattr(x, 'dtype', type(x).__name__)}")
    if _autocast(x.device.type):  # bfloat16 autocast (supports() says which): run in bf16
        x, pos, memory = (None if t is None else t.to(torch.bfloat16) for t in (x, pos, memory))
        params = [None if t is None else t.to(torch.bfloat16) for t in params]
    value_in = memory if decoder else x
    _check(attn, x, pos, ref, value_in, spatial_shapes, mask)
    problem = unsupported(layer, x, pos, memory)
    if problem is not None:
        raise ValueError(f"this layer cannot run natively: {problem}")
    _check_params(layer, decoder, x, params)
    n, lq, c = x.shape
    shapes, starts = as_level_tensors(spatial_shapes, level_start_index, x.device)
    levels = _levels(shapes, starts)
    s = value_in.shape[1]
    if sum(h * w for h, w, _ in levels) != s:
        raise ValueError(f"spatial_shapes: the levels hold {sum(h * w for h, w, _ in levels)} "
                         f"pixels but the value input has {s} tokens")
    p = _dropouts(layer)[0] if layer.training else 0.0
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                           for t in (x, pos, ref, memory, *params))
    training = grad or (layer.training and p > 0)
    call = _Call(decoder, (n, lq, c, layer.linear1.out_features, ref.shape[-1]),
                 (n, s, attn.n_heads, c // attn.n_heads, lq, attn.n_levels, attn.n_points),
                 levels, (training, bool(recompute), float(p), _seed() if p > 0 else 0))
    ref = ref.to(_ref_dtype(x))  # (differentiable; a no-op unless bf16 references)
    mask_u8 = None if mask is None else mask.contiguous().view(torch.uint8)
    tensors = [None if t is None else t.contiguous() for t in (x, pos, ref, memory, *params)]
    return _NativeLayer.apply(call, *tensors[:4], mask_u8, *tensors[4:])


def encoder_layer(layer: nn.Module, src: Tensor, pos: Tensor | None, reference_points: Tensor,
                  spatial_shapes, level_start_index, padding_mask: Tensor | None = None,
                  recompute: bool = False) -> Tensor:
    """``layer(src, pos, reference_points, ...)`` of a DeformableTransformerEncoderLayer,
    natively. reference_points (N, S, L, 2); padding_mask (N, S) bool."""
    params = [None] * 6 + _deform_params(layer.self_attn, layer.norm1) \
        + _ffn_params(layer, layer.norm2)
    return _run(layer, False, src, pos, reference_points, None, spatial_shapes,
                level_start_index, padding_mask, params, recompute)


def decoder_layer(layer: nn.Module, tgt: Tensor, query_pos: Tensor | None,
                  reference_points: Tensor, memory: Tensor, spatial_shapes, level_start_index,
                  memory_padding_mask: Tensor | None = None, recompute: bool = False) -> Tensor:
    """``layer(tgt, query_pos, reference_points, memory, ...)`` of a
    DeformableTransformerDecoderLayer, natively. reference_points (N, Lq, L, 2 or 4)."""
    sa = layer.self_attn
    params = [sa.in_proj_weight, sa.in_proj_bias, sa.out_proj.weight, sa.out_proj.bias,
              layer.norm2.weight, layer.norm2.bias] \
        + _deform_params(layer.cross_attn, layer.norm1) + _ffn_params(layer, layer.norm3)
    return _run(layer, True, tgt, query_pos, reference_points, memory, spatial_shapes,
                level_start_index, memory_padding_mask, params, recompute)
