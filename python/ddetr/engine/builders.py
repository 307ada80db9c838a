"""Turning a ``TrainConfig`` into datasets, loaders, the model and the criterion.

Each builder takes the few settings it needs, so scripts can call them directly.
"""

from __future__ import annotations

import logging
import os

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from ddetr.data import synthetic
from ddetr.data.coco import CocoDetection
from ddetr.data.collate import collate_fn
from ddetr.data.transforms import train_transforms, val_transforms
from ddetr.models import DeformableDetr, Detr, DinoCriterion
from ddetr.models.backbone import FrozenBatchNorm2d
from ddetr.models.criterion import SetCriterion
from ddetr.models.matcher import HungarianMatcher
from ddetr.models.postprocess import PostProcess, SoftmaxPostProcess, classification_of

logger = logging.getLogger(__name__)

# TrainConfig.arch: DeformableDetr, DINO (DeformableDetr(variant="dino")), or the DETR
# baseline (Detr)
ARCHS = ("deformable-detr", "dino", "detr")

# Backbone names beyond DeformableDetr's own: narrow ResNets for CPU training from scratch.
EXTRA_BACKBONES = {
    "resnet18-tiny": {"block": "basic", "depths": [2, 2, 2, 2], "widths": [32, 64, 128, 256],
                      "stem_width": 32},
    # bottleneck blocks (so DC5 can dilate its last stage), of about the same cost
    "resnet26-tiny": {"block": "bottleneck", "depths": [2, 2, 2, 2],
                      "widths": [64, 128, 256, 512], "stem_width": 32},
}


def dataset_paths(config) -> dict:
    """``{"train_images", "train_annotations", "val_images", "val_annotations"}`` from
    explicit paths, ``coco_path`` (the official layout) or the synthetic dataset (which
    is generated on first use)."""
    paths = {}
    if config.uses_synthetic():
        root = config.cache_dir or synthetic.default_cache_dir(config.seed)
        synthetic.ensure_dataset(root, synthetic_config(config), progress=config.progress)
        for split in ("train", "val"):
            paths[f"{split}_images"] = os.path.join(root, split)
            paths[f"{split}_annotations"] = os.path.join(root, "annotations", f"instances_{split}.json")
    elif config.coco_path:
        for split in ("train", "val"):
            paths[f"{split}_images"] = os.path.join(config.coco_path, f"{split}2017")
            paths[f"{split}_annotations"] = os.path.join(config.coco_path, "annotations",
                                                         f"instances_{split}2017.json")
    for key in ("train_images", "train_annotations", "val_images", "val_annotations"):
        if getattr(config, key):
            paths[key] = getattr(config, key)
    return paths


def synthetic_config(config) -> synthetic.SyntheticConfig:
    return synthetic.SyntheticConfig(seed=config.seed, num_train=config.synthetic_train,
                                     num_val=config.synthetic_val, image_size=config.synthetic_size,
                                     num_classes=config.synthetic_classes)


def build_datasets(paths: dict, num_classes: int | None, base_size: int, max_size: int):
    """``(train, val)`` ``CocoDetection`` datasets with the official transforms (val is
    None without validation paths)."""
    train = CocoDetection(paths["train_images"], paths["train_annotations"],
                          train_transforms(base_size, max_size), num_classes)
    val = None
    if paths.get("val_annotations"):
        val = CocoDetection(paths["val_images"], paths["val_annotations"],
                            val_transforms(base_size, max_size), num_classes)
    return train, val


def infer_num_classes(dataset: CocoDetection) -> int:
    """Largest category id + 1 (category ids are used as labels, as the official code)."""
    return max(dataset.coco.cats) + 1 if dataset.coco.cats else 1


def train_loader(dataset: Dataset, batch_size: int, seed: int, num_workers: int, rank: int = 0,
                 world_size: int = 1) -> DataLoader:
    """Shuffled per epoch from ``seed`` (call ``loader.sampler.set_epoch``), this
    process's share, incomplete last batch dropped."""
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True,
                                 seed=seed)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=True,
                      collate_fn=collate_fn, num_workers=num_workers)


def eval_loader(dataset: Dataset, batch_size: int, num_workers: int, rank: int = 0,
                world_size: int = 1) -> DataLoader:
    """Every ``world_size``-th image from ``rank`` (no image twice), in order."""
    subset = torch.utils.data.Subset(dataset, range(rank, len(dataset), world_size))
    return DataLoader(subset, batch_size=batch_size, shuffle=False, collate_fn=collate_fn,
                      num_workers=num_workers)


def build_model(config, num_classes: int) -> DeformableDetr | Detr:
    """The detector for a ``TrainConfig`` (``arch``: ``DeformableDetr``, its DINO variant, or
    ``Detr``). The
    backbone is trained unless lr_backbone is 0; one trained from scratch (no
    backbone_weights) also trains its stem and first stage; ``backbone_norm="batch"``
    trains its batch norms (batch statistics) instead of keeping them frozen."""
    backbone = EXTRA_BACKBONES.get(config.backbone, config.backbone)
    if check_arch(config.arch) == "detr":
        model = _detr(config, num_classes, backbone)
    else:
        model = _deformable_detr(config, num_classes, backbone)
    if config.backbone_weights is None and config.lr_backbone > 0:
        model.backbone[0].body.requires_grad_(True)
    if config.backbone_norm == "batch":
        unfreeze_batch_norm(model.backbone[0].body)
    elif config.backbone_norm != "frozen":
        raise ValueError(f"backbone_norm: expected 'frozen' or 'batch', got {config.backbone_norm!r}")
    return model


def check_arch(arch: str) -> str:
    """``arch`` if it names a detector of ``ARCHS``, else ValueError."""
    if arch not in ARCHS:
        raise ValueError(f"arch: expected one of {', '.join(ARCHS)}, got {arch!r}")
    return arch


def _detr(config, num_classes: int, backbone) -> Detr:
    return Detr(
        num_classes=num_classes, num_queries=config.num_queries, backbone=backbone,
        backbone_weights=config.backbone_weights, d_model=config.d_model,
        num_heads=config.num_heads, num_encoder_layers=config.enc_layers,
        num_decoder_layers=config.dec_layers, dim_feedforward=config.dim_feedforward,
        dropout=config.dropout, dilation=config.dilation, aux_loss=config.aux_loss,
        train_backbone=config.lr_backbone > 0)


def _deformable_detr(config, num_classes: int, backbone) -> DeformableDetr:
    return DeformableDetr(
        num_classes=num_classes, num_queries=config.num_queries,
        num_feature_levels=config.num_feature_levels, with_box_refine=config.with_box_refine,
        two_stage=config.two_stage, backbone=backbone, backbone_weights=config.backbone_weights,
        dilation=config.dilation,
        d_model=config.d_model, num_heads=config.num_heads, num_encoder_layers=config.enc_layers,
        num_decoder_layers=config.dec_layers, dim_feedforward=config.dim_feedforward,
        dropout=config.dropout, enc_num_points=config.enc_n_points,
        dec_num_points=config.dec_n_points, two_stage_num_proposals=config.num_queries,
        aux_loss=config.aux_loss, train_backbone=config.lr_backbone > 0,
        native_layers=None if config.native_layers else False,  # None: when built
        recompute_activations=config.recompute_activations, **_variant(config))


def _variant(config) -> dict:
    """DeformableDetr's variant arguments for ``arch``."""
    if config.arch != "dino":
        return {}
    return dict(variant="dino", dn_number=config.dn_number,
                dn_label_noise_ratio=config.dn_label_noise_ratio,
                dn_box_noise_scale=config.dn_box_noise_scale)


def unfreeze_batch_norm(module: nn.Module) -> None:
    """Replaces every ``FrozenBatchNorm2d`` under ``module`` by a trainable
    ``BatchNorm2d`` holding the same statistics and affine terms. In eval mode it computes
    what the frozen norm computes, and its state dict has the same keys, so the
    checkpoint loads into the standard model."""
    for name, child in module.named_children():
        if isinstance(child, FrozenBatchNorm2d):
            norm = nn.BatchNorm2d(child.weight.numel(), eps=child.eps)
            norm.register_buffer("num_batches_tracked", None)  # unused with a set momentum
            with torch.no_grad():
                for key in ("weight", "bias", "running_mean", "running_var"):
                    getattr(norm, key).copy_(getattr(child, key))
            setattr(module, name, norm)
        else:
            unfreeze_batch_norm(child)


def build_criterion(config, num_classes: int) -> SetCriterion:
    """The losses of ``arch``: focal (deformable-detr; dino, with its denoising and
    proposal terms: ``DinoCriterion``) or softmax with ``eos_coef`` (detr), with the
    config's matching costs and loss weights."""
    classification = "softmax" if check_arch(config.arch) == "detr" else "sigmoid"
    matcher = HungarianMatcher(config.set_cost_class, config.set_cost_bbox, config.set_cost_giou,
                               focal_alpha=config.focal_alpha, classification=classification)
    weights = {"loss_ce": config.cls_loss_coef, "loss_bbox": config.bbox_loss_coef,
               "loss_giou": config.giou_loss_coef}
    if config.arch == "dino":
        return DinoCriterion(num_classes, matcher, weights, focal_alpha=config.focal_alpha)
    return SetCriterion(num_classes, matcher, weights, focal_alpha=config.focal_alpha,
                        classification=classification, eos_coef=config.eos_coef)


def build_postprocess(model: nn.Module) -> nn.Module:
    """The post-processing of ``model`` (or of the model a DDP wrapper holds): per-query
    softmax scores for a softmax classifier (``Detr``), else the official top-100."""
    if classification_of(model) == "softmax":
        return SoftmaxPostProcess()
    return PostProcess()
