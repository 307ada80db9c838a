"""Portable graph forms of ddetr's ops, for exporters.

Inside ``with portable_forms(msda):`` the public ops (``ms_deform_attn``,
``flatten_multiscale``, ``encoder_reference_points``) trace as standard PyTorch
operations instead of ddetr's custom ops, so a graph exporter (``torch.onnx.export``)
sees nothing it cannot translate:

- ``msda="standard"``: multi-scale deformable attention as gathers (``msda_gather``);
  every ONNX runtime runs it.
- ``msda="trt"``: one ``ddetr::trt_msda`` node with the inputs of TensorRT's
  ``MultiscaleDeformableAttnPlugin_TRT`` (int32 level tables); ``ddetr.export``
  translates it to that plugin's ONNX node. Eagerly it computes ``ms_deform_attn``.

Flattening and the encoder reference points use their pure-PyTorch references, which
keep symbolic sizes symbolic (dynamic image sizes). Outside the block nothing changes.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from ddetr.ops.msda_gather import ms_deform_attn_gather

MSDA_FORMS = ("standard", "trt")
# the active msda form, or None (a plain global: torch.compile reads it without a graph
# break, where it cannot trace a ContextVar)
_form: str | None = None


@contextlib.contextmanager
def portable_forms(msda: str = "standard"):
    """Trace ddetr's ops as standard operations (``msda``: "standard" or "trt")."""
    if msda not in MSDA_FORMS:
        raise ValueError(f"msda: expected one of {', '.join(MSDA_FORMS)}, got {msda!r}")
    global _form
    previous, _form = _form, msda
    try:
        yield
    finally:
        _form = previous


def active() -> bool:
    """Whether the ops trace in their portable forms here."""
    return _form is not None


@torch.library.custom_op("ddetr::trt_msda", mutates_args=())
def _trt_msda(value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor,
              sampling_locations: Tensor, attention_weights: Tensor) -> Tensor:
    n, _, m, d = value.shape
    out = ms_deform_attn_gather(value, spatial_shapes.long(), level_start_index.long(),
                                sampling_locations, attention_weights)
    return out.view(n, -1, m, d)  # the plugin's layout: (N, Lq, M, D)


@_trt_msda.register_fake
def _(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    n, _, m, d = value.shape
    return value.new_empty((n, sampling_locations.shape[1], m, d))


def ms_deform_attn(value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor,
                   sampling_locations: Tensor, attention_weights: Tensor) -> Tensor:
    """The active portable form of ``ms_deform_attn`` (tensor level tables)."""
    if _form == "trt":
        # the plugin's level tables are int32; (N, Lq, M, D) -> (N, Lq, M*D)
        out = _trt_msda(value, spatial_shapes.to(torch.int32),
                        level_start_index.to(torch.int32), sampling_locations,
                        attention_weights)
        return out.flatten(2)
    return ms_deform_attn_gather(value, spatial_shapes, level_start_index, sampling_locations,
                                 attention_weights)
