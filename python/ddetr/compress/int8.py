"""``to_int8(model)``: the transformer's linear layers with int8 weights (one scale per
output channel) and int8 activations (one scale per token, computed on the fly: no
calibration), run by ddetr's int8 GEMM on the CPU (``ddetr.ops.Int8Linear``).

The result is an ordinary ``DeformableDetr`` whose ``compression`` records
``{"technique": "to_int8", "include": [roles], ...}``; ``save_pretrained`` /
``from_pretrained`` and ``ddetr compress``'s checkpoint rebuild the int8 layers from that
record before the int8 weights and scales load, so a saved int8 model gives the same
outputs. Int8 layers run in float32 on the CPU only: the model must be float32 on the
CPU, and does not combine with ``to_bfloat16``.
"""

from __future__ import annotations

import copy

import torch

from ddetr import _native
from ddetr.compress.techniques import check_model
from ddetr.models.deformable_detr import DeformableDetr
from ddetr.models.int8 import DEFAULT_INT8_ROLES, INT8_ROLES, check_roles, use_int8

__all__ = ["DEFAULT_INT8_ROLES", "INT8_ROLES", "int8_ready", "to_int8"]


def _problem(model: DeformableDetr) -> str | None:
    """Why ``to_int8`` cannot apply to ``model`` (None: it can)."""
    first = next(model.parameters())
    if first.dtype != torch.float32 or first.device.type != "cpu":
        return (f"int8 layers run in float32 on the CPU; got a {first.dtype} model on "
                f"{first.device} (quantise before to_bfloat16, and on the CPU)")
    if any(r.get("technique") == "to_int8" for r in model.compression):
        return "already int8 (to_int8 was applied)"
    return None


def int8_ready(model: DeformableDetr) -> bool:
    """Whether ``to_int8`` applies to ``model``: float32 on the CPU, not int8 yet, and
    the native extension (its int8 GEMM) built."""
    return _native.available() and _problem(model) is None


def to_int8(model: DeformableDetr, include=DEFAULT_INT8_ROLES) -> DeformableDetr:
    """A copy of ``model`` whose linear layers of the roles in ``include`` are int8
    (``ddetr.models.int8.INT8_ROLES``; default the encoder's and decoder's
    ``value_proj``, ``output_proj``, ``linear1``, ``linear2`` and the decoder
    self-attention's ``out_proj``; ``sampling_offsets`` and ``attention_weights``, and
    the heads ``class_embed`` / ``bbox_embed``, only when included). The original is
    left alone."""
    check_model(model)
    roles = check_roles(include)
    problem = _problem(model)
    if problem is not None:
        raise ValueError(f"model: {problem}")
    new = copy.deepcopy(model)
    use_int8(new, roles)
    new.compression = [*model.compression,
                       {"technique": "to_int8", "include": list(roles),
                        "weights": "int8 per output channel",
                        "activations": "int8 per token (dynamic)"}]
    return new
