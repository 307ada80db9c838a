"""The deformable transformer: flattens the feature pyramid, encodes it with deformable
self-attention, and decodes object queries (learned, or two-stage proposals).

Parameter names follow the official checkpoint (``level_embed``, ``reference_points``
or, two-stage, ``enc_output``, ``enc_output_norm``, ``pos_trans``, ``pos_trans_norm``;
``encoder.layers.*``, ``decoder.layers.*``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from ddetr.models.ms_deform_attn import MSDeformAttn
from ddetr.models.size_cache import known_unpadded
from ddetr.models.token_selection import TokenScorer, select_tokens
from ddetr.models.transformer_layers import (DeformableTransformerDecoder,
                                             DeformableTransformerDecoderLayer,
                                             DeformableTransformerEncoder,
                                             DeformableTransformerEncoderLayer)
from ddetr.models.two_stage import encoder_proposals, proposal_pos_embed
from ddetr.ops import encoder_reference_points, flatten_multiscale
from ddetr.ops.bf16_cpu import linear_module


class TransformerOutput(NamedTuple):
    hs: Tensor                    # (layers, N, Lq, C) every decoder layer's output
    init_reference: Tensor        # (N, Lq, 2) points or (N, Lq, 4) boxes_cxcywh, in [0, 1]
    inter_references: Tensor      # (layers, N, Lq, 2|4) the reference after each layer
    enc_outputs_class: Tensor | None       # (N, S, num_classes), two-stage only
    enc_outputs_coord_unact: Tensor | None  # (N, S, 4) box logits, two-stage only
    # (layers, N, Lq, 4) boxes_cxcywh: each layer's refined boxes before the detach (the
    # box outputs), when the decoder refines them; else None (the detector's heads run)
    boxes: Tensor | None = None


class TooFewTokens(ValueError):
    """A two-stage model asked for more proposals than its images have encoder tokens."""


def check_num_proposals(k: int, tokens: int) -> None:
    """TooFewTokens (a ValueError) when the ``k`` proposals to keep exceed the ``tokens``
    encoder tokens."""
    if k > tokens:
        raise TooFewTokens(f"two_stage_num_proposals ({k}) exceeds the {tokens} encoder tokens "
                         f"of these images")


class DeformableTransformer(nn.Module):
    """Encoder + decoder. ``forward(srcs, masks, pos_embeds, query_embed)``: per level
    (N, C, H_l, W_l) features, (N, H_l, W_l) padding masks (True on padding) and
    (N, C, H_l, W_l) position encodings; ``query_embed`` (Lq, 2C) = (query_pos | tgt),
    or None in two-stage mode. Returns a ``TransformerOutput``.

    ``encoder_token_ratio`` < 1 (Sparse DETR): ``token_scorer`` scores the encoder's
    input tokens and every encoder layer updates only that fraction of each image's
    tokens (``ddetr.models.token_selection``); 1 is the dense encoder."""

    def __init__(self, d_model=256, num_heads=8, num_encoder_layers=6, num_decoder_layers=6,
                 dim_feedforward=1024, dropout=0.1, activation="relu", num_feature_levels=4,
                 enc_num_points=4, dec_num_points=4, two_stage=False,
                 two_stage_num_proposals=300, encoder_token_ratio=1.0):
        super().__init__()
        self.d_model = d_model
        self.two_stage = two_stage
        self.two_stage_num_proposals = two_stage_num_proposals
        common = dict(d_model=d_model, dim_feedforward=dim_feedforward, dropout=dropout,
                      activation=activation, num_levels=num_feature_levels, num_heads=num_heads)
        self.encoder = DeformableTransformerEncoder(
            [DeformableTransformerEncoderLayer(**common, num_points=enc_num_points)
             for _ in range(num_encoder_layers)])
        self.decoder = self._make_decoder(
            [DeformableTransformerDecoderLayer(**common, num_points=dec_num_points)
             for _ in range(num_decoder_layers)])
        self.level_embed = nn.Parameter(torch.empty(num_feature_levels, d_model))
        # each level's index in the detector's full pyramid (None: 0, 1, ...); set by a
        # detector that dropped levels (``feature_levels``): it sizes the proposal boxes
        self.proposal_levels: list[int] | None = None
        self._make_query_modules()
        self._reset_parameters()
        # Sparse DETR: built last (the other parameters draw the same initial values)
        # and only below 1, so a dense model's state dict has no scorer
        self.encoder_token_ratio = encoder_token_ratio
        self.token_scorer = TokenScorer(d_model) if encoder_token_ratio < 1 else None

    def _make_decoder(self, layers: list[nn.Module]) -> nn.Module:
        return DeformableTransformerDecoder(layers)

    def _make_query_modules(self) -> None:
        """The modules that turn the memory (two-stage) or learned embeddings into
        decoder queries (a variant overrides this and ``_reset_query_modules``)."""
        d_model = self.d_model
        if self.two_stage:
            self.enc_output = nn.Linear(d_model, d_model)
            self.enc_output_norm = nn.LayerNorm(d_model)
            self.pos_trans = nn.Linear(d_model * 2, d_model * 2)
            self.pos_trans_norm = nn.LayerNorm(d_model * 2)
        else:
            self.reference_points = nn.Linear(d_model, 2)

    def _reset_query_modules(self) -> None:
        if not self.two_stage:
            nn.init.xavier_uniform_(self.reference_points.weight, gain=1.0)
            nn.init.zeros_(self.reference_points.bias)

    def _reset_parameters(self) -> None:
        # official order: Xavier on every matrix, then MSDeformAttn's own init, the
        # reference-point layer, and a standard normal level embedding
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m._reset_parameters()
        self._reset_query_modules()
        nn.init.normal_(self.level_embed)

    def forward(self, srcs: list[Tensor], masks: list[Tensor], pos_embeds: list[Tensor],
                query_embed: Tensor | None = None) -> TransformerOutput:
        memory, flat, value_mask = self.encode(srcs, masks, pos_embeds)
        enc_class = enc_coord = None
        if self.two_stage:
            query_pos, tgt, reference_points, enc_class, enc_coord = self._proposal_queries(
                memory, flat.mask, flat.levels.sizes)
        else:
            if query_embed is None:
                raise ValueError("query_embed: required unless two_stage")
            query_pos, tgt, reference_points = self._learned_queries(query_embed, memory.shape[0])
        hs, refs, boxes = self.decoder(tgt, reference_points, memory, flat.levels,
                                       flat.level_start_index, flat.valid_ratios, query_pos,
                                       value_mask)
        return TransformerOutput(torch.stack(hs), reference_points, torch.stack(refs),
                                 enc_class, enc_coord,
                                 None if boxes is None else torch.stack(boxes))

    def encode(self, srcs: list[Tensor], masks: list[Tensor], pos_embeds: list[Tensor]):
        """Flattens the levels and runs the encoder. Returns ``(memory (N, S, C), flat
        (the ``flatten_multiscale`` result), value_mask (N, S) or None when nothing is
        padding)``."""
        flat = flatten_multiscale(srcs, masks, pos_embeds, self.level_embed)
        # (H, W) pairs as ints: known while tracing, so torch.compile needs no data
        sizes = [tuple(src.shape[-2:]) for src in srcs]
        enc_refs = encoder_reference_points(sizes, flat.valid_ratios)
        # without padding anywhere (one image, or equal sizes) the values need no masking
        value_mask = None if known_unpadded(flat.mask) else flat.mask
        # flat.levels (a LevelTable) stands for spatial_shapes from here down: the native
        # calls read its Python ints instead of copying the tensor to the host each time
        token_index = None
        if self.token_scorer is not None:
            scores = self.token_scorer(flat.src + flat.pos)
            token_index = select_tokens(scores, flat.mask, self.encoder_token_ratio)
        memory = self.encoder(flat.src, flat.pos, enc_refs, flat.levels,
                              flat.level_start_index, value_mask, token_index)
        return memory, flat, value_mask

    def _learned_queries(self, query_embed: Tensor, n: int):
        query_pos, tgt = torch.split(query_embed, self.d_model, dim=1)
        # (Lq, C) -> (N, Lq, C)
        query_pos = query_pos[None].expand(n, -1, -1)
        tgt = tgt[None].expand(n, -1, -1)
        return query_pos, tgt, linear_module(self.reference_points, query_pos).sigmoid()

    def score_proposals(self, memory: Tensor, padding_mask: Tensor, sizes: list,
                        class_head: nn.Module, box_head: nn.Module):
        """One proposal per encoder token: ``(features (N, S, C), class logits (N, S, K),
        box logits (N, S, 4))``, the box head correcting the token's own proposal box
        (invalid tokens: zero features, +inf box logits)."""
        logits, keep = encoder_proposals(padding_mask, sizes, memory.dtype, self.proposal_levels)
        features = self.enc_output_norm(linear_module(self.enc_output,
                                                      memory.masked_fill(~keep, 0.0)))
        return features, linear_module(class_head, features), box_head(features) + logits

    def _proposal_queries(self, memory: Tensor, padding_mask: Tensor, sizes: list):
        """Scores one proposal per encoder token with the extra (last) heads, keeps the
        top ``two_stage_num_proposals`` and embeds their (detached) boxes as queries."""
        k = self.two_stage_num_proposals
        check_num_proposals(k, memory.shape[1])
        head = self.decoder.num_layers
        _, enc_class, enc_coord = self.score_proposals(
            memory, padding_mask, sizes, self.decoder.class_embed[head],
            self.decoder.bbox_embed[head])
        top = torch.topk(enc_class[..., 0], k, dim=1)[1]
        # (N, K) -> (N, K, 4) indices of the chosen proposals' box logits
        boxes = torch.gather(enc_coord, 1, top[..., None].expand(-1, -1, 4)).detach()
        # (the sine embedding is computed in float32; a bfloat16 model takes it in bfloat16)
        pos = proposal_pos_embed(boxes, self.d_model // 2).to(memory.dtype)
        embed = self.pos_trans_norm(linear_module(self.pos_trans, pos))
        query_pos, tgt = torch.split(embed, self.d_model, dim=2)
        return query_pos, tgt, boxes.sigmoid(), enc_class, enc_coord
