"""Recovery after compression: a short distillation from the uncompressed model.

The teacher (the original model) labels the training images once: its detections with a
score of at least ``score_threshold`` become the boxes of a COCO annotation file
(``pseudo_labels``). The compressed student then trains on those images with those boxes
(``distill``: the official set criterion, Hungarian matching, the training augmentations
applied to the teacher's boxes as to ground truth). No ground truth is read, so the
recovery works on unlabelled images too.
"""

from __future__ import annotations

import copy
import json
import logging
import os

import torch

from ddetr.engine import builders
from ddetr.engine.config import TrainConfig
from ddetr.engine.evaluate import finite_records, predict_dataset
from ddetr.engine.optim import build_optimizer
from ddetr.engine.train import train_one_epoch
from ddetr.models.box_ops import box_iou
from ddetr.models.deformable_detr import DeformableDetr

logger = logging.getLogger(__name__)

# techniques whose models cannot be trained: finetune before applying them
UNTRAINABLE = ("to_bfloat16", "to_int8")


def pseudo_labels(teacher: DeformableDetr, dataset, score_threshold: float = 0.3,
                  batch_size: int = 8, device=None, progress: bool = True) -> dict:
    """A COCO annotation dict for ``dataset``'s images (a ``CocoDetection`` at the
    teacher's input size, validation transforms) whose annotations are the teacher's
    detections scoring at least ``score_threshold`` (boxes in the images' pixels)."""
    if not 0 < score_threshold < 1:
        raise ValueError(f"score_threshold: expected a score in (0, 1), got {score_threshold!r}")
    device = device or next(teacher.parameters()).device
    loader = builders.eval_loader(dataset, batch_size, 0)
    records, _ = predict_dataset(teacher, loader, device, progress=progress)
    kept = _deduplicate([r for r in finite_records(records) if r["score"] >= score_threshold])
    source = dataset.coco.dataset
    annotations = [{"id": i + 1, "image_id": r["image_id"], "category_id": r["category_id"],
                    "bbox": r["bbox"], "area": r["bbox"][2] * r["bbox"][3], "iscrowd": 0}
                   for i, r in enumerate(kept) if r["bbox"][2] > 0 and r["bbox"][3] > 0]
    return {"images": source["images"], "categories": source["categories"],
            "annotations": annotations}


def _deduplicate(records: list[dict], iou: float = 0.7) -> list[dict]:
    """Per image and class, drops a detection overlapping a higher-scoring one by more
    than ``iou`` (the teacher's duplicates would otherwise train the student to repeat
    them)."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["image_id"], r["category_id"]), []).append(r)
    kept = []
    for group in groups.values():
        group.sort(key=lambda r: -r["score"])
        # (n, 4) xywh -> xyxy
        xywh = torch.tensor([r["bbox"] for r in group], dtype=torch.float64)
        boxes_xyxy = torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1)
        overlaps = box_iou(boxes_xyxy, boxes_xyxy)[0]
        chosen: list[int] = []
        for i in range(len(group)):
            if all(overlaps[i, j] <= iou for j in chosen):
                chosen.append(i)
        kept += [group[i] for i in chosen]
    return kept


def write_labels(labels: dict, path: str) -> str:
    """Writes ``pseudo_labels``' dict as a COCO JSON file; returns ``path``."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(labels, f)
    return path


def _check_student(student) -> None:
    if not isinstance(student, DeformableDetr):
        raise ValueError(f"student: expected a ddetr DeformableDetr, got {type(student).__name__}")
    done = [r["technique"] for r in student.compression if r["technique"] in UNTRAINABLE]
    if done:
        raise ValueError(f"student: a model after {', '.join(done)} cannot be trained; "
                         f"finetune before applying them")


def distill(student: DeformableDetr, train_dataset, epochs: int, lr: float = 1e-4,
            batch_size: int = 8, device=None, progress: bool = True,
            train_config: dict | None = None, seed: int = 0,
            train_backbone: bool = False) -> DeformableDetr:
    """A copy of ``student`` trained ``epochs`` epochs on ``train_dataset`` (a
    ``CocoDetection`` with training transforms at the student's input size, whose
    annotations are ``pseudo_labels`` of the teacher), in eval mode. ``lr``: the
    transformer's (the backbone's is the same, the sampling offsets' a tenth, as in
    training); ``train_config``: the original run's ``TrainConfig`` fields, for the
    matching costs and loss weights (default: ddetr train's); ``train_backbone``: also
    train the backbone (by default it stays as it is: the techniques change the
    transformer, and a frozen backbone needs no backward)."""
    _check_student(student)
    if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 1:
        raise ValueError(f"epochs: expected a positive int, got {epochs!r}")
    if not lr > 0:
        raise ValueError(f"lr: expected a positive learning rate, got {lr!r}")
    known = set(TrainConfig.__dataclass_fields__)
    config = TrainConfig(**{k: v for k, v in (train_config or {}).items() if k in known})
    device = device or next(student.parameters()).device
    model = copy.deepcopy(student).to(device)
    model.compression = [*student.compression, {"technique": "distill", "epochs": epochs, "lr": lr}]
    if not train_backbone:
        model.backbone.requires_grad_(False)
    torch.manual_seed(seed)
    criterion = builders.build_criterion(config, model.config["num_classes"])
    optimizer, _ = build_optimizer(model, lr, lr, config.lr_linear_proj_mult, config.weight_decay)
    loader = builders.train_loader(train_dataset, min(batch_size, len(train_dataset)), seed, 0)
    for epoch in range(epochs):
        loader.sampler.set_epoch(epoch)
        stats = train_one_epoch(model, criterion, loader, optimizer, device, epoch,
                                config.clip_max_norm, progress=progress)
        logger.info("distillation epoch %d: loss %.4f", epoch, stats.get("loss", float("nan")))
    return model.eval()
