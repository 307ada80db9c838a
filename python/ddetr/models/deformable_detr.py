"""``DeformableDetr``: the detector of the paper, in every official variant.

Variants (the official configs): multi-scale (``num_feature_levels=4``, default),
single-scale (``num_feature_levels=1``: ResNet C5 only), DC5 (``dilation=True``),
iterative box refinement (``with_box_refine=True``) and two-stage
(``two_stage=True``, which needs ``with_box_refine=True`` as in the official code).
Module names equal the official checkpoint keys (``backbone.0.body.*``,
``input_proj.{l}.{0,1}``, ``query_embed``, ``transformer.*``, ``class_embed.{i}``,
``bbox_embed.{i}.layers.{j}``), so ``ddetr.convert.from_official`` loads directly.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from ddetr import _native
from ddetr.models import weights
from ddetr.models.backbone import Backbone, load_backbone_weights, resize_mask
from ddetr.models.box_ops import inverse_sigmoid
from ddetr.models.deformable_transformer import DeformableTransformer
from ddetr.models.heads import build_heads
from ddetr.models.int8 import use_int8
from ddetr.models.position_encoding import build_position_encoding
from ddetr.models.postprocess import PostProcess

CONFIG_KEYS = ("num_classes", "num_queries", "num_feature_levels", "with_box_refine",
               "two_stage", "backbone", "d_model", "num_heads", "num_encoder_layers",
               "num_decoder_layers", "dim_feedforward", "dropout", "activation",
               "enc_num_points", "dec_num_points", "two_stage_num_proposals", "dilation",
               "position_embedding", "aux_loss", "train_backbone", "encoder_token_ratio")


class DeformableDetr(nn.Module):
    """Deformable DETR (Zhu et al., ICLR 2021). Defaults are the official ones.

    Args:
        num_classes: classification outputs (91 for COCO ids, as the official model).
        num_queries: object queries (one-stage).
        num_feature_levels: L; 1 is single-scale, otherwise C3-C5 plus L-3 extra
            stride-2 levels (L must be 1 or at least 3).
        with_box_refine: per-layer heads that refine the reference boxes layer by layer.
        two_stage: decoder queries from the top encoder proposals (needs with_box_refine).
        backbone: ``"resnet18"``, ``"resnet34"``, ``"resnet50"``, ``"resnet101"`` or a spec
            dict ``{"block", "depths", "widths", "stem_width"}`` (see ``ResNet``).
        backbone_weights: a torchvision ResNet state dict (path or dict) to load.
        d_model, num_heads, num_encoder_layers, num_decoder_layers, dim_feedforward,
        dropout, activation, enc_num_points, dec_num_points: transformer sizes.
        two_stage_num_proposals: proposals kept in two-stage mode (the query count).
        dilation: dilated last backbone stage (DC5).
        position_embedding: ``"sine"`` or ``"learned"``.
        aux_loss: also return every earlier decoder layer's predictions.
        train_backbone: False freezes the whole backbone (the stem and layer1 are
            always frozen).
        encoder_token_ratio: in (0, 1]; below 1 every encoder layer updates only that
            fraction of each image's tokens, chosen by ``transformer.token_scorer``
            (Sparse DETR; see ``ddetr.compress.sparsify_encoder``); 1 is the dense encoder.
        native_layers: run every encoder and decoder layer in one native call per pass
            (``ddetr.ops.native_layers``: same parameters and outputs, faster, fewer saved
            activations); None (default) turns it on when the native extension is
            built. Layers or inputs it cannot take (float16/bfloat16, GELU, hooked
            sub-modules, ``torch.compile`` tracing) keep the PyTorch path by themselves.
        recompute_activations: with native layers, recompute the FFN activations and the
            decoder's attention probabilities in the backward instead of storing them
            (less memory, one more GEMM per layer).
    """

    def __init__(self, num_classes: int = 91, num_queries: int = 300, num_feature_levels: int = 4,
                 with_box_refine: bool = False, two_stage: bool = False, backbone="resnet50",
                 backbone_weights=None, d_model: int = 256, num_heads: int = 8,
                 num_encoder_layers: int = 6, num_decoder_layers: int = 6,
                 dim_feedforward: int = 1024, dropout: float = 0.1, activation: str = "relu",
                 enc_num_points: int = 4, dec_num_points: int = 4,
                 two_stage_num_proposals: int = 300, dilation: bool = False,
                 position_embedding: str = "sine", aux_loss: bool = True,
                 train_backbone: bool = True, encoder_token_ratio: float = 1.0,
                 native_layers: bool | None = None, recompute_activations: bool = False):
        super().__init__()
        # the architecture's arguments (not the weights file nor the run-time switches),
        # as save_pretrained records them
        self.config = copy.deepcopy({k: v for k, v in locals().items() if k in CONFIG_KEYS})
        _check_config(self.config)
        self._build(**self.config)
        if backbone_weights is not None:
            load_backbone_weights(self.backbone[0].body, backbone_weights)
        self.set_native_layers(_native.available() if native_layers is None else native_layers,
                               recompute_activations)
        # what ddetr.compress applied, in order (save_pretrained records it)
        self.compression: list[dict] = []

    def set_native_layers(self, enabled: bool, recompute_activations: bool = False) -> None:
        """Switch every transformer layer between the native and the PyTorch path."""
        for name, v in (("enabled", enabled), ("recompute_activations", recompute_activations)):
            if not isinstance(v, bool):
                raise ValueError(f"{name}: expected a bool, got {v!r}")
        for layer in [*self.transformer.encoder.layers, *self.transformer.decoder.layers]:
            layer.native_layers = enabled
            layer.recompute_activations = recompute_activations

    def _build(self, num_classes, num_queries, num_feature_levels, with_box_refine, two_stage,
               backbone, d_model, num_heads, num_encoder_layers, num_decoder_layers,
               dim_feedforward, dropout, activation, enc_num_points, dec_num_points,
               two_stage_num_proposals, dilation, position_embedding, aux_loss,
               train_backbone, encoder_token_ratio) -> None:
        self.num_queries = two_stage_num_proposals if two_stage else num_queries
        self.num_feature_levels = num_feature_levels
        self.with_box_refine, self.two_stage, self.aux_loss = with_box_refine, two_stage, aux_loss
        body = Backbone(backbone, num_feature_levels > 1, dilation, train_backbone)
        self.backbone = nn.Sequential(body, build_position_encoding(position_embedding, d_model))
        self.transformer = DeformableTransformer(
            d_model, num_heads, num_encoder_layers, num_decoder_layers, dim_feedforward, dropout,
            activation, num_feature_levels, enc_num_points, dec_num_points, two_stage,
            two_stage_num_proposals, encoder_token_ratio)
        if not two_stage:
            self.query_embed = nn.Embedding(num_queries, d_model * 2)
        self.input_proj = _input_proj(body.num_channels, d_model, num_feature_levels)
        num_pred = num_decoder_layers + 1 if two_stage else num_decoder_layers
        self.class_embed, self.bbox_embed = build_heads(d_model, num_classes, num_pred,
                                                        with_box_refine, two_stage)
        # the official wiring: refinement and two-stage read the heads from the decoder
        if with_box_refine:
            self.transformer.decoder.bbox_embed = self.bbox_embed
        if two_stage:
            self.transformer.decoder.class_embed = self.class_embed

    def forward(self, images, mask: Tensor | None = None) -> dict:
        """Detects objects.

        Args:
            images: (N, 3, H, W) normalised images, or a list of (3, H_i, W_i) images of
                any sizes (zero-padded at the bottom and right to a common size).
            mask: (N, H, W) bool, True on padding; None means no padding. Not allowed
                with a list (the mask is then built from the sizes).

        Returns:
            A dict: ``pred_logits`` (N, Q, num_classes) classification logits (sigmoid,
            no background class); ``pred_boxes`` (N, Q, 4) boxes_cxcywh normalised to
            [0, 1] relative to each image's unpadded size; ``aux_outputs`` (when
            aux_loss) a list of num_decoder_layers - 1 dicts with the same two keys from
            the earlier decoder layers; ``enc_outputs`` (two-stage only) a dict with
            ``pred_logits`` (N, S, num_classes) and ``pred_boxes`` (N, S, 4)
            boxes_cxcywh of the encoder proposals (S encoder tokens; invalid proposals
            have boxes of 1).
        """
        images, mask = batch_images(images, mask)
        # a converted model (model.to(torch.bfloat16)) takes float32 images as they come
        images = images.to(self.input_proj[0][0].weight.dtype)
        srcs, masks, pos = self._pyramid(images, mask)
        query_embed = None if self.two_stage else self.query_embed.weight
        out = self.transformer(srcs, masks, pos, query_embed)
        logits, boxes_cxcywh = self._predict(out.hs, out.init_reference, out.inter_references)
        result = {"pred_logits": logits[-1], "pred_boxes": boxes_cxcywh[-1]}
        if self.aux_loss:
            result["aux_outputs"] = [{"pred_logits": c, "pred_boxes": b}
                                     for c, b in zip(logits[:-1], boxes_cxcywh[:-1])]
        if self.two_stage:
            result["enc_outputs"] = {"pred_logits": out.enc_outputs_class,
                                     "pred_boxes": out.enc_outputs_coord_unact.sigmoid()}
        return result

    def _pyramid(self, images: Tensor, mask: Tensor):
        """Backbone levels projected to d_model, plus the extra stride-2 levels; each
        with its padding mask and position encoding."""
        backbone, position = self.backbone[0], self.backbone[1]
        features = backbone(images, mask)
        srcs, masks, pos = [], [], []
        for lvl, (feat, level_mask) in enumerate(features):
            srcs.append(self.input_proj[lvl](feat))
            masks.append(level_mask)
            pos.append(position(level_mask).to(feat.dtype))
        for lvl in range(len(features), self.num_feature_levels):
            src = self.input_proj[lvl](features[-1][0] if lvl == len(features) else srcs[-1])
            level_mask = resize_mask(mask, src.shape[-2:])
            srcs.append(src)
            masks.append(level_mask)
            pos.append(position(level_mask).to(src.dtype))
        return srcs, masks, pos

    def _predict(self, hs: Tensor, init_reference: Tensor, inter_references: Tensor):
        """Per decoder layer: class logits and boxes_cxcywh, the box head predicting a
        correction of that layer's input reference in logit space."""
        logits, boxes = [], []
        for lvl in range(hs.shape[0]):
            reference = inverse_sigmoid(init_reference if lvl == 0 else inter_references[lvl - 1])
            delta = self.bbox_embed[lvl](hs[lvl])
            if reference.shape[-1] == 4:
                coord = delta + reference
            else:
                coord = torch.cat([delta[..., :2] + reference, delta[..., 2:]], -1)
            logits.append(self.class_embed[lvl](hs[lvl]))
            boxes.append(coord.sigmoid())
        return logits, boxes

    def level_strides(self) -> list[int]:
        """The stride of every feature level: the backbone's, then doubling."""
        strides = list(self.backbone[0].strides)
        while len(strides) < self.num_feature_levels:
            strides.append(strides[-1] * 2)
        return strides

    def postprocess(self, outputs: dict, target_sizes, num_select: int = 100) -> list[dict]:
        """``PostProcess(num_select)(outputs, target_sizes)``: per image the top
        ``num_select`` ``scores``, ``labels`` and ``boxes`` (boxes_xyxy in pixels)."""
        return PostProcess(num_select)(outputs, target_sizes)

    def save_pretrained(self, directory, safe_serialization: bool = True) -> None:
        """Writes ``config.json`` and the weights (safetensors, or torch) to ``directory``."""
        weights.save_pretrained(self, directory, safe_serialization)

    @classmethod
    def from_pretrained(cls, directory, strict: bool = True, **overrides) -> "DeformableDetr":
        """Builds the model saved by ``save_pretrained``; ``overrides`` replace config
        entries (e.g. ``dropout=0.0``)."""
        config, state = weights.read_pretrained(directory)
        unknown = sorted(set(config) - set(CONFIG_KEYS))
        if unknown:
            raise ValueError(f"directory: {directory}/{weights.CONFIG_NAME} has unknown "
                             f"config entries {unknown}")
        config.update(overrides)
        model = cls(**config)
        model.restore_compression(weights.read_compression(directory))
        weights.load_weights(model, state, strict=strict, source=str(directory))
        return model

    def restore_compression(self, records: list[dict]) -> None:
        """Sets ``compression`` to what ``ddetr.compress`` recorded for this model, and the
        modules and dtype that go with it (int8 layers, bfloat16), so that the weights
        saved from the compressed model load next."""
        self.compression = list(records)
        for record in self.compression:
            if record.get("technique") == "to_int8":
                use_int8(self, record["include"])
        if any(r.get("dtype") == "bfloat16" for r in self.compression):
            self.to(torch.bfloat16)


def check_positive_ints(values: dict) -> None:
    """ValueError naming the first of ``values`` (name -> value) that is not an int >= 1
    (a bool is not taken for an int)."""
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name}: expected a positive int, got {value!r}")


def _check_config(cfg: dict) -> None:
    if cfg["d_model"] % 32:
        raise ValueError(f"d_model: must be a multiple of 32 (GroupNorm(32) in the input "
                         f"projections), got {cfg['d_model']}")
    if cfg["num_feature_levels"] < 1 or cfg["num_feature_levels"] == 2:
        raise ValueError(f"num_feature_levels: 1 (single-scale) or at least 3 (C3-C5 plus "
                         f"extra levels), got {cfg['num_feature_levels']}")
    if cfg["two_stage"] and not cfg["with_box_refine"]:
        raise ValueError("two_stage: needs with_box_refine=True (as the official model)")
    check_positive_ints({name: cfg[name] for name in (
        "num_classes", "num_queries", "num_decoder_layers", "num_heads",
        "two_stage_num_proposals")})
    ratio = cfg["encoder_token_ratio"]
    if not isinstance(ratio, (int, float)) or isinstance(ratio, bool) or not 0 < ratio <= 1:
        raise ValueError(f"encoder_token_ratio: expected a number in (0, 1], got {ratio!r}")


class _GroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` that also takes groups of a single value (d_model 32 on a 1x1 map
    at batch 1, which torch refuses with "Expected more than 1 value per channel"): such a
    value normalises to 0, so the output is the bias. Same parameters and state dict."""

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() >= 2 and x.shape[1] // self.num_groups * x[0, 0].numel() == 1:
            shape = (1, -1) + (1,) * (x.dim() - 2)
            return torch.zeros_like(x) * self.weight.view(shape) + self.bias.view(shape)
        return super().forward(x)


def _input_proj(num_channels: list[int], d_model: int, num_levels: int) -> nn.ModuleList:
    """1x1 conv + GroupNorm(32) per backbone level, then 3x3 stride-2 conv + GroupNorm
    per extra level (the first on the last backbone level, the next on the previous)."""
    projs = [nn.Sequential(nn.Conv2d(c, d_model, 1), _GroupNorm(32, d_model))
             for c in num_channels]
    in_ch = num_channels[-1]
    for _ in range(num_levels - len(num_channels)):
        projs.append(nn.Sequential(nn.Conv2d(in_ch, d_model, 3, stride=2, padding=1),
                                   _GroupNorm(32, d_model)))
        in_ch = d_model
    for proj in projs:
        nn.init.xavier_uniform_(proj[0].weight, gain=1)
        nn.init.zeros_(proj[0].bias)
    return nn.ModuleList(projs)


def batch_images(images, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """A (N, 3, H, W) batch and its (N, H, W) padding mask (True on padding), from a
    batch tensor with an optional mask, or from a list of (3, H_i, W_i) images that are
    zero-padded at the bottom and right to the largest size."""
    if isinstance(images, (list, tuple)):
        if mask is not None:
            raise ValueError("mask: not accepted with a list of images (built from their sizes)")
        return _pad(images)
    if not isinstance(images, Tensor) or images.dim() != 4 or not images.is_floating_point() \
            or images.shape[1] != 3 or images.numel() == 0:
        raise ValueError(f"images: expected a non-empty floating (N, 3, H, W) tensor or a "
                         f"list of (3, H, W) tensors, got {_describe(images)}")
    n, _, h, w = images.shape
    if mask is None:
        return images, torch.zeros(n, h, w, dtype=torch.bool, device=images.device)
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != (n, h, w):
        raise ValueError(f"mask: expected a bool tensor of shape {(n, h, w)} (True on "
                         f"padding), got {_describe(mask)}")
    return images, mask


def _pad(images) -> tuple[Tensor, Tensor]:
    for i, im in enumerate(images):
        if not isinstance(im, Tensor) or im.dim() != 3 or im.shape[0] != 3 \
                or not im.is_floating_point() or im.numel() == 0:
            raise ValueError(f"images[{i}]: expected a non-empty floating (3, H, W) tensor "
                             f"(normalised RGB), got {_describe(im)}")
        if im.dtype != images[0].dtype or im.device != images[0].device:
            raise ValueError(f"images[{i}]: expected {images[0].dtype} on {images[0].device} "
                             f"like images[0], got {im.dtype} on {im.device}")
    if not images:
        raise ValueError("images: an empty list (expected at least one (3, H, W) tensor)")
    h = max(im.shape[1] for im in images)
    w = max(im.shape[2] for im in images)
    batch = images[0].new_zeros(len(images), images[0].shape[0], h, w)
    mask = torch.ones(len(images), h, w, dtype=torch.bool, device=images[0].device)
    for i, im in enumerate(images):
        batch[i, :, :im.shape[1], :im.shape[2]].copy_(im)
        mask[i, :im.shape[1], :im.shape[2]] = False
    return batch, mask


def _describe(x) -> str:
    if isinstance(x, Tensor):
        return f"{x.dtype} tensor of shape {tuple(x.shape)}"
    return type(x).__name__
