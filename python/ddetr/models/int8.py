"""Which linear layers of a ``DeformableDetr`` become int8 (``ddetr.ops.Int8Linear``), by
role, and the swap itself (``use_int8``): ``ddetr.compress.to_int8`` quantises a trained
model with it, and ``DeformableDetr.restore_compression`` rebuilds the same modules
before a saved int8 model's weights load into them.

Roles (``INT8_ROLES``): in every MSDeformAttn ``value_proj``, ``output_proj``,
``sampling_offsets`` and ``attention_weights``; in every encoder and decoder layer
``linear1`` and ``linear2``; ``out_proj``, the output projection of each decoder layer's
self-attention (the whole ``nn.MultiheadAttention`` becomes an
``Int8MultiheadAttention``, whose q/k/v projection stays float); the heads
``class_embed`` and ``bbox_embed`` (every linear of the box MLPs). Shared modules (the
heads without box refinement) stay shared.
"""

from __future__ import annotations

import re

import torch.nn.functional as F
from torch import Tensor, nn

from ddetr.models.ms_deform_attn import MSDeformAttn
from ddetr.ops import Int8Linear, linear, module_linear

INT8_ROLES = ("value_proj", "output_proj", "sampling_offsets", "attention_weights", "linear1",
              "linear2", "out_proj", "class_embed", "bbox_embed")
# sampling_offsets and attention_weights decide where and how much each query looks:
# published DETR quantisation results lose most of their accuracy there, so they stay
# float unless asked for; the heads are small (300 queries) and stay float too.
DEFAULT_INT8_ROLES = ("value_proj", "output_proj", "linear1", "linear2", "out_proj")
_ATTN_ROLES = ("value_proj", "output_proj", "sampling_offsets", "attention_weights")
_LAYER = re.compile(r"^transformer\.(encoder|decoder)\.layers\.\d+$")


class Int8MultiheadAttention(nn.MultiheadAttention):
    """The decoder's self-attention with an int8 ``out_proj`` (an ``Int8Linear``): the
    same parameter names (``in_proj_weight``, ``in_proj_bias``, ``out_proj.*``), batch
    first, no masks, no attention weights returned (as the decoder layer calls it)."""

    @classmethod
    def from_mha(cls, mha: nn.MultiheadAttention) -> "Int8MultiheadAttention":
        if not (mha.batch_first and mha.kdim == mha.embed_dim == mha.vdim
                and mha.in_proj_bias is not None
                and mha.bias_k is None and not mha.add_zero_attn):
            raise ValueError("out_proj: only a batch-first nn.MultiheadAttention with one "
                             "q/k/v projection and biases can take an int8 out_proj")
        new = cls(mha.embed_dim, mha.num_heads, dropout=mha.dropout, batch_first=True)
        new.in_proj_weight.data.copy_(mha.in_proj_weight.detach())
        new.in_proj_bias.data.copy_(mha.in_proj_bias.detach())
        new.out_proj = Int8Linear.from_linear(mha.out_proj)
        return new.to(mha.in_proj_weight.device).train(mha.training)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask=None,
                need_weights: bool = True, attn_mask=None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, None]:
        """query, key, value (N, Lq, C) -> ((N, Lq, C), None)."""
        if key_padding_mask is not None or attn_mask is not None or is_causal or need_weights:
            raise ValueError("Int8MultiheadAttention takes no masks and returns no weights "
                             "(call it with need_weights=False)")
        n, lq, c = query.shape
        m, d = self.num_heads, c // self.num_heads
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q, b_k, b_v = self.in_proj_bias.chunk(3)
        # (N, L, C) -> (N, M, L, D)
        q, k, v = (linear(x, w, b).view(n, -1, m, d).transpose(1, 2)
                   for x, w, b in ((query, w_q, b_q), (key, w_k, b_k), (value, w_v, b_v)))
        out = F.scaled_dot_product_attention(q, k, v,
                                             dropout_p=self.dropout if self.training else 0.0)
        # (N, M, Lq, D) -> (N, Lq, C)
        out = out.transpose(1, 2).reshape(n, lq, c)
        return module_linear(self.out_proj, out), None


def check_roles(include) -> tuple[str, ...]:
    """``include`` as a tuple of known roles; ValueError naming ``include`` otherwise."""
    if isinstance(include, str) or not all(isinstance(r, str) for r in include):
        raise ValueError(f"include: expected a list of roles from {INT8_ROLES}, got {include!r}")
    unknown = sorted(set(include) - set(INT8_ROLES))
    if unknown or not include:
        raise ValueError(f"include: expected roles from {INT8_ROLES}, got {list(include)} "
                         f"(unknown: {unknown})")
    return tuple(r for r in INT8_ROLES if r in include)


def _role(model: nn.Module, path: str, module: nn.Module) -> str | None:
    """The role of sub-module ``path`` (None: not a quantisable one)."""
    parent_path, _, leaf = path.rpartition(".")
    first = path.split(".")[0]
    if first in ("class_embed", "bbox_embed"):
        return first if type(module) is nn.Linear else None
    if not path.startswith("transformer."):
        return None
    parent = model.get_submodule(parent_path)
    if leaf in _ATTN_ROLES and isinstance(parent, MSDeformAttn) and type(module) is nn.Linear:
        return leaf
    if not _LAYER.match(parent_path):  # (a token scorer has a linear1 too)
        return None
    if leaf in ("linear1", "linear2") and type(module) is nn.Linear:
        return leaf
    if leaf == "self_attn" and type(module) is nn.MultiheadAttention:
        return "out_proj"
    return None


def use_int8(model: nn.Module, include=DEFAULT_INT8_ROLES) -> list[str]:
    """Replaces, in place, the linear layers of ``model`` (a DeformableDetr) whose role is
    in ``include`` by int8 ones quantised from their current weights; returns the
    module paths replaced. Modules already int8 are left alone."""
    roles = check_roles(include)
    swaps: dict[int, nn.Module] = {}  # id of the float module -> its int8 replacement
    done = []
    for path, module in list(model.named_modules(remove_duplicate=False)):
        role = _role(model, path, module) if path else None
        if role not in roles:
            continue
        if id(module) not in swaps:
            swaps[id(module)] = (Int8MultiheadAttention.from_mha(module) if role == "out_proj"
                                 else Int8Linear.from_linear(module))
        parent_path, _, leaf = path.rpartition(".")
        setattr(model.get_submodule(parent_path), leaf, swaps[id(module)])
        done.append(path)
    return done
