"""Detections from raw model outputs: the official top-k over sigmoid scores (Deformable
DETR, ``PostProcess``), or one detection per query from softmax scores (DETR,
``SoftmaxPostProcess``)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ddetr.models.box_ops import box_cxcywh_to_xyxy


class _Detections(nn.Module):
    """``forward`` as a list of per-image dicts of what ``batched`` returns as tensors."""

    @torch.no_grad()
    def forward(self, outputs: dict, target_sizes) -> list[dict]:
        found = self.batched(outputs, target_sizes)
        return [{"scores": s, "labels": lb, "boxes": b}
                for s, lb, b in zip(found["scores"], found["labels"], found["boxes"])]


class PostProcess(_Detections):
    """Turns ``{"pred_logits", "pred_boxes"}`` into per-image detections.

    The top ``num_select`` (default 100) (query, class) pairs by sigmoid score over all
    queries and classes, as the official ``PostProcess``; a query may appear with several
    labels.

    ``forward(outputs, target_sizes)``: ``target_sizes`` (N, 2) is each image's (height,
    width) in pixels. Returns a list of N dicts: ``scores`` (K,), ``labels`` (K,) int64,
    ``boxes`` (K, 4) boxes_xyxy in pixels of that size, K = min(num_select, Q * classes).
    """

    def __init__(self, num_select: int = 100):
        super().__init__()
        self.num_select = num_select

    def batched(self, outputs: dict, target_sizes) -> dict:
        """The same detections as (N, K) ``scores``, (N, K) ``labels`` and (N, K, 4)
        ``boxes`` tensors (what an exported graph returns)."""
        logits, boxes_cxcywh = outputs["pred_logits"], outputs["pred_boxes"]
        n, q, c = logits.shape
        target_sizes = _check_sizes(target_sizes, n, logits.device)
        k = min(self.num_select, q * c)
        # (N, Q, C) -> (N, Q*C): index = query * C + class
        scores, index = torch.topk(logits.sigmoid().view(n, -1), k, dim=1)
        queries, labels = index // c, index % c
        boxes_xyxy = box_cxcywh_to_xyxy(boxes_cxcywh)
        boxes_xyxy = torch.gather(boxes_xyxy, 1, queries[..., None].expand(-1, -1, 4))
        return {"scores": scores, "labels": labels, "boxes": _to_pixels(boxes_xyxy, target_sizes)}


class SoftmaxPostProcess(_Detections):
    """Per-image detections of a softmax classifier whose last class is "no object"
    (DETR): every query is one detection, scored by its most probable real class (the
    softmax taken over all classes, "no object" included, then left out of the max).

    ``forward(outputs, target_sizes)``: ``outputs["pred_logits"]`` (N, Q, C + 1),
    ``outputs["pred_boxes"]`` (N, Q, 4) boxes_cxcywh; ``target_sizes`` (N, 2) each image's
    (height, width) in pixels. Returns a list of N dicts: ``scores`` (Q,), ``labels``
    (Q,) int64 in [0, C), ``boxes`` (Q, 4) boxes_xyxy in pixels of that size.
    """

    def batched(self, outputs: dict, target_sizes) -> dict:
        """The same detections as (N, Q) ``scores``, (N, Q) ``labels`` and (N, Q, 4)
        ``boxes`` tensors."""
        logits, boxes_cxcywh = outputs["pred_logits"], outputs["pred_boxes"]
        if logits.dim() != 3 or logits.shape[-1] < 2:
            raise ValueError(f"outputs: pred_logits must be (N, Q, C + 1) with C >= 1 real "
                             f"classes, got {tuple(logits.shape)}")
        target_sizes = _check_sizes(target_sizes, logits.shape[0], logits.device)
        scores, labels = query_scores(logits, "softmax")
        return {"scores": scores, "labels": labels,
                "boxes": _to_pixels(box_cxcywh_to_xyxy(boxes_cxcywh), target_sizes)}


def classification_of(model: nn.Module) -> str:
    """How ``model``'s logits are read (a DDP wrapper's model too): ``"softmax"`` with a
    last "no object" class (``Detr``), else ``"sigmoid"``."""
    return getattr(getattr(model, "module", model), "classification", "sigmoid")


def query_scores(logits: Tensor, classification: str) -> tuple[Tensor, Tensor]:
    """(..., Q, classes) logits -> each query's best real class: its (..., Q) score and
    label (softmax: over every class, "no object" included, then left out of the max)."""
    if classification == "softmax":
        return logits.softmax(-1)[..., :-1].max(-1)
    return logits.sigmoid().max(-1)


def _check_sizes(target_sizes, n: int, device) -> Tensor:
    """``target_sizes`` as an (N, 2) tensor on ``device``; ValueError for another shape."""
    target_sizes = torch.as_tensor(target_sizes, device=device)
    if target_sizes.dim() != 2 or target_sizes.shape[1] != 2 or (
            not torch.compiler.is_exporting() and target_sizes.shape[0] != n):
        raise ValueError(f"target_sizes: expected ({n}, 2) (height, width), "
                         f"got {tuple(target_sizes.shape)}")
    return target_sizes


def _to_pixels(boxes_xyxy: Tensor, target_sizes: Tensor) -> Tensor:
    """(N, K, 4) normalised boxes_xyxy -> the same in pixels of each (height, width)."""
    h, w = target_sizes.to(boxes_xyxy.dtype).unbind(1)
    # (N, 4) per-image (w, h, w, h) -> (N, 1, 4)
    scale = torch.stack([w, h, w, h], dim=1)[:, None, :]
    return boxes_xyxy * scale
