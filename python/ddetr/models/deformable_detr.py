"""``DeformableDetr``: the detector of the paper, in every official variant.

Variants (the official configs): multi-scale (``num_feature_levels=4``, default),
single-scale (``num_feature_levels=1``: ResNet C5 only), DC5 (``dilation=True``),
iterative box refinement (``with_box_refine=True``) and two-stage
(``two_stage=True``, which needs ``with_box_refine=True`` as in the official code).
DINO (Zhang et al., ICLR 2023; ``variant="dino"``, or ``ddetr.models.Dino`` with its
recipe's defaults): the same backbone, input projections, encoder, decoder layers and
kernels, with DINO's transformer (``DinoTransformer``: mixed query selection, look
forward twice) and, in training, contrastive denoising queries built from the targets
passed to ``forward`` (``ddetr.models.denoising``); its module names are the official
IDEA-Research/DINO checkpoint keys.
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
from ddetr.models import denoising
from ddetr.models.backbone import Backbone, load_backbone_weights, resize_mask
from ddetr.models.box_ops import inverse_sigmoid
from ddetr.models.deformable_transformer import DeformableTransformer
from ddetr.models.dino_transformer import DinoTransformer, check_dino_config
from ddetr.models.heads import build_heads
from ddetr.models.images import batch_images
from ddetr.models.input_proj import input_proj
from ddetr.models.int8 import use_int8
from ddetr.models.position_encoding import PositionEmbeddingSine, build_position_encoding
from ddetr.models.postprocess import PostProcess
from ddetr.ops.bf16_cpu import linear_module

CONFIG_KEYS = ("num_classes", "num_queries", "num_feature_levels", "with_box_refine",
               "two_stage", "backbone", "d_model", "num_heads", "num_encoder_layers",
               "num_decoder_layers", "dim_feedforward", "dropout", "activation",
               "enc_num_points", "dec_num_points", "two_stage_num_proposals", "dilation",
               "position_embedding", "aux_loss", "train_backbone", "encoder_token_ratio",
               "variant", "dn_number", "dn_label_noise_ratio", "dn_box_noise_scale",
               "feature_levels")
VARIANTS = ("deformable", "dino")


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
        variant: ``"deformable"`` (Deformable DETR) or ``"dino"`` (DINO: needs
            two_stage and with_box_refine; ``num_queries`` learned content queries, of
            which the first ``two_stage_num_proposals`` go with the top proposals; the
            decoder's heads are shared, as DINO's; sine positions of temperature 20).
        dn_number, dn_label_noise_ratio, dn_box_noise_scale: DINO's denoising queries
            (about dn_number positive and as many negative queries per batch; 0: none),
            the label flip rate (half of it flips) and the box noise (see
            ``ddetr.models.denoising``).
        feature_levels: the levels of the ``num_feature_levels`` pyramid the transformer
            uses, ascending indices (None: all). The others are not computed: without the
            coarsest levels the backbone stops early (``ddetr.compress.drop_levels``).
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
                 native_layers: bool | None = None, recompute_activations: bool = False,
                 variant: str = "deformable", dn_number: int = 100,
                 dn_label_noise_ratio: float = 0.5, dn_box_noise_scale: float = 1.0,
                 feature_levels: list[int] | None = None):
        super().__init__()
        # the architecture's arguments (not the weights file nor the run-time switches),
        # as save_pretrained records them
        self.config = copy.deepcopy({k: v for k, v in locals().items() if k in CONFIG_KEYS})
        _check_config(self.config)
        self.config["feature_levels"] = _kept_levels(feature_levels, num_feature_levels)
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
               train_backbone, encoder_token_ratio, variant, dn_number, dn_label_noise_ratio,
               dn_box_noise_scale, feature_levels) -> None:
        self.num_queries = two_stage_num_proposals if two_stage else num_queries
        self.num_feature_levels, self.num_classes = num_feature_levels, num_classes
        # the pyramid's levels the transformer takes (indices into num_feature_levels)
        self.feature_levels = list(feature_levels or range(num_feature_levels))
        self.with_box_refine, self.two_stage, self.aux_loss = with_box_refine, two_stage, aux_loss
        self.variant, self.dino = variant, variant == "dino"
        # (DINO's forward takes the targets, for its denoising queries)
        self.takes_targets = self.dino
        self.denoising = dict(dn_number=dn_number, label_noise_ratio=dn_label_noise_ratio,
                              box_noise_scale=dn_box_noise_scale)
        body = Backbone(backbone, num_feature_levels > 1, dilation, train_backbone)
        self.backbone = nn.Sequential(body, _position_encoding(position_embedding, d_model,
                                                               self.dino))
        sizes = (d_model, num_heads, num_encoder_layers, num_decoder_layers, dim_feedforward,
                 dropout, activation, len(self.feature_levels), enc_num_points, dec_num_points)
        if self.dino:
            self.transformer = DinoTransformer(*sizes, num_queries, two_stage_num_proposals,
                                               encoder_token_ratio)
            self.label_enc = nn.Embedding(num_classes + 1, d_model)
        else:
            self.transformer = DeformableTransformer(*sizes, two_stage, two_stage_num_proposals,
                                                     encoder_token_ratio)
        if feature_levels is not None:
            self.transformer.proposal_levels = list(feature_levels)
        if not two_stage:
            self.query_embed = nn.Embedding(num_queries, d_model * 2)
        self.input_proj = input_proj(body.num_channels, d_model, num_feature_levels)
        self._build_heads(d_model, num_classes, num_decoder_layers)

    def _build_heads(self, d_model: int, num_classes: int, num_decoder_layers: int) -> None:
        """Per decoder layer (and, two-stage, the proposals) a class and a box head."""
        if self.dino:
            # one class and one box head shared by the decoder layers (DINO's
            # dec_pred_*_embed_share), separate copies for the proposals
            self.class_embed, self.bbox_embed = build_heads(d_model, num_classes,
                                                            num_decoder_layers, False, True)
            self.transformer.enc_out_class_embed = copy.deepcopy(self.class_embed[0])
            self.transformer.enc_out_bbox_embed = copy.deepcopy(self.bbox_embed[0])
        else:
            num_pred = num_decoder_layers + 1 if self.two_stage else num_decoder_layers
            self.class_embed, self.bbox_embed = build_heads(
                d_model, num_classes, num_pred, self.with_box_refine, self.two_stage)
        # the official wiring: refinement and two-stage read the heads from the decoder
        if self.with_box_refine:
            self.transformer.decoder.bbox_embed = self.bbox_embed
        if self.two_stage:
            self.transformer.decoder.class_embed = self.class_embed

    def forward(self, images, mask: Tensor | None = None, targets: list[dict] | None = None
                ) -> dict:
        """Detects objects.

        Args:
            images: (N, 3, H, W) normalised images, or a list of (3, H_i, W_i) images of
                any sizes (zero-padded at the bottom and right to a common size).
            mask: (N, H, W) bool, True on padding; None means no padding. Not allowed
                with a list (the mask is then built from the sizes).
            targets: DINO in training: per image ``labels`` (T_i,) and ``boxes`` (T_i, 4)
                boxes_cxcywh, from which the denoising queries are built (ignored
                otherwise: in eval mode the outputs never depend on them).

        Returns:
            A dict: ``pred_logits`` (N, Q, num_classes) classification logits (sigmoid,
            no background class); ``pred_boxes`` (N, Q, 4) boxes_cxcywh normalised to
            [0, 1] relative to each image's unpadded size; ``aux_outputs`` (when
            aux_loss) a list of num_decoder_layers - 1 dicts with the same two keys from
            the earlier decoder layers; ``enc_outputs`` (two-stage only) a dict with
            ``pred_logits`` (N, S, num_classes) and ``pred_boxes`` (N, S, 4)
            boxes_cxcywh of the encoder proposals (S encoder tokens; invalid proposals
            have boxes of 1). DINO instead: ``interm_outputs`` the same two keys for the
            K selected proposals (N, K, .); in training with denoising queries,
            ``dn_outputs``: their ``pred_logits``, ``pred_boxes`` (N, D, .) and
            ``aux_outputs`` (every row of group g at g * ``dn_group_size``, the first
            half positives), and ``dn_groups``, ``dn_group_size``.
        """
        images, mask = batch_images(images, mask)
        # a converted model (model.to(torch.bfloat16)) takes float32 images as they come
        images = images.to(self.input_proj[0][0].weight.dtype)
        srcs, masks, pos = self.pyramid(images, mask)
        dn = self._denoising_queries(targets)
        if self.dino:
            out = self.transformer(srcs, masks, pos, dn)
        else:
            query_embed = None if self.two_stage else self.query_embed.weight
            out = self.transformer(srcs, masks, pos, query_embed)
        logits, boxes_cxcywh = self._predict(out.hs, out.init_reference, out.inter_references,
                                             out.boxes)
        if dn is not None:
            dn_logits, logits = zip(*(denoising.split(x, dn) for x in logits))
            dn_boxes, boxes_cxcywh = zip(*(denoising.split(x, dn) for x in boxes_cxcywh))
        result = self._layer_outputs(logits, boxes_cxcywh)
        if self.two_stage:
            enc = {"pred_logits": out.enc_outputs_class,
                   "pred_boxes": out.enc_outputs_coord_unact.sigmoid()}
            result["interm_outputs" if self.dino else "enc_outputs"] = enc
        if dn is not None:
            result["dn_outputs"] = {**self._layer_outputs(dn_logits, dn_boxes),
                                    "dn_groups": dn.groups, "dn_group_size": dn.group_size}
        return result

    def _layer_outputs(self, logits, boxes_cxcywh) -> dict:
        """The last decoder layer's outputs, and (aux_loss) the earlier layers'."""
        result = {"pred_logits": logits[-1], "pred_boxes": boxes_cxcywh[-1]}
        if self.aux_loss:
            result["aux_outputs"] = [{"pred_logits": c, "pred_boxes": b}
                                     for c, b in zip(logits[:-1], boxes_cxcywh[:-1])]
        return result

    def _denoising_queries(self, targets: list[dict] | None):
        """DINO in training with targets: its denoising queries (or None, as otherwise)."""
        if not (self.dino and self.training and targets is not None):
            return None
        return denoising.denoising_queries(targets, self.label_enc, self.num_classes,
                                           **self.denoising)

    def pyramid(self, images: Tensor, mask: Tensor):
        """What the transformer takes, as lists over the levels of ``feature_levels``:
        ``(srcs (N, d_model, H_l, W_l), masks (N, H_l, W_l) bool, pos (N, d_model, H_l,
        W_l))`` for (N, 3, H, W) images (in the model's dtype) and their (N, H, W) padding
        mask: backbone levels projected to d_model, extra stride-2 levels (each from the
        one before, the first from the last backbone stage); each with its padding mask
        and position encoding. Stages and projections that no kept level needs are not
        run."""
        backbone, position = self.backbone[0], self.backbone[1]
        stages = len(backbone.strides)
        kept, top = self.feature_levels, self.feature_levels[-1]
        features = backbone(images, mask, min(top + 1, stages))
        srcs, masks, pos = [], [], []
        extra = None
        for lvl in range(top + 1):
            if lvl < stages:
                if lvl not in kept:
                    continue
                src, level_mask = self.input_proj[lvl](features[lvl][0]), features[lvl][1]
            else:
                extra = self.input_proj[lvl](features[-1][0] if lvl == stages else extra)
                if lvl not in kept:
                    continue
                src, level_mask = extra, resize_mask(mask, extra.shape[-2:])
            srcs.append(src)
            masks.append(level_mask)
            pos.append(position(level_mask).to(src.dtype))
        return srcs, masks, pos

    def _predict(self, hs: Tensor, init_reference: Tensor, inter_references: Tensor,
                 refined: Tensor | None = None):
        """Per decoder layer: class logits and boxes_cxcywh, the box head predicting a
        correction of that layer's input reference in logit space. ``refined``: the
        decoder's refined boxes (box refinement), which are exactly those boxes: then
        the box head is not run again."""
        logits, boxes = [], []
        eps = denoising.DINO_EPS if self.dino else 1e-5  # (each official code's)
        for lvl in range(hs.shape[0]):
            logits.append(linear_module(self.class_embed[lvl], hs[lvl]))
            if refined is not None:
                boxes.append(refined[lvl])
                continue
            reference = inverse_sigmoid(init_reference if lvl == 0 else inter_references[lvl - 1],
                                        eps)
            delta = self.bbox_embed[lvl](hs[lvl])
            if reference.shape[-1] == 4:
                coord = delta + reference
            else:
                coord = torch.cat([delta[..., :2] + reference, delta[..., 2:]], -1)
            boxes.append(coord.sigmoid())
        return logits, boxes

    def level_strides(self) -> list[int]:
        """The stride of every feature level the transformer takes: the backbone's, then
        doubling (those of ``feature_levels``)."""
        strides = list(self.backbone[0].strides)
        while len(strides) < self.num_feature_levels:
            strides.append(strides[-1] * 2)
        return [strides[lvl] for lvl in self.feature_levels]

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
    if cfg["variant"] not in VARIANTS:
        raise ValueError(f"variant: expected one of {', '.join(VARIANTS)}, got {cfg['variant']!r}")
    if cfg["variant"] == "dino":
        check_dino_config(cfg)
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


def _kept_levels(levels, total: int) -> list[int] | None:
    """``feature_levels`` checked: None, or ascending distinct ints in [0, total); None also
    when every level is kept (the full model's config)."""
    if levels is None:
        return None
    if (not isinstance(levels, (list, tuple)) or not levels
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in levels)
            or list(levels) != sorted(set(levels)) or not 0 <= levels[0] <= levels[-1] < total):
        raise ValueError(f"feature_levels: expected None or ascending distinct ints in "
                         f"[0, {total}) (num_feature_levels {total}), got {levels!r}")
    return None if len(levels) == total else list(levels)


def _position_encoding(kind: str, d_model: int, dino: bool) -> nn.Module:
    """Deformable DETR's encoding; DINO's sine one has temperature 20 and no half-pixel
    shift (its pe_temperatureH/W)."""
    if dino and kind == "sine":
        return PositionEmbeddingSine(d_model // 2, temperature=20, normalize=True, offset=0.0)
    return build_position_encoding(kind, d_model)
