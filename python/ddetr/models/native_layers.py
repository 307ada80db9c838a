"""Whole encoder and decoder layers of ddetr's deformable transformer in one native call
per pass: the module-aware half (which layers can, reading their parameters), over the
tensor-level autograd op ``ddetr.ops.native_layers.run``.

``encoder_layer(layer, ...)`` and ``decoder_layer(layer, ...)`` compute exactly what
``layer.forward`` computes on the pure-PyTorch path (the same parameters, read from the
module), forward and backward, with every elementwise step fused and nothing between
the steps in Python (see ``ddetr.ops.native_layers`` for what the backward keeps, the
dropout masks, the GEMMs and bfloat16).

``supports(layer, x)`` says whether a layer and input can take this path: float32,
float64 or bfloat16 (or bfloat16 autocast), ReLU, one dropout probability for all the
layer's dropouts, LayerNorm eps 1e-5, plain ``nn.Linear`` / ``MSDeformAttn`` /
``nn.MultiheadAttention`` sub-modules without hooks, not while ``torch.compile`` traces,
and the native library (and OpenBLAS or cuBLAS) present. Everything else stays on the
PyTorch path, which is the reference. ``unsupported(layer, x)`` says why not; called
directly, ``encoder_layer`` / ``decoder_layer`` raise ``ValueError`` with that reason.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ddetr.models.ms_deform_attn import MSDeformAttn
from ddetr.ops import native_layers as ops_layers
from ddetr.ops.levels import as_level_table
from ddetr.ops.philox_dropout import seed_from_torch

_LAYER_DTYPES = ops_layers.LAYER_DTYPES


def _companion_dtypes(x: Tensor) -> tuple[torch.dtype, ...]:
    # dtypes the other inputs may have: x's, and float32 reference points for bf16 x
    return (x.dtype, torch.float32) if x.dtype == torch.bfloat16 else (x.dtype,)


def _ref_dtype(x: Tensor) -> torch.dtype:
    # the reference points' dtype on the native side (MSDA's location type)
    return torch.float32 if x.dtype == torch.bfloat16 else x.dtype


def _plain(module: nn.Module, kind: type) -> bool:
    # (torch has no public query for hooks: its hook dicts are read here and nowhere else)
    return type(module) is kind and not (module._forward_hooks or module._forward_pre_hooks
                                         or module._backward_hooks)


def _children(layer: nn.Module):
    # the direct sub-modules (what ``layer.children()`` yields, without its generator
    # machinery: these checks run on every layer call)
    return [m for m in layer._modules.values() if m is not None]


def _dropouts(layer: nn.Module) -> list[float]:
    # the layer's own children (the attention modules hold no nn.Dropout): a walk of
    # every sub-module on each call cost more than the native layer at small sizes
    ps = [m.p for m in _children(layer) if isinstance(m, nn.Dropout)]
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
    # the parameters the native layer reads (the module check has passed, so these are
    # all of a plain layer's; ``layer.parameters()`` walked every sub-module per call)
    params = _read_params(layer)
    if _autocast(x.device.type):
        castable = (torch.float32, torch.bfloat16)
        if torch.get_autocast_dtype(x.device.type) != torch.bfloat16:
            return "autocast to a dtype other than bfloat16"
        if not ops_layers.library_ready(x, torch.bfloat16):
            return f"no native bfloat16 layers on {x.device.type}"
        if any(t.dtype not in castable for t in tensors + params):
            return "under bfloat16 autocast, tensors and parameters must be float32 or bfloat16"
    elif not ops_layers.library_ready(x):
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
    if getattr(layer, "activation", None) is not F.relu:
        return "the activation must be ReLU"
    if len(set(_dropouts(layer))) > 1:
        return "all the layer's dropouts must have one probability"
    attn = layer.cross_attn if hasattr(layer, "cross_attn") else layer.self_attn
    if not _plain(attn, MSDeformAttn) or not all(
            _plain(m, nn.Linear) for m in (attn.value_proj, attn.sampling_offsets,
                                           attn.attention_weights, attn.output_proj,
                                           layer.linear1, layer.linear2)):
        return "the attention and linear sub-modules must be plain MSDeformAttn / nn.Linear"
    norms = [m for m in _children(layer) if isinstance(m, nn.LayerNorm)]
    if not all(_plain(n, nn.LayerNorm) and n.eps == 1e-5 and n.weight is not None
               and n.bias is not None for n in norms):
        return "the LayerNorms must be plain, affine, with eps 1e-5"
    if hasattr(layer, "cross_attn"):
        sa = layer.self_attn
        if not (_plain(sa, nn.MultiheadAttention) and sa.batch_first and sa.kdim == sa.embed_dim == sa.vdim
                and sa.in_proj_bias is not None and sa.bias_k is None and not sa.add_zero_attn
                and _plain(sa.out_proj, type(sa.out_proj)) and sa.out_proj.bias is not None):
            return "the self-attention must be a plain batch-first nn.MultiheadAttention"
    return None


def unsupported(layer: nn.Module, x: Tensor, *others: Tensor | None) -> str | None:
    """Why ``layer`` cannot run natively on these inputs, or None when it can (see
    ``supports``, which also leaves empty inputs and ``torch.compile`` to PyTorch)."""
    tensors = [x, *(t for t in others if t is not None)]
    return _module_problem(layer) or _dtype_problem(layer, x, tensors)


def _read_params(layer: nn.Module) -> list[Tensor]:
    """Every parameter of a plain encoder or decoder layer (as ``_module_problem``
    allows), read by attribute."""
    attn = layer.cross_attn if hasattr(layer, "cross_attn") else layer.self_attn
    linears = (attn.value_proj, attn.sampling_offsets, attn.attention_weights,
               attn.output_proj, layer.linear1, layer.linear2)
    params = [p for lin in linears for p in (lin.weight, lin.bias)]
    params += [p for n in _children(layer) if isinstance(n, nn.LayerNorm)
               for p in (n.weight, n.bias)]
    if hasattr(layer, "cross_attn"):
        sa = layer.self_attn
        params += [sa.in_proj_weight, sa.in_proj_bias, sa.out_proj.weight, sa.out_proj.bias]
    return [p for p in params if p is not None]


def _deform_params(attn: nn.Module, norm: nn.LayerNorm) -> dict[str, Tensor]:
    # (M*L*P*2 + M*L*P, C): one GEMM for the offsets and the attention logits (joined on
    # every call: a few microseconds, and never stale whatever changed the weights)
    oa_w = torch.cat((attn.sampling_offsets.weight, attn.attention_weights.weight))
    oa_b = torch.cat((attn.sampling_offsets.bias, attn.attention_weights.bias))
    return {"value_proj_weight": attn.value_proj.weight, "value_proj_bias": attn.value_proj.bias,
            "sampling_offsets_attention_weights_weight": oa_w,
            "sampling_offsets_attention_weights_bias": oa_b,
            "output_proj_weight": attn.output_proj.weight,
            "output_proj_bias": attn.output_proj.bias,
            "norm1_weight": norm.weight, "norm1_bias": norm.bias}


def _ffn_params(layer: nn.Module, norm: nn.LayerNorm) -> dict[str, Tensor]:
    return {"linear1_weight": layer.linear1.weight, "linear1_bias": layer.linear1.bias,
            "linear2_weight": layer.linear2.weight, "linear2_bias": layer.linear2.bias,
            "ffn_norm_weight": norm.weight, "ffn_norm_bias": norm.bias}


def _check(attn: nn.Module, x: Tensor, pos: Tensor | None, ref: Tensor, value_in: Tensor,
           spatial_shapes, mask: Tensor | None) -> None:
    """Shapes, dtypes and devices of a layer call (x's dtype: checked by ``_run``);
    ValueError naming the argument."""
    attn.check_inputs(x, ref, value_in, spatial_shapes, mask)
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
    if not ops_layers.library_ready(x):
        raise RuntimeError(f"native layers on {x.device.type}: the native library (and "
                           "OpenBLAS on the CPU, cuBLAS on CUDA) is not available")


def _expected_shapes(layer: nn.Module, decoder: bool) -> dict[str, tuple[int, ...]]:
    """The shape of each parameter the native layer reads, by name (see encoder_layer)."""
    attn = layer.cross_attn if decoder else layer.self_attn
    c, f = attn.d_model, layer.linear1.out_features
    oa = attn.n_heads * attn.n_levels * attn.n_points * 3  # offsets (x, y) and logits
    self_attn = {"self_attn_in_proj_weight": (3 * c, c), "self_attn_in_proj_bias": (3 * c,),
                 "self_attn_out_proj_weight": (c, c), "self_attn_out_proj_bias": (c,),
                 "self_attn_norm_weight": (c,), "self_attn_norm_bias": (c,)}
    return {**(self_attn if decoder else {}),
            "value_proj_weight": (c, c), "value_proj_bias": (c,),
            "sampling_offsets_attention_weights_weight": (oa, c),
            "sampling_offsets_attention_weights_bias": (oa,),
            "output_proj_weight": (c, c), "output_proj_bias": (c,),
            "norm1_weight": (c,), "norm1_bias": (c,),
            "linear1_weight": (f, c), "linear1_bias": (f,), "linear2_weight": (c, f),
            "linear2_bias": (c,), "ffn_norm_weight": (c,), "ffn_norm_bias": (c,)}


def _check_params(layer: nn.Module, decoder: bool, x: Tensor, params: dict) -> None:
    """Every parameter of the layer has the shape its sizes imply (the native side reads
    them by those sizes), and x's dtype and device."""
    for name, shape in _expected_shapes(layer, decoder).items():
        p = params[name]
        if tuple(p.shape) != shape or p.dtype != x.dtype or p.device != x.device:
            raise ValueError(f"layer parameter {name}: expected {x.dtype} {shape} on "
                             f"{x.device}, got {p.dtype} {tuple(p.shape)} on {p.device} "
                             "(a sub-module of another size than the layer's)")


def _score_bias(attn_mask: Tensor | None, x: Tensor) -> Tensor | None:
    """A decoder self-attention mask as the native layer's (Lq, Lq) score bias, in the
    accumulation dtype: a bool mask (True: may not attend, as ``nn.MultiheadAttention``)
    becomes 0 / -inf, a float mask is added as it is."""
    if attn_mask is None:
        return None
    lq = x.shape[1]
    if not isinstance(attn_mask, Tensor) or tuple(attn_mask.shape) != (lq, lq) or \
            not (attn_mask.dtype == torch.bool or attn_mask.is_floating_point()) or \
            attn_mask.device != x.device:
        raise ValueError(f"self_attn_mask: expected a bool or float ({lq}, {lq}) tensor on "
                         f"{x.device}, got {getattr(attn_mask, 'dtype', type(attn_mask).__name__)}"
                         f" {tuple(getattr(attn_mask, 'shape', ()))}")
    acc = _ref_dtype(x)
    if attn_mask.dtype != torch.bool:
        return attn_mask.to(acc)
    return torch.zeros((lq, lq), dtype=acc, device=x.device).masked_fill(attn_mask,
                                                                          float("-inf"))


def _run(layer: nn.Module, decoder: bool, x: Tensor, pos: Tensor | None, ref: Tensor,
         memory: Tensor | None, spatial_shapes, level_start_index, mask: Tensor | None,
         params: dict, recompute: bool, supported: bool = False,
         self_attn_mask: Tensor | None = None) -> Tensor:
    attn = layer.cross_attn if decoder else layer.self_attn
    if not isinstance(x, Tensor) or x.dtype not in _LAYER_DTYPES:
        raise ValueError(f"x: expected a float32, float64 or bfloat16 tensor, got "
                         f"{getattr(x, 'dtype', type(x).__name__)}")
    if _autocast(x.device.type):  # bfloat16 autocast (supports() says which): run in bf16
        x, pos, memory = (None if t is None else t.to(torch.bfloat16) for t in (x, pos, memory))
        params = {name: t.to(torch.bfloat16) for name, t in params.items()}
    value_in = x if memory is None else memory  # (a dense encoder layer: x itself)
    _check(attn, x, pos, ref, value_in, spatial_shapes, mask)
    problem = None if supported else unsupported(layer, x, pos, memory)
    if problem is not None:
        raise ValueError(f"this layer cannot run natively: {problem}")
    _check_params(layer, decoder, x, params)
    table = as_level_table(spatial_shapes, level_start_index, x.device)
    s = value_in.shape[1]
    if table.pixels != s:
        raise ValueError(f"spatial_shapes: the levels hold {table.pixels} pixels but the "
                         f"value input has {s} tokens")
    p = _dropouts(layer)[0] if layer.training else 0.0
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                           for t in (x, pos, ref, memory, *params.values()))
    n, lq, c = x.shape
    call = ops_layers.LayerCall(
        decoder=decoder, batch=n, queries=lq, d_model=c,
        dim_feedforward=layer.linear1.out_features, ref_dim=ref.shape[-1], tokens=s,
        num_heads=attn.n_heads, num_levels=attn.n_levels, num_points=attn.n_points,
        levels=table.rows, training=grad or (layer.training and p > 0),
        recompute=bool(recompute), dropout=float(p), seed=seed_from_torch() if p > 0 else 0)
    ref = ref.to(_ref_dtype(x))  # (differentiable; a no-op unless bf16 references)
    return ops_layers.run(call, x, pos, ref, memory, mask, params,
                          _score_bias(self_attn_mask, x))


def encoder_layer(layer: nn.Module, src: Tensor, pos: Tensor | None, reference_points: Tensor,
                  spatial_shapes, level_start_index, padding_mask: Tensor | None = None,
                  recompute: bool = False, memory: Tensor | None = None, *,
                  supported: bool = False) -> Tensor:
    """``layer(src, pos, reference_points, ..., memory=memory)`` of a
    DeformableTransformerEncoderLayer, natively. Dense (memory None): src, pos (N, S, C),
    reference_points (N, S, L, 2). Sparse: src, pos (N, Lq, C) and reference_points
    (N, Lq, L, 2) are the rows of memory (N, S, C) to update, memory the values.
    padding_mask (N, S) bool. ``supported``: the caller has just had ``supports`` say yes
    for these inputs (it is not asked again). Returns (N, Lq, C)."""
    params = {**_deform_params(layer.self_attn, layer.norm1), **_ffn_params(layer, layer.norm2)}
    return _run(layer, False, src, pos, reference_points, memory, spatial_shapes,
                level_start_index, padding_mask, params, recompute, supported)


def decoder_layer(layer: nn.Module, tgt: Tensor, query_pos: Tensor | None,
                  reference_points: Tensor, memory: Tensor, spatial_shapes, level_start_index,
                  memory_padding_mask: Tensor | None = None, recompute: bool = False, *,
                  supported: bool = False, self_attn_mask: Tensor | None = None) -> Tensor:
    """``layer(tgt, query_pos, reference_points, memory, ...)`` of a
    DeformableTransformerDecoderLayer, natively. reference_points (N, Lq, L, 2 or 4);
    ``self_attn_mask`` (Lq, Lq): bool, True where query i may not attend to query j (as
    ``nn.MultiheadAttention``; every row must allow one query), or float, added to the
    scores; ``supported`` as for ``encoder_layer``."""
    sa = layer.self_attn
    params = {"self_attn_in_proj_weight": sa.in_proj_weight,
              "self_attn_in_proj_bias": sa.in_proj_bias,
              "self_attn_out_proj_weight": sa.out_proj.weight,
              "self_attn_out_proj_bias": sa.out_proj.bias,
              "self_attn_norm_weight": layer.norm2.weight,
              "self_attn_norm_bias": layer.norm2.bias,
              **_deform_params(layer.cross_attn, layer.norm1), **_ffn_params(layer, layer.norm3)}
    return _run(layer, True, tgt, query_pos, reference_points, memory, spatial_shapes,
                level_start_index, memory_padding_mask, params, recompute, supported,
                self_attn_mask)
