"""``Dino``: DINO (Zhang et al., "DINO: DETR with Improved DeNoising Anchor Boxes for
End-to-End Object Detection", ICLR 2023) with its recipe's defaults, and
``DinoCriterion``, its training losses.

DINO is ``DeformableDetr(variant="dino")``: one code path with Deformable DETR (backbone,
input projections, encoder, decoder layers, native layers and MSDA kernels), DINO's
transformer (``ddetr.models.dino_transformer``) and its denoising queries
(``ddetr.models.denoising``). ``Dino(...)`` is that model with DINO-4scale's defaults:
900 queries, FFN 2048, no dropout, 100 denoising queries, label noise 0.5, box noise 1.0.
A model saved by ``save_pretrained`` or ``ddetr train`` comes back as a
``DeformableDetr`` whose ``variant`` is ``"dino"``: the same model.
"""

from __future__ import annotations

import torch

from ddetr.models.criterion import SetCriterion, global_num_boxes
from ddetr.models.deformable_detr import DeformableDetr
from ddetr.models.denoising import positive_indices

# DINO-4scale (IDEA-Research/DINO config/DINO/DINO_4scale.py) beyond DeformableDetr's
# defaults
DINO_DEFAULTS = dict(num_queries=900, two_stage_num_proposals=900, with_box_refine=True,
                     two_stage=True, dim_feedforward=2048, dropout=0.0, variant="dino",
                     dn_number=100, dn_label_noise_ratio=0.5, dn_box_noise_scale=1.0)

_HEAD_LOSSES = ("loss_ce", "loss_bbox", "loss_giou")


class Dino(DeformableDetr):
    """``DeformableDetr(variant="dino", ...)`` with DINO-4scale's defaults (see
    ``DINO_DEFAULTS``); every argument of ``DeformableDetr`` may be given. In training,
    call ``model(images, mask, targets)`` so that the denoising queries are built."""

    def __init__(self, num_classes: int = 91, **kwargs):
        super().__init__(num_classes=num_classes, **{**DINO_DEFAULTS, **kwargs})


class DinoCriterion(SetCriterion):
    """``SetCriterion`` (focal loss, Hungarian matching) plus DINO's extra terms:

    - ``_interm``: the selected encoder proposals (``interm_outputs``), matched against
      the targets with their real classes;
    - ``_dn`` (last layer) and ``_dn_{i}`` (earlier layers): the denoising queries'
      reconstruction, every positive row assigned its own target (no matching), the
      focal loss over all denoising rows (negatives and padding learn "no object"),
      normalised by the target count times the number of groups. Zero when the
      outputs have no denoising queries (eval, or no targets), so every step logs the
      same keys.

    Weights are the head losses' (``weight_dict``) for every suffix; DINO's recipe is
    ``loss_ce`` 1, ``loss_bbox`` 5, ``loss_giou`` 2.
    """

    def __init__(self, num_classes: int, matcher=None, weight_dict: dict | None = None,
                 focal_alpha: float = 0.25, focal_gamma: float = 2.0):
        weights = weight_dict or {"loss_ce": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0}
        super().__init__(num_classes, matcher, weights, focal_alpha, focal_gamma)

    def forward(self, outputs: dict, targets: list[dict]) -> dict:
        losses = super().forward(outputs, targets)
        num_boxes = global_num_boxes(targets, outputs["pred_logits"].device)
        if "interm_outputs" in outputs:
            interm = outputs["interm_outputs"]
            found = self.head_losses(interm, targets, self.matcher(interm, targets), num_boxes)
            losses.update({f"{k}_interm": v for k, v in found.items()})
        layers = 1 + len(outputs.get("aux_outputs", []))
        losses.update(self.denoising_losses(outputs.get("dn_outputs"), targets, num_boxes,
                                            layers, outputs["pred_logits"].new_zeros(())))
        return losses

    def denoising_losses(self, dn: dict | None, targets: list[dict], num_boxes: float,
                         layers: int, zero: torch.Tensor) -> dict:
        """``loss_*_dn`` for the last layer and ``loss_*_dn_{i}`` for layer i < layers - 1."""
        suffixes = ["_dn"] + [f"_dn_{i}" for i in range(layers - 1)]
        if dn is None:
            return {f"{k}{s}": zero for s in suffixes for k in _HEAD_LOSSES}
        indices = positive_indices(targets, dn["dn_groups"], dn["dn_group_size"])
        heads = [dn, *dn.get("aux_outputs", [])]
        losses = {}
        for suffix, head in zip(suffixes, heads):
            found = self.head_losses(head, targets, indices, num_boxes * dn["dn_groups"])
            losses.update({f"{k}{suffix}": v for k, v in found.items()})
        return losses
