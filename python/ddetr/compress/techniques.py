"""Structural and precision techniques of ``ddetr.compress``: each builds a new
``DeformableDetr`` from the original's config with the technique's change and the
original's weights, remapped (never re-initialised), and leaves the original alone."""

from __future__ import annotations

import copy
import re

import torch
from torch import Tensor

from ddetr.models.deformable_detr import DeformableDetr

_HEAD_KEY = re.compile(r"^(.*(?:class_embed|bbox_embed))\.(\d+)\.(.*)$")
_DEC_LAYER_KEY = re.compile(r"^transformer\.decoder\.layers\.(\d+)\.(.*)$")


def check_model(model) -> None:
    if not isinstance(model, DeformableDetr):
        raise ValueError(f"model: expected a ddetr DeformableDetr, got {type(model).__name__}")


def rebuild(model: DeformableDetr, state: dict, record: dict, **changes) -> DeformableDetr:
    """A DeformableDetr with ``model.config`` updated by ``changes``, holding ``state``,
    on model's device and dtype, in model's train/eval mode and native-layer setting,
    with ``record`` added to what was applied (``compression``)."""
    config = {**model.config, **changes}
    native = model.transformer.encoder.layers[0].native_layers
    new = DeformableDetr(**config, native_layers=native)
    new.restore_compression(model.compression)  # the modules of earlier techniques (int8)
    first = next(model.parameters())
    new.to(first.device, first.dtype)
    new.load_state_dict(state, strict=True)
    new.compression = [*model.compression, record]
    return new.train(model.training)


def state_copy(model: DeformableDetr) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def truncate_decoder(model: DeformableDetr, k: int) -> DeformableDetr:
    """The model stopped after decoder layer ``k`` (1 <= k <= num_decoder_layers), its
    outputs read with layer k's heads (every layer has heads; with auxiliary losses
    each was trained to predict). ``k = num_decoder_layers`` is the model itself."""
    check_model(model)
    depth = model.config["num_decoder_layers"]
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= depth:
        raise ValueError(f"k: expected an int in [1, {depth}] (the decoder's depth), got {k!r}")
    two_stage = model.config["two_stage"]
    state = {}
    for key, value in state_copy(model).items():
        layer = _DEC_LAYER_KEY.match(key)
        head = _HEAD_KEY.match(key)
        if layer and int(layer.group(1)) >= k:
            continue
        if head:
            i = int(head.group(2))
            if two_stage and i == depth:  # the encoder's proposal head comes last
                key = f"{head.group(1)}.{k}.{head.group(3)}"
            elif i >= k:
                continue
        state[key] = value
    return rebuild(model, state, {"technique": "truncate_decoder", "k": k},
                    num_decoder_layers=k)


def reduce_queries(model: DeformableDetr, k: int, keep: list[int] | None = None
                   ) -> DeformableDetr:
    """``k`` decoder queries: in two-stage mode the top-k encoder proposals (``keep`` not
    allowed); otherwise the learned queries ``keep`` (k indices, e.g. the most used by
    ``query_usage``; default the first k)."""
    check_model(model)
    total = model.num_queries
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= total:
        raise ValueError(f"k: expected an int in [1, {total}] (the model's queries), got {k!r}")
    state = state_copy(model)
    if model.config["two_stage"]:
        if keep is not None:
            raise ValueError("keep: not used in two-stage mode (the top-k proposals are kept)")
        return rebuild(model, state, {"technique": "reduce_queries", "k": k},
                        two_stage_num_proposals=k)
    keep = list(range(k)) if keep is None else list(keep)
    if len(keep) != k or len(set(keep)) != k or not all(0 <= i < total for i in keep):
        raise ValueError(f"keep: expected {k} distinct query indices in [0, {total}), got {keep}")
    state["query_embed.weight"] = state["query_embed.weight"][sorted(keep)]
    return rebuild(model, state, {"technique": "reduce_queries", "k": k, "keep": sorted(keep)},
                    num_queries=k)


def _attn_modules(model: DeformableDetr) -> dict[str, list[str]]:
    """Module names of the encoder's and the decoder's MSDeformAttn, layer by layer."""
    enc = [f"transformer.encoder.layers.{i}.self_attn"
           for i in range(len(model.transformer.encoder.layers))]
    dec = [f"transformer.decoder.layers.{i}.cross_attn"
           for i in range(len(model.transformer.decoder.layers))]
    return {"encoder": enc, "decoder": dec}


def _float_attention(model: DeformableDetr, name: str, what: str):
    """MSDeformAttn ``name`` of model, whose sampling_offsets / attention_weights must be
    float (their rows are sliced)."""
    attn = model.get_submodule(name)
    if not all(type(m) is torch.nn.Linear for m in (attn.sampling_offsets,
                                                  attn.attention_weights)):
        raise ValueError(f"model: its sampling_offsets / attention_weights are int8; "
                         f"{what} before to_int8 includes them")
    return attn


def _keep_points(usage: Tensor, points: int) -> Tensor:
    """(M, L, P) mean weights -> (M, L, points) indices of the largest, in order."""
    return usage.topk(points, dim=-1).indices.sort(dim=-1).values


def _slice_points(state: dict, name: str, keep: Tensor) -> None:
    """Keeps points ``keep`` (M, L, P') of MSDeformAttn ``name`` in ``state``."""
    m, lv, p_new = keep.shape
    for part, per_point in (("sampling_offsets", 2), ("attention_weights", 1)):
        for suffix in ("weight", "bias"):
            key = f"{name}.{part}.{suffix}"
            t = state[key]
            # (M*L*P*k, ...) -> (M, L, P, k, ...): gather the kept points
            view = t.view(m, lv, -1, per_point, *t.shape[1:])
            index = keep.view(m, lv, p_new, *([1] * (view.dim() - 3))).expand(
                m, lv, p_new, *view.shape[3:])
            state[key] = view.gather(2, index.to(t.device)).reshape(-1, *t.shape[1:]).clone()


def prune_points(model: DeformableDetr, enc_points: int | None = None,
                 dec_points: int | None = None, usage: dict | None = None) -> DeformableDetr:
    """``enc_points`` / ``dec_points`` sampling points per (head, level) in the encoder /
    decoder (None: unchanged), keeping in each layer, head and level the points with the
    largest mean attention weight in ``usage`` (``point_usage``; without it the first
    points). The attention softmax then renormalises over the points kept."""
    check_model(model)
    state = state_copy(model)
    changes = {}
    for part, points, key in (("encoder", enc_points, "enc_num_points"),
                              ("decoder", dec_points, "dec_num_points")):
        if points is None:
            continue
        total = model.config[key]
        if not isinstance(points, int) or isinstance(points, bool) or not 1 <= points <= total:
            raise ValueError(f"{part[:3]}_points: expected an int in [1, {total}], got {points!r}")
        for name in _attn_modules(model)[part]:
            attn = _float_attention(model, name, "prune points")
            shape = (attn.n_heads, attn.n_levels, attn.n_points)
            mean = usage[name] if usage is not None else -torch.arange(shape[2]).expand(shape)
            _slice_points(state, name, _keep_points(mean.float(), points))
        changes[key] = points
    record = {"technique": "prune_points", "enc_points": enc_points, "dec_points": dec_points}
    return rebuild(model, state, record, **changes)


def drop_levels(model: DeformableDetr, levels: list[int]) -> DeformableDetr:
    """The model on the feature levels ``levels`` only (indices into its
    ``num_feature_levels`` pyramid, ascending, a subset of ``model.feature_levels``; e.g.
    the most attended by ``level_usage``): every encoder and decoder attention samples
    only those levels, its softmax renormalising over their points, and the encoder takes
    only their tokens. Without the coarsest levels the backbone's last stage and the extra
    projections are not run. All current levels: the model itself."""
    check_model(model)
    current = model.feature_levels
    if (not isinstance(levels, (list, tuple)) or not levels
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in levels)
            or list(levels) != sorted(set(levels)) or not set(levels) <= set(current)):
        raise ValueError(f"levels: expected ascending distinct level indices from the "
                         f"model's levels {current}, got {levels!r}")
    positions = torch.tensor([current.index(v) for v in levels])
    state = state_copy(model)
    state["transformer.level_embed"] = state["transformer.level_embed"][positions].clone()
    names = _attn_modules(model)
    for name in names["encoder"] + names["decoder"]:
        attn = _float_attention(model, name, "drop levels")
        for part, per_point in (("sampling_offsets", 2), ("attention_weights", 1)):
            for suffix in ("weight", "bias"):
                key = f"{name}.{part}.{suffix}"
                t = state[key]
                # (M*L*P*k, ...) -> (M, L, P*k, ...): the kept levels' rows
                view = t.view(attn.n_heads, attn.n_levels, -1, *t.shape[1:])
                state[key] = view[:, positions.to(t.device)].reshape(-1, *t.shape[1:]).clone()
    return rebuild(model, state, {"technique": "drop_levels", "levels": list(levels)},
                   feature_levels=list(levels))


def level_usage(model: DeformableDetr, usage: dict) -> dict[int, float]:
    """``{pyramid level: share of the attention}`` from ``point_usage``: each level's
    mean attention weight, summed over its points, averaged over heads and modules (the
    shares sum to 1)."""
    check_model(model)
    shares = torch.stack([u.detach().float().sum(-1).mean(0) for u in usage.values()]).mean(0)
    return {lvl: float(v) for lvl, v in zip(model.feature_levels, shares)}


def input_scale(model: DeformableDetr) -> float:
    """The factor on the input images' sizes that ``resize_inputs`` records (1.0: none)."""
    scale = 1.0
    for record in model.compression:
        scale *= record.get("scale", 1.0)
    return scale


def resize_inputs(model: DeformableDetr, scale: float) -> DeformableDetr:
    """The same weights, recorded to run on images ``scale`` times the size (shorter and
    longer side) the model was evaluated at: ``ddetr eval`` / ``predict`` of what
    ``ddetr compress`` writes resize by it, and a search measures it at that size."""
    check_model(model)
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not 0 < scale <= 1:
        raise ValueError(f"scale: expected a factor in (0, 1], got {scale!r}")
    new = copy.deepcopy(model)
    new.compression = [*model.compression, {"technique": "resize_inputs", "scale": scale}]
    return new


def to_bfloat16(model: DeformableDetr) -> DeformableDetr:
    """A bfloat16 copy: every parameter and activation in bfloat16, float32 sums (the
    native layers and MSDA accumulate in float32); inputs may stay float32."""
    check_model(model)
    new = copy.deepcopy(model).to(torch.bfloat16)
    new.compression = [*model.compression, {"technique": "to_bfloat16", "dtype": "bfloat16"}]
    return new
