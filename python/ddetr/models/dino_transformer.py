"""DINO's transformer (Zhang et al., ICLR 2023) on the deformable core: the same encoder,
decoder layers, MSDA and (native) layer kernels as ``DeformableTransformer``, with

- **mixed query selection**: the top ``two_stage_num_proposals`` encoder proposals (by
  their best class score) give the decoder's reference boxes (detached), while the
  content queries are learned (``tgt_embed``);
- **anchor-derived positions**: every decoder layer embeds its current reference box
  (sine, then ``decoder.ref_point_head``, a 2-layer MLP) as the query position;
- **look forward twice**: the box of layer i is its correction of layer i-1's box
  *before* the detach, so layer i's loss also trains layer i-1's box; the reference
  handed to layer i as input is detached, as in Deformable DETR's refinement;
- denoising queries (``ddetr.models.denoising``) in front of the matching ones, with
  the self-attention mask that separates them (the native decoder layer takes it as a
  0 / -inf bias on its attention scores, so training runs natively too).

Parameter names are the official IDEA-Research/DINO checkpoint keys (``tgt_embed``,
``enc_output``, ``enc_output_norm``, ``enc_out_class_embed``, ``enc_out_bbox_embed``,
``decoder.ref_point_head.layers.{0,1}``, ``decoder.norm``, ``level_embed``,
``encoder.layers.*``, ``decoder.layers.*``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ddetr.models.box_ops import inverse_sigmoid
from ddetr.models.deformable_transformer import (DeformableTransformer, TransformerOutput,
                                                 check_num_proposals)
from ddetr.models.denoising import DINO_EPS, Denoising, attention_mask
from ddetr.models.heads import MLP
from ddetr.models.transformer_layers import DeformableTransformerDecoder
from ddetr.models.two_stage import sine_embed


class DinoDecoder(DeformableTransformerDecoder):
    """The decoder stack of DINO: query positions from the reference boxes, box
    refinement with look forward twice, a final LayerNorm on every layer's output.
    ``bbox_embed`` is attached by the detector (as in ``DeformableTransformerDecoder``)."""

    def __init__(self, layers: list[nn.Module], d_model: int):
        super().__init__(layers)
        self.d_model = d_model
        self.ref_point_head = MLP(2 * d_model, d_model, d_model, 2)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, tgt, reference_points, memory, spatial_shapes, level_start_index,
                valid_ratios, query_pos=None, memory_padding_mask=None, self_attn_mask=None):
        """tgt (N, Lq, C); reference_points (N, Lq, 4) boxes_cxcywh normalised to the valid
        area (``query_pos`` is unused: computed from them). Returns ``(hs, references)``:
        every layer's normed output (N, Lq, C) and its refined boxes (N, Lq, 4), not
        detached (look forward twice)."""
        out, hs, refs = tgt, [], []
        # (N, L, 2) -> (N, L, 4): the valid ratios of (cx, cy, w, h)
        ratios = valid_ratios.repeat(1, 1, 2)
        for i, layer in enumerate(self.layers):
            # (N, Lq, 4) x (N, L, 4) -> (N, Lq, L, 4)
            level_refs = reference_points[:, :, None] * ratios[:, None]
            query_pos = self.position(level_refs[:, :, 0]).to(out.dtype)
            out = layer(out, query_pos, level_refs, memory, spatial_shapes, level_start_index,
                        memory_padding_mask, self_attn_mask)
            refined = (self.bbox_embed[i](out) +
                       inverse_sigmoid(reference_points, DINO_EPS)).sigmoid()
            hs.append(self.norm(out))
            refs.append(refined)
            reference_points = refined.detach()
        return hs, refs

    def position(self, boxes_cxcywh: Tensor) -> Tensor:
        """(N, Lq, 4) -> (N, Lq, C): the sine embedding of (cy, cx, w, h), d_model / 2
        channels each (the official order), through ``ref_point_head``."""
        # (cx, cy, w, h) -> (cy, cx, w, h)
        ordered = boxes_cxcywh[..., [1, 0, 2, 3]]
        embed = sine_embed(ordered, self.d_model // 2)
        return self.ref_point_head(embed.to(self.ref_point_head.layers[0].weight.dtype))


class DinoTransformer(DeformableTransformer):
    """Encoder + DINO decoder. ``forward(srcs, masks, pos_embeds, denoising)``: per level
    features, padding masks and position encodings as ``DeformableTransformer``, and
    the denoising queries (``Denoising``, training) or None. Returns a
    ``TransformerOutput`` whose ``hs`` and references hold the denoising rows first,
    ``init_reference`` the (detached) input boxes, ``inter_references`` each layer's
    refined boxes (not detached), and ``enc_outputs_class`` / ``enc_outputs_coord_unact``
    the class logits (N, K, num_classes) and box logits (N, K, 4) of the K selected
    proposals (not detached: their loss trains the encoder).

    ``num_queries`` sizes ``tgt_embed``; the top ``two_stage_num_proposals`` (at most
    ``num_queries``) proposals are kept and take its first rows."""

    def __init__(self, d_model=256, num_heads=8, num_encoder_layers=6, num_decoder_layers=6,
                 dim_feedforward=2048, dropout=0.0, activation="relu", num_feature_levels=4,
                 enc_num_points=4, dec_num_points=4, num_queries=900,
                 two_stage_num_proposals=900, encoder_token_ratio=1.0):
        self.num_queries = num_queries
        super().__init__(d_model, num_heads, num_encoder_layers, num_decoder_layers,
                         dim_feedforward, dropout, activation, num_feature_levels,
                         enc_num_points, dec_num_points, True, two_stage_num_proposals,
                         encoder_token_ratio)
        # the proposal heads are attached by the detector, as in the official code
        self.enc_out_class_embed: nn.Module | None = None
        self.enc_out_bbox_embed: nn.Module | None = None

    def _make_decoder(self, layers: list[nn.Module]) -> nn.Module:
        return DinoDecoder(layers, self.d_model)

    def _make_query_modules(self) -> None:
        self.tgt_embed = nn.Embedding(self.num_queries, self.d_model)
        self.enc_output = nn.Linear(self.d_model, self.d_model)
        self.enc_output_norm = nn.LayerNorm(self.d_model)

    def _reset_query_modules(self) -> None:
        pass  # (Xavier, as every other matrix of the transformer)

    def forward(self, srcs: list[Tensor], masks: list[Tensor], pos_embeds: list[Tensor],
                denoising: Denoising | None = None) -> TransformerOutput:
        memory, flat, value_mask = self.encode(srcs, masks, pos_embeds)
        tgt, boxes_logits, enc_class, enc_coord = self._mixed_queries(
            memory, flat.mask, flat.levels.sizes)
        self_attn_mask = None
        if denoising is not None:
            self_attn_mask = attention_mask(denoising, tgt.shape[1], tgt.device)
            tgt = torch.cat([denoising.content.to(tgt.dtype), tgt], 1)
            boxes_logits = torch.cat([denoising.box_logits.to(boxes_logits.dtype),
                                      boxes_logits], 1)
        reference = boxes_logits.sigmoid()
        hs, refs = self.decoder(tgt, reference, memory, flat.levels, flat.level_start_index,
                                flat.valid_ratios, None, value_mask, self_attn_mask)
        return TransformerOutput(torch.stack(hs), reference, torch.stack(refs), enc_class,
                                 enc_coord)

    def _mixed_queries(self, memory: Tensor, padding_mask: Tensor, sizes: list):
        """``(content (N, K, C) learned, box logits (N, K, 4) of the top-K proposals,
        detached; their class logits (N, K, num_classes) and box logits, not detached)``."""
        k = self.two_stage_num_proposals
        check_num_proposals(k, memory.shape[1])
        _, enc_class, enc_coord = self.score_proposals(
            memory, padding_mask, sizes, self.enc_out_class_embed, self.enc_out_bbox_embed)
        top = torch.topk(enc_class.max(-1)[0], k, dim=1)[1]
        # (N, K) -> (N, K, X) indices of the chosen proposals' rows
        boxes = torch.gather(enc_coord, 1, top[..., None].expand(-1, -1, 4))
        classes = torch.gather(enc_class, 1, top[..., None].expand(-1, -1, enc_class.shape[-1]))
        # (K, C) -> (N, K, C)
        content = self.tgt_embed.weight[:k][None].expand(memory.shape[0], -1, -1)
        return content, boxes.detach(), classes, boxes


def check_dino_config(cfg: dict) -> None:
    """ValueError naming the first ``DeformableDetr(variant="dino")`` argument of ``cfg``
    that DINO cannot take."""
    if not (cfg["two_stage"] and cfg["with_box_refine"]):
        raise ValueError("variant: 'dino' needs two_stage=True and with_box_refine=True (its "
                         "queries come from the encoder's proposals, refined layer by layer)")
    if cfg["two_stage_num_proposals"] > cfg["num_queries"]:
        raise ValueError(f"two_stage_num_proposals: DINO keeps at most num_queries "
                         f"({cfg['num_queries']}) proposals (one learned content query "
                         f"each), got {cfg['two_stage_num_proposals']}")
    if not isinstance(cfg["dn_number"], int) or cfg["dn_number"] < 0:
        raise ValueError(f"dn_number: expected an int >= 0, got {cfg['dn_number']!r}")
    for name in ("dn_label_noise_ratio", "dn_box_noise_scale"):
        if not isinstance(cfg[name], (int, float)) or cfg[name] < 0:
            raise ValueError(f"{name}: expected a number >= 0, got {cfg[name]!r}")
