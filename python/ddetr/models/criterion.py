"""``SetCriterion``: the Deformable DETR (sigmoid) and DETR (softmax) training losses.

After Hungarian matching, per output head (the last decoder layer, each earlier layer in
``aux_outputs`` with suffix ``_{i}``, and the two-stage encoder proposals in
``enc_outputs`` with suffix ``_enc``):

- ``loss_ce``: sigmoid focal loss (alpha 0.25, gamma 2) over every query and class, the
  matched (query, class) pairs being the positives, summed and divided by the number of
  target boxes (averaged over processes, at least 1);
- ``loss_bbox``: L1 distance of matched boxes_cxcywh, per box;
- ``loss_giou``: 1 - generalised IoU of matched boxes, per box;

and, logged only (no gradient, last layer): ``class_error`` (percent of matched queries
whose best class is wrong) and ``cardinality_error`` (mean absolute difference between
the number of queries scoring above 0.5 and the number of targets).
Official weights: ``loss_ce`` 2, ``loss_bbox`` 5, ``loss_giou`` 2.

With ``classification="softmax"`` (DETR) the logits have a last "no object" class and
``loss_ce`` is the cross-entropy over the C + 1 classes of every query, unmatched queries
targeting "no object", each query weighted by its target class's weight (1, and
``eos_coef`` = 0.1 for "no object") and the sum divided by the sum of those weights;
``cardinality_error`` counts the queries whose best class is a real one. DETR's
weights: ``loss_ce`` 1, ``loss_bbox`` 5, ``loss_giou`` 2, matching costs class 1, L1 5,
GIoU 2.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from ddetr.models.box_ops import box_cxcywh_to_xyxy, generalized_box_iou
from ddetr.models.matcher import HungarianMatcher, check_classification, matched_indices


def sigmoid_focal_loss(logits: Tensor, targets: Tensor, alpha: float = 0.25,
                       gamma: float = 2.0) -> Tensor:
    """Elementwise focal loss (Lin et al., 2017) of logits against {0, 1} targets:
    ``-alpha_t (1 - p_t)^gamma log(p_t)``, alpha weighting positives (negative alpha:
    no weighting). Same shape as ``logits``."""
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = loss * (alpha * targets + (1 - alpha) * (1 - targets))
    return loss


def global_num_boxes(targets: list[dict], device) -> float:
    """Target boxes per process: the batch's count summed over processes and divided
    by their number (so every rank normalises alike), at least 1."""
    count = torch.tensor(float(sum(len(t["labels"]) for t in targets)), device=device)
    world = 1
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(count)
        world = dist.get_world_size()
    return max(count.item() / world, 1.0)


class SetCriterion(nn.Module):
    """The losses of a Deformable DETR output dict against per-image targets.

    Args:
        num_classes: real classes (the sigmoid model's outputs; the softmax model has
            one more, "no object").
        matcher: a ``HungarianMatcher`` (default: the official costs of the mode).
        weight_dict: loss name -> weight, for the last layer; default
            ``{"loss_ce": 2, "loss_bbox": 5, "loss_giou": 2}`` (softmax: ``loss_ce`` 1),
            repeated for every auxiliary layer (``_{i}``) and the encoder (``_enc``).
        focal_alpha, focal_gamma: the focal loss's parameters (sigmoid).
        classification: ``"sigmoid"`` (focal loss, Deformable DETR) or ``"softmax"``
            (cross-entropy with a "no object" class, DETR).
        eos_coef: the cross-entropy weight of the "no object" class (softmax).

    ``forward(outputs, targets)``: ``outputs`` as ``DeformableDetr`` (or ``Detr``) returns it;
    ``targets`` a list of dicts with ``labels`` (T_i,) int64 in [0, num_classes) and
    ``boxes`` (T_i, 4) boxes_cxcywh normalised. Returns a dict of scalar tensors (every
    loss and the logged errors); ``total(losses)`` is the weighted sum to minimise.
    """

    def __init__(self, num_classes: int, matcher: HungarianMatcher | None = None,
                 weight_dict: dict | None = None, focal_alpha: float = 0.25,
                 focal_gamma: float = 2.0, classification: str = "sigmoid",
                 eos_coef: float = 0.1):
        super().__init__()
        softmax = check_classification(classification) == "softmax"
        if not 0 <= eos_coef <= 1:
            raise ValueError(f"eos_coef: expected a weight in [0, 1], got {eos_coef!r}")
        self.num_classes, self.classification, self.eos_coef = num_classes, classification, eos_coef
        self.matcher = matcher or HungarianMatcher(
            cost_class=1.0 if softmax else 2.0, focal_alpha=focal_alpha,
            focal_gamma=focal_gamma, classification=classification)
        if getattr(self.matcher, "classification", classification) != classification:
            raise ValueError(f"matcher: its classification {self.matcher.classification!r} is "
                             f"not the criterion's {classification!r}")
        self.base_weights = dict(weight_dict or {"loss_ce": 1.0 if softmax else 2.0,
                                                 "loss_bbox": 5.0, "loss_giou": 2.0})
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma

    def weight(self, name: str) -> float:
        """The weight of a loss key such as ``loss_ce``, ``loss_bbox_3`` or
        ``loss_giou_enc`` (0 for logged values)."""
        for base, w in self.base_weights.items():
            if name == base or name.startswith(base + "_"):
                return w
        return 0.0

    def total(self, losses: dict) -> Tensor:
        """The weighted sum of every loss in ``losses``."""
        return sum(self.weight(k) * v for k, v in losses.items() if self.weight(k))

    def forward(self, outputs: dict, targets: list[dict]) -> dict:
        self._check_targets(targets)
        self._check_logits(outputs["pred_logits"])
        num_boxes = global_num_boxes(targets, outputs["pred_logits"].device)
        indices = self.matcher(outputs, targets)
        losses = self.head_losses(outputs, targets, indices, num_boxes)
        losses.update(self.logged_errors(outputs, targets, indices))
        for i, aux in enumerate(outputs.get("aux_outputs", [])):
            aux_losses = self.head_losses(aux, targets, self.matcher(aux, targets), num_boxes)
            losses.update({f"{k}_{i}": v for k, v in aux_losses.items()})
        if "enc_outputs" in outputs:
            enc = outputs["enc_outputs"]
            # proposals are class-agnostic: every target counts as class 0
            binary = [{**t, "labels": torch.zeros_like(t["labels"])} for t in targets]
            enc_losses = self.head_losses(enc, binary, self.matcher(enc, binary), num_boxes)
            losses.update({f"{k}_enc": v for k, v in enc_losses.items()})
        return losses

    def head_losses(self, outputs: dict, targets: list[dict], indices, num_boxes: float) -> dict:
        """``loss_ce``, ``loss_bbox`` and ``loss_giou`` of one output head."""
        logits = outputs["pred_logits"].float()
        batch, query = matched_indices(indices)
        labels = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices)]).to(logits.device)
        at = (batch.to(logits.device), query.to(logits.device))
        if self.classification == "softmax":
            loss_ce = self.softmax_class_loss(logits, *at, labels)
        else:
            onehot = torch.zeros_like(logits)
            onehot[at + (labels,)] = 1.0
            loss_ce = sigmoid_focal_loss(logits, onehot, self.focal_alpha,
                                         self.focal_gamma).sum() / num_boxes
        src = outputs["pred_boxes"].float()[batch, query]
        tgt = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, indices)]).to(src)
        loss_bbox = F.l1_loss(src, tgt, reduction="sum") / num_boxes
        giou = torch.diag(generalized_box_iou(box_cxcywh_to_xyxy(src), box_cxcywh_to_xyxy(tgt)))
        loss_giou = (1 - giou).sum() / num_boxes
        return {"loss_ce": loss_ce, "loss_bbox": loss_bbox, "loss_giou": loss_giou}

    def softmax_class_loss(self, logits: Tensor, batch: Tensor, query: Tensor,
                           labels: Tensor) -> Tensor:
        """Weighted cross-entropy of (N, Q, C + 1) logits: the matched (batch, query)
        pairs target ``labels``, every other query the last class, "no object"."""
        target = torch.full(logits.shape[:2], self.num_classes, dtype=torch.int64,
                            device=logits.device)
        target[batch, query] = labels
        weight = torch.ones(self.num_classes + 1, device=logits.device)
        weight[-1] = self.eos_coef
        # (N, Q, C + 1) -> (N, C + 1, Q): cross_entropy takes the classes on axis 1
        return F.cross_entropy(logits.transpose(1, 2), target, weight)

    @torch.no_grad()
    def logged_errors(self, outputs: dict, targets: list[dict], indices) -> dict:
        logits = outputs["pred_logits"].float()
        batch, query = matched_indices(indices)
        labels = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices)]).to(logits.device)
        if len(labels):
            correct = (logits[batch, query].argmax(-1) == labels).float().mean()
            class_error = 100.0 * (1 - correct)
        else:
            class_error = logits.new_zeros(())
        if self.classification == "softmax":
            predicted = (logits.argmax(-1) != logits.shape[-1] - 1).sum(1).float()
        else:
            predicted = (logits.sigmoid().max(-1).values > 0.5).sum(1).float()
        counts = torch.tensor([float(len(t["labels"])) for t in targets], device=logits.device)
        return {"class_error": class_error, "cardinality_error": (predicted - counts).abs().mean()}

    def _check_logits(self, logits: Tensor) -> None:
        expected = self.num_classes + (self.classification == "softmax")
        if logits.shape[-1] != expected:
            raise ValueError(f"outputs: pred_logits has {logits.shape[-1]} classes, "
                             f"{self.classification} classification of num_classes="
                             f"{self.num_classes} expects {expected}")

    def _check_targets(self, targets: list[dict]) -> None:
        for i, t in enumerate(targets):
            labels = t["labels"]
            if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
                raise ValueError(f"targets: image {i} has a label outside [0, {self.num_classes}): "
                                 f"{labels.tolist()}")
            if t["boxes"].shape != (len(labels), 4):
                raise ValueError(f"targets: image {i} has boxes of shape {tuple(t['boxes'].shape)} "
                                 f"for {len(labels)} labels")
