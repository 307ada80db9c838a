"""Statistics of a model on calibration images, for the data-driven techniques:
how much attention each sampling point gets, which learned queries detect, and how much
decoder attention each encoder token receives."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from typing import NamedTuple

import torch
from torch import Tensor

from ddetr.models.deformable_detr import DeformableDetr
from ddetr.models.ms_deform_attn import MSDeformAttn
from ddetr.ops import ms_deform_attn
from ddetr.ops.levels import as_level_table


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
@contextlib.contextmanager
def _hooked_eval(model: DeformableDetr, hooks: list):
    """The block runs ``model`` in eval mode; afterwards ``hooks`` are removed and the
    model's train/eval mode is restored, whatever happened."""
    was_training = model.training
    try:
        model.eval()
        yield
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)


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
    with _hooked_eval(model, hooks):
        for batch, mask in _batches(images):
            model(batch, mask)
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
    counts = torch.zeros(model.num_queries)
    with _hooked_eval(model, []):
        for batch, mask in _batches(images):
            logits = model(batch, mask)["pred_logits"].float()
            counts += (logits.sigmoid().amax(-1) >= threshold).sum(0).cpu()
    return counts


class TokenSaliency(NamedTuple):
    """One calibration batch's encoder tokens and the decoder attention they receive."""
    tokens: Tensor   # (N, S, C) float32 encoder input tokens (features + position/level embedding)
    padding: Tensor  # (N, S) bool, True on padding
    dam: Tensor      # (N, S) float32 decoder cross-attention map, 0 on padding


def _attention_received(attn: MSDeformAttn, query: Tensor, reference_points: Tensor,
                        levels, tokens: int) -> Tensor:
    """(N, S) float32: the attention weight the queries of ``attn`` put on each of the
    ``tokens`` value tokens, each sampling point's weight shared among its bilinear
    corners: the gradient of the summed MSDA output with respect to a value of ones."""
    table = as_level_table(levels, None, query.device)
    loc, weights = attn.sampling_locations(query, reference_points, table)
    ones = torch.ones(query.shape[0], tokens, attn.n_heads, 1, device=query.device,
                      requires_grad=True)
    with torch.enable_grad():
        out = ms_deform_attn(ones, table, None, loc.float(), weights.float())
        (received,) = torch.autograd.grad(out.sum(), ones)
    # (N, S, M, 1) -> (N, S)
    return received.sum((2, 3))


def _saliency_hooks(model: DeformableDetr, pending: dict) -> list:
    """Hooks that fill ``pending`` during a forward: the encoder's input tokens and
    padding, and the decoder's cross-attention map summed over layers, heads, points."""
    def encoder_inputs(_module, args):
        src, pos, mask = args[0], args[1], args[5]
        pending["tokens"] = (src if pos is None else src + pos).float()
        pending["padding"] = (torch.zeros(src.shape[:2], dtype=torch.bool, device=src.device)
                              if mask is None else mask)
        pending["dam"] = torch.zeros(src.shape[:2], device=src.device)

    def cross_attention(module, args, _output):
        query, reference_points, memory, levels = args[:4]
        pending["dam"] += _attention_received(module, query, reference_points, levels,
                                              memory.shape[1])

    hooks = [model.transformer.encoder.register_forward_pre_hook(encoder_inputs)]
    for layer in model.transformer.decoder.layers:
        hooks.append(layer.cross_attn.register_forward_hook(cross_attention))
    return hooks


@torch.no_grad()
def encoder_token_saliency(model: DeformableDetr, images: Iterable) -> list[TokenSaliency]:
    """Per calibration batch, the encoder's input tokens and the decoder attention map
    (DAM, Sparse DETR): how much attention weight each encoder token receives from all
    the decoder's sampling points, summed over layers, heads and points (the decoder
    layers run on the PyTorch path while hooked)."""
    pending: dict = {}
    found = []
    hooks = _saliency_hooks(model, pending)
    with _hooked_eval(model, hooks):
        for batch, mask in _batches(images):
            model(batch, mask)
            dam = pending["dam"].masked_fill(pending["padding"], 0.0)
            found.append(TokenSaliency(pending["tokens"], pending["padding"], dam))
    if not found:
        raise ValueError("images: no calibration image was given")
    return found
