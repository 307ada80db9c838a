"""Box format conversions, areas, IoU and generalised IoU, and the clamped logit
used by the box heads."""

from __future__ import annotations

import torch
from torch import Tensor


def inverse_sigmoid(x: Tensor, eps: float = 1e-5) -> Tensor:
    """log(x / (1 - x)) with x clamped to [0, 1] and both terms to at least ``eps``
    (the official helper: finite for boxes at 0 or 1)."""
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def box_cxcywh_to_xyxy(boxes_cxcywh: Tensor) -> Tensor:
    """(..., 4) (cx, cy, w, h) -> (..., 4) (x0, y0, x1, y1), same units."""
    cx, cy, w, h = boxes_cxcywh.unbind(-1)
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)


def box_xyxy_to_cxcywh(boxes_xyxy: Tensor) -> Tensor:
    """(..., 4) (x0, y0, x1, y1) -> (..., 4) (cx, cy, w, h), same units."""
    x0, y0, x1, y1 = boxes_xyxy.unbind(-1)
    return torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dim=-1)


def box_area(boxes_xyxy: Tensor) -> Tensor:
    """(..., 4) boxes_xyxy -> (...) areas."""
    return (boxes_xyxy[..., 2] - boxes_xyxy[..., 0]) * (boxes_xyxy[..., 3] - boxes_xyxy[..., 1])


def check_boxes_xyxy(boxes_xyxy: Tensor, name: str = "boxes_xyxy") -> None:
    """Raises ValueError naming ``name`` and the first offending row when a box has
    x1 < x0 or y1 < y0 (a degenerate box would make GIoU meaningless), or is not finite."""
    bad = ~torch.isfinite(boxes_xyxy).all(-1)
    bad |= (boxes_xyxy[..., 2] < boxes_xyxy[..., 0]) | (boxes_xyxy[..., 3] < boxes_xyxy[..., 1])
    if bad.any():
        row = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(f"{name}: box {row} = {boxes_xyxy[row].tolist()} is degenerate "
                         f"(expects x1 >= x0, y1 >= y0 and finite values)")


def box_iou(boxes1_xyxy: Tensor, boxes2_xyxy: Tensor) -> tuple[Tensor, Tensor]:
    """Pairwise IoU of (A, 4) and (B, 4) boxes_xyxy: returns ``(iou (A, B), union (A, B))``."""
    area1, area2 = box_area(boxes1_xyxy), box_area(boxes2_xyxy)
    # (A, 1, 2) against (1, B, 2) -> (A, B, 2) corners of the intersections
    top_left = torch.max(boxes1_xyxy[:, None, :2], boxes2_xyxy[None, :, :2])
    bottom_right = torch.min(boxes1_xyxy[:, None, 2:], boxes2_xyxy[None, :, 2:])
    wh = (bottom_right - top_left).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area1[:, None] + area2[None, :] - inter
    return inter / union, union


def generalized_box_iou(boxes1_xyxy: Tensor, boxes2_xyxy: Tensor) -> Tensor:
    """Pairwise generalised IoU (Rezatofighi et al., 2019) of (A, 4) and (B, 4)
    boxes_xyxy -> (A, B), in [-1, 1]. Degenerate boxes raise ValueError."""
    check_boxes_xyxy(boxes1_xyxy, "boxes1_xyxy")
    check_boxes_xyxy(boxes2_xyxy, "boxes2_xyxy")
    iou, union = box_iou(boxes1_xyxy, boxes2_xyxy)
    # the smallest box enclosing both: (A, B, 2) corners
    top_left = torch.min(boxes1_xyxy[:, None, :2], boxes2_xyxy[None, :, :2])
    bottom_right = torch.max(boxes1_xyxy[:, None, 2:], boxes2_xyxy[None, :, 2:])
    wh = (bottom_right - top_left).clamp(min=0)
    enclosing = wh[..., 0] * wh[..., 1]
    return iou - (enclosing - union) / enclosing
