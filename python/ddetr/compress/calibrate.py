"""Statistics of a model on calibration images, for the data-driven techniques:
how much attention each sampling point gets, and which learned queries detect."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from ddetr.models.deformable_detr import DeformableDetr
from ddetr.models.ms_deform_attn import MSDeformAttn


def _batches(images: Iterable) -> Iterable:
    """(images, mask) pairs from batches that are a tensor, a list of (3, H, W) tensors,
    an (images, mask) pair or a loader's (images, mask, targets)."""
    for batch in images:
        if isinstance(batch, (tuple, list)) and len(batch) in (2, 3) and \
                isinstance(batch[0], Tensor) and batch[0].dim() == 4:
            yield batch[0], batch[1]
        else:
            yield batch, None


@torch.no_grad()
def point_usage(model: DeformableDetr, images: Iterable) -> dict[str, Tensor]:
    """Mean softmaxed attention weight of every sampling point, per MSDeformAttn module
    name: ``{name: (M, L, P)}``, averaged over the queries of every calibration image."""
    sums, counts, hooks = {}, {}, []

    def hook(name, attn):
        def record(_module, _inputs, logits):
            m, lv, p = attn.n_heads, attn.n_levels, attn.n_points
            # (N, Lq, M*L*P) -> softmax over L*P per head -> (M, L, P) summed over N, Lq
            w = logits.float().view(-1, m, lv * p).softmax(-1).view(-1, m, lv, p)
            sums[name] = sums.get(name, 0) + w.sum(0)
            counts[name] = counts.get(name, 0) + w.shape[0]
        return record

    for name, module in model.named_modules():
        if isinstance(module, MSDeformAttn):
            hooks.append(module.attention_weights.register_forward_hook(hook(name, module)))
    was_training = model.training
    try:
        model.eval()
        for batch, mask in _batches(images):
            model(batch, mask)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    if not sums:
        raise ValueError("images: no calibration image was given")
    return {name: (sums[name] / counts[name]).cpu() for name in sums}


@torch.no_grad()
def query_usage(model: DeformableDetr, images: Iterable, threshold: float = 0.1) -> Tensor:
    """(num_queries,) how often each learned query's best class score reached
    ``threshold`` on the calibration images (one-stage models)."""
    if model.config["two_stage"]:
        raise ValueError("model: two-stage queries are proposals, not learned: use "
                         "reduce_queries(model, k) without keep")
    was_training = model.training
    counts = torch.zeros(model.num_queries)
    try:
        model.eval()
        for batch, mask in _batches(images):
            logits = model(batch, mask)["pred_logits"].float()
            counts += (logits.sigmoid().amax(-1) >= threshold).sum(0).cpu()
    finally:
        model.train(was_training)
    return counts
