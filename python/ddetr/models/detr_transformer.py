"""DETR's dense transformer (Carion et al., ECCV 2020): every token attends to every token.

Post-norm layers (residual, then LayerNorm) built on ``nn.MultiheadAttention``, so the
parameter names are those of facebookresearch/detr's checkpoints:
``encoder.layers.{i}.{self_attn, linear1, linear2, norm1, norm2}``,
``decoder.layers.{i}.{self_attn, multihead_attn, linear1, linear2, norm1, norm2, norm3}``
and the decoder's shared final ``decoder.norm``.

Where positions enter: the encoder adds the pixel encoding ``pos`` to the queries and
keys of its self-attention (never to the values); the decoder adds the learned
``query_pos`` to the queries and keys of its self-attention and to the queries of its
cross-attention, whose keys are the encoder memory plus ``pos``. Decoder queries start
at zero. Letters: N batch, S = H*W pixels, Lq queries, D = d_model.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ddetr.models.transformer_layers import activation_fn


class DetrEncoderLayer(nn.Module):
    """Self-attention over the pixels, then the FFN; each followed by add & norm."""

    def __init__(self, d_model: int, num_heads: int, dim_feedforward: int, dropout: float,
                 activation: str):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, num_heads, dropout=dropout,
                                               batch_first=True)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.activation = activation_fn(activation)

    def forward(self, src: Tensor, padding_mask: Tensor, pos: Tensor) -> Tensor:
        """src, pos (N, S, D); padding_mask (N, S) True on padding -> (N, S, D)."""
        qk = src + pos
        attended = self.self_attn(qk, qk, src, key_padding_mask=padding_mask,
                                  need_weights=False)[0]
        src = self.norm1(src + self.dropout1(attended))
        return self.norm2(src + self.dropout2(_ffn(self, src)))


class DetrDecoderLayer(nn.Module):
    """Self-attention among the queries, cross-attention to the memory, the FFN; each
    followed by add & norm (norm1, norm2, norm3)."""

    def __init__(self, d_model: int, num_heads: int, dim_feedforward: int, dropout: float,
                 activation: str):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, num_heads, dropout=dropout,
                                               batch_first=True)
        self.multihead_attn = nn.MultiheadAttention(d_model, num_heads, dropout=dropout,
                                                    batch_first=True)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)
        self.activation = activation_fn(activation)

    def forward(self, tgt: Tensor, query_pos: Tensor, memory: Tensor, padding_mask: Tensor,
                pos: Tensor) -> Tensor:
        """tgt, query_pos (N, Lq, D); memory, pos (N, S, D); padding_mask (N, S) True on
        padding -> (N, Lq, D)."""
        qk = tgt + query_pos
        attended = self.self_attn(qk, qk, tgt, need_weights=False)[0]
        tgt = self.norm1(tgt + self.dropout1(attended))
        attended = self.multihead_attn(tgt + query_pos, memory + pos, memory,
                                       key_padding_mask=padding_mask, need_weights=False)[0]
        tgt = self.norm2(tgt + self.dropout2(attended))
        return self.norm3(tgt + self.dropout3(_ffn(self, tgt)))


def _ffn(layer: nn.Module, x: Tensor) -> Tensor:
    """linear2(dropout(activation(linear1(x))))."""
    return layer.linear2(layer.dropout(layer.activation(layer.linear1(x))))


class DetrEncoder(nn.Module):
    """A stack of encoder layers (post-norm: no final norm, as the official model)."""

    def __init__(self, layers: list[nn.Module]):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, src: Tensor, padding_mask: Tensor, pos: Tensor) -> Tensor:
        for layer in self.layers:
            src = layer(src, padding_mask, pos)
        return src


class DetrDecoder(nn.Module):
    """A stack of decoder layers; every layer's output goes through the shared ``norm``."""

    def __init__(self, layers: list[nn.Module], d_model: int):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, tgt: Tensor, query_pos: Tensor, memory: Tensor, padding_mask: Tensor,
                pos: Tensor) -> Tensor:
        """-> (num_layers, N, Lq, D): each layer's normalised output, the last one last.
        Only the normalised copies leave the layer: the next layer reads the raw output."""
        outputs = []
        for layer in self.layers:
            tgt = layer(tgt, query_pos, memory, padding_mask, pos)
            outputs.append(self.norm(tgt))
        return torch.stack(outputs)


class DetrTransformer(nn.Module):
    """Encoder and decoder over one feature map (the official ``Transformer``).

    Args:
        d_model, num_heads, num_encoder_layers, num_decoder_layers, dim_feedforward,
        dropout, activation: the sizes (official: 256, 8, 6, 6, 2048, 0.1, "relu").
    """

    def __init__(self, d_model: int = 256, num_heads: int = 8, num_encoder_layers: int = 6,
                 num_decoder_layers: int = 6, dim_feedforward: int = 2048,
                 dropout: float = 0.1, activation: str = "relu"):
        super().__init__()
        if d_model % num_heads:
            raise ValueError(f"num_heads: must divide d_model ({d_model}), got {num_heads}")
        sizes = (d_model, num_heads, dim_feedforward, dropout, activation)
        self.encoder = DetrEncoder([DetrEncoderLayer(*sizes) for _ in range(num_encoder_layers)])
        self.decoder = DetrDecoder([DetrDecoderLayer(*sizes) for _ in range(num_decoder_layers)],
                                   d_model)
        self.d_model, self.num_heads = d_model, num_heads
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(self, src: Tensor, mask: Tensor, query_embed: Tensor, pos: Tensor) -> Tensor:
        """Decodes ``Lq`` object queries from one feature map.

        Args:
            src: (N, D, H, W) projected backbone features.
            mask: (N, H, W) bool, True on padding.
            query_embed: (Lq, D) learned query positions.
            pos: (N, D, H, W) pixel position encoding.

        Returns:
            (num_decoder_layers, N, Lq, D) decoder outputs after the final norm.
        """
        n = src.shape[0]
        # (N, D, H, W) -> (N, D, S) -> (N, S, D)
        src = src.flatten(2).transpose(1, 2)
        pos = pos.flatten(2).transpose(1, 2)
        # (N, H, W) -> (N, S)
        mask = mask.flatten(1)
        memory = self.encoder(src, mask, pos)
        # (Lq, D) -> (N, Lq, D)
        query_pos = query_embed[None].expand(n, -1, -1)
        tgt = torch.zeros_like(query_pos)
        return self.decoder(tgt, query_pos, memory, mask, pos)
