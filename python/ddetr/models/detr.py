"""``Detr``: DETR (Carion et al., "End-to-End Object Detection with Transformers", ECCV
2020), the baseline Deformable DETR improves on.

One feature map (ResNet C5, or the dilated C5 of DC5) projected to d_model, DETR's sine
position encoding (no half-pixel shift), a dense post-norm transformer
(``DetrTransformer``), learned object queries and softmax classification over
``num_classes`` real classes plus a last "no object" class. Module names equal
facebookresearch/detr's checkpoint keys: ``backbone.0.body.*``, ``input_proj``,
``query_embed``, ``transformer.*``, ``class_embed``, ``bbox_embed.layers.{0,1,2}``.
Train it with ``SetCriterion(..., classification="softmax")``.
"""

from __future__ import annotations

import copy

from torch import Tensor, nn

from ddetr.models.backbone import Backbone, load_backbone_weights
from ddetr.models.deformable_detr import batch_images, check_positive_ints
from ddetr.models.detr_transformer import DetrTransformer
from ddetr.models.heads import MLP
from ddetr.models.position_encoding import build_position_encoding
from ddetr.models.postprocess import SoftmaxPostProcess
from ddetr.ops.bf16_cpu import Conv2d

CONFIG_KEYS = ("num_classes", "num_queries", "backbone", "d_model", "num_heads",
               "num_encoder_layers", "num_decoder_layers", "dim_feedforward", "dropout",
               "activation", "dilation", "position_embedding", "aux_loss", "train_backbone")


class Detr(nn.Module):
    """DETR. Defaults are the official ones (DETR-R50; ``dilation=True`` is DETR-DC5).

    Args:
        num_classes: real classes (91 for COCO ids, as the official model); the class
            head has num_classes + 1 outputs, the last one "no object".
        num_queries: object queries.
        backbone: ``"resnet18"``, ``"resnet34"``, ``"resnet50"``, ``"resnet101"`` or a spec
            dict ``{"block", "depths", "widths", "stem_width"}`` (see ``ResNet``).
        backbone_weights: a torchvision ResNet state dict (path or dict) to load.
        d_model, num_heads, num_encoder_layers, num_decoder_layers, dim_feedforward,
        dropout, activation: transformer sizes.
        dilation: dilated last backbone stage (DC5, stride 16).
        position_embedding: ``"sine"`` or ``"learned"``.
        aux_loss: also return every earlier decoder layer's predictions.
        train_backbone: False freezes the whole backbone (the stem and layer1 are
            always frozen).
    """

    # how its logits are read (SetCriterion, HungarianMatcher, the engine's
    # post-processing); a model without the attribute is a sigmoid one
    classification = "softmax"

    def __init__(self, num_classes: int = 91, num_queries: int = 100, backbone="resnet50",
                 backbone_weights=None, d_model: int = 256, num_heads: int = 8,
                 num_encoder_layers: int = 6, num_decoder_layers: int = 6,
                 dim_feedforward: int = 2048, dropout: float = 0.1, activation: str = "relu",
                 dilation: bool = False, position_embedding: str = "sine",
                 aux_loss: bool = True, train_backbone: bool = True):
        super().__init__()
        self.config = copy.deepcopy({k: v for k, v in locals().items() if k in CONFIG_KEYS})
        _check_config(self.config)
        self.num_queries, self.aux_loss = num_queries, aux_loss
        body = Backbone(backbone, False, dilation, train_backbone)
        position = build_position_encoding(position_embedding, d_model, sine_offset=0.0)
        self.backbone = nn.Sequential(body, position)
        self.transformer = DetrTransformer(d_model, num_heads, num_encoder_layers,
                                           num_decoder_layers, dim_feedforward, dropout,
                                           activation)
        self.input_proj = Conv2d(body.num_channels[-1], d_model, 1)
        self.query_embed = nn.Embedding(num_queries, d_model)
        self.class_embed = nn.Linear(d_model, num_classes + 1)
        self.bbox_embed = MLP(d_model, d_model, 4, 3)
        if backbone_weights is not None:
            load_backbone_weights(body.body, backbone_weights)

    def forward(self, images, mask: Tensor | None = None) -> dict:
        """Detects objects.

        Args:
            images: (N, 3, H, W) normalised images, or a list of (3, H_i, W_i) images of
                any sizes (zero-padded at the bottom and right to a common size).
            mask: (N, H, W) bool, True on padding; None means no padding. Not allowed
                with a list (the mask is then built from the sizes).

        Returns:
            A dict: ``pred_logits`` (N, Q, num_classes + 1) softmax logits, the last class
            "no object"; ``pred_boxes`` (N, Q, 4) boxes_cxcywh normalised to [0, 1]
            relative to each image's unpadded size; ``aux_outputs`` (when aux_loss) a list
            of num_decoder_layers - 1 dicts with the same two keys from the earlier
            decoder layers.
        """
        images, mask = batch_images(images, mask)
        images = images.to(self.input_proj.weight.dtype)
        body, position = self.backbone[0], self.backbone[1]
        feature, feature_mask = body(images, mask)[-1]
        pos = position(feature_mask).to(feature.dtype)
        # (num_layers, N, Q, D)
        hs = self.transformer(self.input_proj(feature), feature_mask, self.query_embed.weight,
                              pos)
        logits, boxes_cxcywh = self.class_embed(hs), self.bbox_embed(hs).sigmoid()
        result = {"pred_logits": logits[-1], "pred_boxes": boxes_cxcywh[-1]}
        if self.aux_loss:
            result["aux_outputs"] = [{"pred_logits": c, "pred_boxes": b}
                                     for c, b in zip(logits[:-1], boxes_cxcywh[:-1])]
        return result

    def postprocess(self, outputs: dict, target_sizes) -> list[dict]:
        """``SoftmaxPostProcess()(outputs, target_sizes)``: per image and query the best
        real class's softmax ``scores``, its ``labels`` and the ``boxes`` (boxes_xyxy in
        pixels)."""
        return SoftmaxPostProcess()(outputs, target_sizes)


def _check_config(cfg: dict) -> None:
    check_positive_ints({name: cfg[name] for name in (
        "num_classes", "num_queries", "num_encoder_layers", "num_decoder_layers", "num_heads",
        "d_model", "dim_feedforward")})
    if cfg["d_model"] % 2:
        raise ValueError(f"d_model: must be even (half the channels encode each axis), "
                         f"got {cfg['d_model']}")
    if not 0 <= cfg["dropout"] < 1:
        raise ValueError(f"dropout: expected a probability in [0, 1), got {cfg['dropout']!r}")
