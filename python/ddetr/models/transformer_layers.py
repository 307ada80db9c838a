"""Encoder and decoder layers of the deformable transformer, and their stacks.

Module names follow the official checkpoint: encoder layers hold ``self_attn``
(MSDeformAttn over all tokens), ``norm1``, ``linear1``, ``linear2``, ``norm2``; decoder
layers hold ``self_attn`` (dense ``nn.MultiheadAttention`` among the queries),
``norm2``, ``cross_attn`` (MSDeformAttn into the encoder memory), ``norm1``,
``linear1``, ``linear2``, ``norm3``. All layers are post-norm.

Each layer has two attributes the detector sets (``DeformableDetr(native_layers=...)``):
``native_layers`` runs the whole layer in one native call per pass when
``ddetr.models.native_layers.supports`` allows it (the same parameters and result; off by
default on a bare layer, so the code below is the reference), and
``recompute_activations`` lets that native backward recompute the FFN activations and
attention probabilities instead of storing them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ddetr.models.box_ops import inverse_sigmoid
from ddetr.models import native_layers
from ddetr.models.ms_deform_attn import MSDeformAttn
from ddetr.models.token_selection import RowIndex
from ddetr.ops import dropout, module_linear, relu_dropout


# In inference (no autograd) the encoder runs the per-token part of a layer over blocks
# of this many tokens after projecting all values: the FFN's hidden activations and the
# sampling tensors then stay small and in cache instead of hundreds of MB per layer. On
# a GPU, blocks that small are launches too small to fill it: a whole 800x1333 image
# (22,223 tokens) goes in one block there.
INFERENCE_BLOCK_TOKENS = 2048
INFERENCE_BLOCK_TOKENS_GPU = 32768


# No in-place ops on sub-module outputs here: a forward hook on linear1 or output_proj
# would see its output change after the fact (and with autograd, an in-place op on a
# linear's 3-d output, a view, costs a CopySlices node in the backward).
_relu = F.relu


def _drop(module: nn.Dropout, x: Tensor) -> Tensor:
    """``module(x)`` with ddetr's dropout (mask regenerated in the backward, not stored)."""
    return dropout(x, module.p, module.training)


def _ffn(layer: nn.Module, x: Tensor, drop: nn.Dropout) -> Tensor:
    """linear2(dropout(activation(linear1(x)))); ReLU and dropout fused when training."""
    if layer.activation is _relu and drop.training:
        hidden = relu_dropout(module_linear(layer.linear1, x), drop.p)
    elif layer.activation is _relu:
        hidden = module_linear(layer.linear1, x, relu=True)
    else:
        hidden = _drop(drop, layer.activation(module_linear(layer.linear1, x)))
    return module_linear(layer.linear2, hidden)


def activation_fn(name: str):
    """The activation called ``name`` ("relu" or "gelu"); ValueError otherwise."""
    if name == "relu":
        return _relu
    if name == "gelu":
        return F.gelu
    raise ValueError(f"activation: expected 'relu' or 'gelu', got {name!r}")


def _with_pos(x: Tensor, pos: Tensor | None) -> Tensor:
    return x if pos is None else x + pos


class DeformableTransformerEncoderLayer(nn.Module):
    def __init__(self, d_model=256, dim_feedforward=1024, dropout=0.1, activation="relu",
                 num_levels=4, num_heads=8, num_points=4):
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, num_levels, num_heads, num_points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.activation = activation_fn(activation)
        self.dropout2 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.native_layers = False
        self.recompute_activations = False

    def forward(self, src: Tensor, pos: Tensor, reference_points: Tensor, spatial_shapes: Tensor,
                level_start_index: Tensor, padding_mask: Tensor | None = None,
                memory: Tensor | None = None) -> Tensor:
        """Dense (memory None): src, pos (N, S, C); reference_points (N, S, L, 2).
        Sparse: src, pos (N, Lq, C) and reference_points (N, Lq, L, 2) are the rows of
        memory (N, S, C) that this layer updates; every memory token is a value.
        padding_mask (N, S). Returns (N, Lq, C), the updated rows."""
        if self.native_layers and native_layers.supports(self, src, pos, reference_points,
                                                         memory):
            # (encoder_layer checks its inputs itself)
            return native_layers.encoder_layer(self, src, pos, reference_points, spatial_shapes,
                                               level_start_index, padding_mask,
                                               self.recompute_activations, memory,
                                               supported=True)
        memory = src if memory is None else memory
        self.self_attn.check_inputs(src, reference_points, memory, spatial_shapes, padding_mask)
        value = self.self_attn.project_value(memory, padding_mask)
        # a traced graph (torch.export, ONNX) takes all rows at once: a loop over blocks
        # would fix the number of tokens it is valid for
        if torch.is_grad_enabled() or torch.compiler.is_compiling() or \
                torch.compiler.is_exporting():
            return self._tokens(src, pos, reference_points, value, spatial_shapes,
                                level_start_index)
        # every token's output depends on the values and its own row only: blocks of rows
        out = torch.empty_like(src)
        block = INFERENCE_BLOCK_TOKENS_GPU if src.is_cuda else INFERENCE_BLOCK_TOKENS
        for i in range(0, src.shape[1], block):
            rows = slice(i, i + block)
            out[:, rows] = self._tokens(src[:, rows], None if pos is None else pos[:, rows],
                                        reference_points[:, rows], value, spatial_shapes,
                                        level_start_index)
        return out

    def _tokens(self, src, pos, reference_points, value, spatial_shapes, level_start_index):
        """The layer for the tokens of ``src`` (N, T, C), given all projected values."""
        attn = self.self_attn.attend(_with_pos(src, pos), reference_points, value,
                                     spatial_shapes, level_start_index)
        src = self.norm1(src + _drop(self.dropout1, attn))
        ffn = _ffn(self, src, self.dropout2)
        return self.norm2(src + _drop(self.dropout3, ffn))


class DeformableTransformerEncoder(nn.Module):
    def __init__(self, layers: list[nn.Module]):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.num_layers = len(layers)

    def forward(self, src, pos, reference_points, spatial_shapes, level_start_index,
                padding_mask=None, token_index: Tensor | None = None) -> Tensor:
        """Returns the memory (N, S, C); reference_points (N, S, L, 2) are pixel centres.
        ``token_index`` (N, K) int64, distinct per image (``select_tokens``): every layer
        updates only those tokens (Sparse DETR), the others pass through unchanged and
        all stay values; None: every token."""
        if token_index is None:
            out = src
            for layer in self.layers:
                out = layer(out, pos, reference_points, spatial_shapes, level_start_index,
                            padding_mask)
            return out
        rows = RowIndex(token_index, src.shape[1])
        pos_k = None if pos is None else rows.gather(pos)
        ref_k = rows.gather(reference_points)
        # without autograd one copy of src is updated in place, layer after layer
        grad = torch.is_grad_enabled()
        out = src if grad else src.clone(memory_format=torch.contiguous_format)
        for layer in self.layers:
            updated = layer(rows.gather(out), pos_k, ref_k, spatial_shapes, level_start_index,
                            padding_mask, memory=out)
            if updated.dtype != out.dtype:  # (bfloat16 autocast: the layers' output dtype)
                out = out.to(updated.dtype)
            out = rows.scatter(out, updated, in_place=not grad)
        return out


class DeformableTransformerDecoderLayer(nn.Module):
    def __init__(self, d_model=256, dim_feedforward=1024, dropout=0.1, activation="relu",
                 num_levels=4, num_heads=8, num_points=4):
        super().__init__()
        self.cross_attn = MSDeformAttn(d_model, num_levels, num_heads, num_points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.self_attn = nn.MultiheadAttention(d_model, num_heads, dropout=dropout,
                                               batch_first=True)
        self.dropout2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.activation = activation_fn(activation)
        self.dropout3 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.dropout4 = nn.Dropout(dropout)
        self.norm3 = nn.LayerNorm(d_model)
        self.native_layers = False
        self.recompute_activations = False

    def forward(self, tgt: Tensor, query_pos: Tensor, reference_points: Tensor, memory: Tensor,
                spatial_shapes: Tensor, level_start_index: Tensor,
                memory_padding_mask: Tensor | None = None,
                self_attn_mask: Tensor | None = None) -> Tensor:
        """tgt, query_pos (N, Lq, C); reference_points (N, Lq, L, 2 or 4); memory (N, S, C).
        ``self_attn_mask`` (Lq, Lq) bool, True where query i may not attend to query j
        (DINO's denoising groups), on the native path as well."""
        if self.native_layers and native_layers.supports(self, tgt, query_pos,
                                                         reference_points, memory):
            return native_layers.decoder_layer(self, tgt, query_pos, reference_points, memory,
                                               spatial_shapes, level_start_index,
                                               memory_padding_mask, self.recompute_activations,
                                               supported=True, self_attn_mask=self_attn_mask)
        q = k = _with_pos(tgt, query_pos)
        attn = self.self_attn(q, k, tgt, attn_mask=self_attn_mask, need_weights=False)[0]
        tgt = self.norm2(tgt + _drop(self.dropout2, attn))
        attn = self.cross_attn(_with_pos(tgt, query_pos), reference_points, memory,
                               spatial_shapes, level_start_index, memory_padding_mask)
        tgt = self.norm1(tgt + _drop(self.dropout1, attn))
        ffn = _ffn(self, tgt, self.dropout3)
        return self.norm3(tgt + _drop(self.dropout4, ffn))


class DeformableTransformerDecoder(nn.Module):
    """The decoder stack. ``bbox_embed`` (and ``class_embed`` in two-stage mode) are the
    detector's heads, attached by the detector as in the official code: with them the
    reference boxes are refined layer by layer (iterative box refinement)."""

    def __init__(self, layers: list[nn.Module]):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.num_layers = len(layers)
        self.bbox_embed = None
        self.class_embed = None

    def forward(self, tgt, reference_points, memory, spatial_shapes, level_start_index,
                valid_ratios, query_pos=None, memory_padding_mask=None):
        """reference_points (N, Lq, 2) points or (N, Lq, 4) boxes_cxcywh, normalised to the
        valid image area. Returns ``(hs, references, boxes)``: every layer's output (N, Lq,
        C), the reference it hands to the next layer, and (with ``bbox_embed``) its refined
        boxes (N, Lq, 4) before the detach, which are the detector's box outputs for that
        layer (so its box head runs once per layer), or None without refinement."""
        out, hs, refs, boxes = tgt, [], [], []
        for i, layer in enumerate(self.layers):
            # normalised to the valid area -> to the padded map, per level:
            # (N, Lq, 2|4) x (N, L, 2|4) -> (N, Lq, L, 2|4)
            ratios = valid_ratios if reference_points.shape[-1] == 2 else valid_ratios.repeat(1, 1, 2)
            level_refs = reference_points[:, :, None] * ratios[:, None]
            out = layer(out, query_pos, level_refs, memory, spatial_shapes, level_start_index,
                        memory_padding_mask)
            if self.bbox_embed is not None:
                refined = self._refine(self.bbox_embed[i](out), reference_points)
                boxes.append(refined)
                # the next layer's reference is not back-propagated through (the
                # official detach); the box output is
                reference_points = refined.detach()
            hs.append(out)
            refs.append(reference_points)
        return hs, refs, (boxes or None)

    @staticmethod
    def _refine(delta: Tensor, reference_points: Tensor) -> Tensor:
        # the head predicts a correction of the reference in logit space
        if reference_points.shape[-1] == 4:
            refined = delta + inverse_sigmoid(reference_points)
        else:
            # a point becomes a box: (cx, cy) corrected, (w, h) from the delta alone
            refined = torch.cat([delta[..., :2] + inverse_sigmoid(reference_points),
                                 delta[..., 2:]], -1)
        return refined.sigmoid()

