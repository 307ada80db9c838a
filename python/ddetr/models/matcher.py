"""``HungarianMatcher``: the one-to-one assignment of predictions to ground truth.

The cost of pairing query q with target t is (official weights in brackets)
``cost_class [2] * focal(q, label_t) + cost_bbox [5] * L1(box_q, box_t)
- cost_giou [2] * GIoU(box_q, box_t)``, where the focal class cost is
``alpha (1-p)^gamma (-log p) - (1-alpha) p^gamma (-log(1-p))`` with p the sigmoid score
of the target's class. With ``classification="softmax"`` (DETR: weights class 1, L1 5,
GIoU 2) the class cost is instead ``-softmax(logits)[label_t]``, the softmax taken over
the C real classes and the last "no object" class. Boxes are boxes_cxcywh normalised to [0, 1]; GIoU is taken on
their xyxy form. ``scipy.optimize.linear_sum_assignment`` solves each image.
"""

from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from ddetr.models.box_ops import box_cxcywh_to_xyxy, generalized_box_iou


class HungarianMatcher(nn.Module):
    """Matches each image's targets to distinct queries at minimum total cost.

    Args:
        cost_class, cost_bbox, cost_giou: weights of the focal class cost, the L1 box
            distance and the negative generalised IoU.
        focal_alpha, focal_gamma: the focal class cost's parameters.
        classification: ``"sigmoid"`` (focal class cost, Deformable DETR) or
            ``"softmax"`` (negative probability of the target class, DETR).

    ``forward(outputs, targets)``: ``outputs["pred_logits"]`` (N, Q, C) (sigmoid) or
    (N, Q, C + 1) (softmax),
    ``outputs["pred_boxes"]`` (N, Q, 4) boxes_cxcywh; ``targets`` a list of N dicts with
    ``labels`` (T_i,) int64 and ``boxes`` (T_i, 4) boxes_cxcywh. Returns a list of N
    ``(query_index, target_index)`` int64 tensor pairs of length min(Q, T_i), sorted by
    query; an image with no targets gets two empty tensors.
    """

    def __init__(self, cost_class: float = 2.0, cost_bbox: float = 5.0, cost_giou: float = 2.0,
                 focal_alpha: float = 0.25, focal_gamma: float = 2.0,
                 classification: str = "sigmoid"):
        super().__init__()
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("cost_class, cost_bbox, cost_giou: at least one must be non-zero")
        self.classification = check_classification(classification)
        self.cost_class, self.cost_bbox, self.cost_giou = cost_class, cost_bbox, cost_giou
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma

    @torch.no_grad()
    def forward(self, outputs: dict, targets: list[dict]) -> list[tuple[Tensor, Tensor]]:
        logits, boxes_cxcywh = outputs["pred_logits"], outputs["pred_boxes"]
        if len(targets) != logits.shape[0]:
            raise ValueError(f"targets: expected {logits.shape[0]} dicts (one per image), "
                             f"got {len(targets)}")
        sizes = [len(t["labels"]) for t in targets]
        if sum(sizes) == 0:
            return [_empty_pair() for _ in targets]
        n, q = logits.shape[:2]
        labels = torch.cat([t["labels"] for t in targets]).to(logits.device)
        tgt_boxes = torch.cat([t["boxes"] for t in targets]).to(boxes_cxcywh)
        # every query of the batch against every target of the batch: (N*Q, T)
        cost = self.cost_matrix(logits.flatten(0, 1).float(), boxes_cxcywh.flatten(0, 1).float(),
                                labels, tgt_boxes.float())
        cost = cost.view(n, q, -1).cpu()
        pairs = []
        for i, block in enumerate(cost.split(sizes, -1)):
            rows, cols = linear_sum_assignment(block[i].numpy())
            pairs.append((torch.as_tensor(rows, dtype=torch.int64),
                          torch.as_tensor(cols, dtype=torch.int64)))
        return pairs

    def cost_matrix(self, logits: Tensor, boxes_cxcywh: Tensor, labels: Tensor,
                    tgt_boxes_cxcywh: Tensor) -> Tensor:
        """(P, C) logits (P, C + 1 with softmax) and (P, 4) boxes against T targets
        -> (P, T) matching cost."""
        l1 = torch.cdist(boxes_cxcywh, tgt_boxes_cxcywh, p=1)
        giou = generalized_box_iou(box_cxcywh_to_xyxy(boxes_cxcywh),
                                   box_cxcywh_to_xyxy(tgt_boxes_cxcywh))
        return self.cost_class * self.class_cost(logits, labels) + self.cost_bbox * l1 \
            - self.cost_giou * giou

    def class_cost(self, logits: Tensor, labels: Tensor) -> Tensor:
        """(P, C) or (P, C + 1) logits against T target labels -> (P, T) class cost."""
        if self.classification == "softmax":
            return -logits.softmax(-1)[:, labels]
        prob = logits.sigmoid()[:, labels]
        alpha, gamma = self.focal_alpha, self.focal_gamma
        pos = alpha * (1 - prob) ** gamma * -(prob + 1e-8).log()
        neg = (1 - alpha) * prob ** gamma * -(1 - prob + 1e-8).log()
        return pos - neg


def check_classification(classification: str) -> str:
    """``classification`` if it is ``"sigmoid"`` or ``"softmax"``, else ValueError."""
    if classification not in ("sigmoid", "softmax"):
        raise ValueError(f"classification: expected 'sigmoid' or 'softmax', got {classification!r}")
    return classification


def _empty_pair() -> tuple[Tensor, Tensor]:
    return torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.int64)


def matched_indices(indices: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """``(batch_index, query_index)`` of every matched prediction, concatenated."""
    batch = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
    return batch, torch.cat([src for src, _ in indices])

