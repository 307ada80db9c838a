"""Recording where the decoder's deformable cross-attention looks: for every decoder
layer, the sampling locations and attention weights of every query (the paper's
visualisation of sampling points)."""

from __future__ import annotations

import torch
from torch import Tensor


class SamplingPointRecorder:
    """Context manager over a ``DeformableDetr``: while active, each decoder layer's
    cross-attention call appends to ``records`` a dict with ``locations`` (N, Lq, M, L,
    P, 2) normalised (x, y) on the padded feature maps and ``weights`` (N, Lq, M, L, P),
    recomputed from the module's inputs with its own layers (the op returns neither)."""

    def __init__(self, model):
        self.modules = [layer.cross_attn for layer in model.transformer.decoder.layers]
        self.records: list[dict] = []
        self._handles = []

    def __enter__(self) -> "SamplingPointRecorder":
        self.records.clear()
        self._handles = [m.register_forward_hook(self._hook) for m in self.modules]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @torch.no_grad()
    def _hook(self, module, args, output) -> None:
        query, reference_points, _, spatial_shapes = args[:4]
        self.records.append(sampling_points(module, query, reference_points, spatial_shapes))


def sampling_points(module, query: Tensor, reference_points: Tensor, spatial_shapes) -> dict:
    """The sampling locations and softmaxed weights ``MSDeformAttn.forward`` uses."""
    locations, weights = module.sampling_locations(query, reference_points, spatial_shapes)
    return {"locations": locations.float(), "weights": weights.float()}
