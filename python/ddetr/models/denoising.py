"""DINO's contrastive denoising (CDN, Zhang et al., ICLR 2023): noised copies of the
ground truth as extra decoder queries, trained to reconstruct it. Training only.

With ``T`` the most targets any image of the batch has, the denoising queries come in
``G = max(1, dn_number // T)`` groups of ``2T`` rows, in front of the matching queries:
in group g, row ``g*2T + j`` is a *positive* copy of target j (its box moved by less than
half its size) and row ``g*2T + T + j`` a *negative* one (moved by half to all of its
size), both labelled with the target's class, flipped to a random class with
probability ``label_noise_ratio / 2``. Rows past an image's own targets are padding
(zero content, the box (0.5, 0.5, 0.5, 0.5)). A query's content is ``label_enc`` of its
label, its reference box the noised box.

The self-attention mask keeps the matching queries from seeing any denoising query
(they would read the answer) and each group from seeing the others; denoising queries
see the matching ones. Positives reconstruct their target (focal, L1 and GIoU losses at
the rows above, no matching); negatives, like every unmatched query, learn "no object".

Official ``prepare_for_cdn`` semantics, with one simplification: the group count is
``dn_number // T`` for every ``dn_number`` (the official code divides only when
``2 * dn_number >= 100`` and otherwise makes ``2 * dn_number`` groups); the two agree
at the recipe's ``dn_number = 100``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from ddetr.models.box_ops import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh, inverse_sigmoid

# DINO's inverse_sigmoid epsilon (Deformable DETR's is 1e-5)
DINO_EPS = 1e-3


class Denoising(NamedTuple):
    content: Tensor      # (N, D, C) label embeddings of the denoising queries, D = 2*G*T
    box_logits: Tensor   # (N, D, 4) inverse-sigmoid noised boxes_cxcywh
    groups: int          # G
    group_size: int      # 2T: T positive rows, then T negative rows

    @property
    def num_queries(self) -> int:
        return self.groups * self.group_size


def denoising_queries(targets: list[dict], label_enc: nn.Embedding, num_classes: int,
                      dn_number: int, label_noise_ratio: float,
                      box_noise_scale: float) -> Denoising | None:
    """The denoising queries of a batch (see the module doc); None when no image has a
    target or ``dn_number`` is 0. ``targets`` as ``SetCriterion`` takes them."""
    most = max((len(t["labels"]) for t in targets), default=0)
    if most == 0 or dn_number <= 0:
        return None
    groups = max(1, dn_number // most)
    n, d_model = len(targets), label_enc.embedding_dim
    device = label_enc.weight.device
    labels = torch.zeros(n, most, dtype=torch.int64, device=device)
    boxes = torch.full((n, most, 4), 0.5, device=device)
    valid = torch.zeros(n, most, dtype=torch.bool, device=device)
    for b, t in enumerate(targets):
        k = len(t["labels"])
        labels[b, :k], boxes[b, :k], valid[b, :k] = t["labels"], t["boxes"].float(), True
    # (N, T) -> (N, G, 2, T): every group holds a positive and a negative copy
    labels = labels[:, None, None].expand(n, groups, 2, most)
    boxes = boxes[:, None, None].expand(n, groups, 2, most, 4)
    valid = valid[:, None, None].expand(n, groups, 2, most)
    labels = _flip_labels(labels, num_classes, label_noise_ratio)
    if box_noise_scale > 0:
        boxes = _jitter_boxes(boxes, box_noise_scale)
    content = label_enc(labels) * valid[..., None]
    logits = inverse_sigmoid(boxes, DINO_EPS).masked_fill(~valid[..., None], 0.0)
    # (N, G, 2, T, .) -> (N, G*2T, .)
    return Denoising(content.reshape(n, -1, d_model), logits.reshape(n, -1, 4), groups,
                     2 * most)


def _flip_labels(labels: Tensor, num_classes: int, ratio: float) -> Tensor:
    """Each label replaced by a uniformly random class with probability ratio / 2."""
    if ratio <= 0:
        return labels
    flip = torch.rand(labels.shape, device=labels.device) < ratio * 0.5
    random = torch.randint_like(labels, 0, num_classes)
    return torch.where(flip, random, labels)


def _jitter_boxes(boxes_cxcywh: Tensor, scale: float) -> Tensor:
    """(N, G, 2, T, 4) boxes, [:, :, 0] positive and [:, :, 1] negative copies: every
    corner moved by ``u * size / 2 * scale`` in a random direction, u uniform in [0, 1)
    for positives and [1, 2) for negatives; clamped to the image."""
    corners = box_cxcywh_to_xyxy(boxes_cxcywh)
    wh = boxes_cxcywh[..., 2:]
    half = torch.cat([wh, wh], -1) / 2  # (w/2, h/2) for both corners
    sign = torch.randint(0, 2, corners.shape, device=corners.device).to(corners.dtype) * 2 - 1
    amount = torch.rand_like(corners)
    amount[:, :, 1] += 1.0  # negatives: at least half the size away
    corners = (corners + amount * sign * half * scale).clamp(0.0, 1.0)
    return box_xyxy_to_cxcywh(corners)


def attention_mask(dn: Denoising, num_queries: int, device=None) -> Tensor:
    """(D + Q, D + Q) bool, True where row query may not attend to column query: no
    matching query sees a denoising one, no denoising group sees another."""
    total = dn.num_queries + num_queries
    index = torch.arange(total, device=device)
    # the denoising group of each query, -1 for the matching queries
    group = torch.where(index < dn.num_queries, index // dn.group_size, -1)
    return (group[None, :] >= 0) & (group[:, None] != group[None, :])


def split(tensor: Tensor, dn: Denoising) -> tuple[Tensor, Tensor]:
    """``(denoising rows, matching rows)`` of a (..., D + Q, X) output, on axis -2."""
    return tensor[..., :dn.num_queries, :], tensor[..., dn.num_queries:, :]


def positive_indices(targets: list[dict], groups: int, group_size: int
                     ) -> list[tuple[Tensor, Tensor]]:
    """Per image ``(query rows, target indices)`` of the positive denoising queries, the
    fixed assignment their reconstruction losses use (no matching)."""
    indices = []
    for t in targets:
        device = t["labels"].device
        k = len(t["labels"])
        j = torch.arange(k, device=device)
        # (G, 1) + (1, T_i) -> (G, T_i): target j's positive row in every group
        rows = torch.arange(groups, device=device)[:, None] * group_size + j[None]
        indices.append((rows.flatten(), j.repeat(groups)))
    return indices
