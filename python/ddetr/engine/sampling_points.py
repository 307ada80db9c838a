"""Recording where the decoder's deformable cross-attention looks: for every decoder
layer, the sampling locations and attention weights of every query (the paper's
visualisation of sampling points)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
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
    """The sampling locations and softmaxed weights ``MSDeformAttn.forward`` uses (the
    same formula: offsets in level pixels around a point, or scaled by half a box)."""
    n, lq, _ = query.shape
    m, lv, p = module.n_heads, module.n_levels, module.n_points
    # (N, Lq, M*L*P*2) -> (N, Lq, M, L, P, 2)
    offsets = module.sampling_offsets(query).view(n, lq, m, lv, p, 2).float()
    # (N, Lq, M*L*P) -> softmax over L*P -> (N, Lq, M, L, P)
    weights = F.softmax(module.attention_weights(query).view(n, lq, m, lv * p).float(), -1)
    ref = reference_points.float()[:, :, None, :, None, :]
    if reference_points.shape[-1] == 2:
        shapes = torch.as_tensor(spatial_shapes, device=query.device)
        # (L, 2) (H, W) -> (W, H) per level, broadcast to (1, 1, 1, L, 1, 2)
        normalizer = shapes.flip(-1).float()[None, None, None, :, None, :]
        locations = ref + offsets / normalizer
    else:
        locations = ref[..., :2] + offsets / p * ref[..., 2:] * 0.5
    return {"locations": locations, "weights": weights.view(n, lq, m, lv, p)}
