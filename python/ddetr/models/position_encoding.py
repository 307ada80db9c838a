"""2-d position encodings of feature maps (the official ``position_encoding.py`` semantics).

``PositionEmbeddingSine``: for each valid pixel, its 1-based row and column counted over
the non-padded area, shifted by ``offset`` (-0.5, the pixel centre, in Deformable DETR;
0 in DETR), normalised by the valid height (width) and scaled to [0, 2*pi]; then ``num_pos_feats`` sinusoids of each, at
frequencies ``temperature ** (2*floor(i/2) / num_pos_feats)``, sin on even and cos on odd
channels. The output is ``cat(y features, x features)`` on the channel axis.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ddetr.models.size_cache import SizeCache, known_unpadded, tracing


class PositionEmbeddingSine(nn.Module):
    """Sine encoding; ``forward(mask)`` maps a (N, H, W) padding mask to (N, 2F, H, W).

    Args:
        num_pos_feats: F, channels per axis (d_model // 2).
        temperature: base of the frequencies.
        normalize: divide positions by the valid extent (the official model: True).
        scale: the normalised range (2*pi).
        offset: added to the 1-based positions before normalising: -0.5 (Deformable
            DETR, the pixel centre) or 0.0 (DETR: y / (y_last + eps) * scale).
    """

    def __init__(self, num_pos_feats: int = 128, temperature: float = 10000,
                 normalize: bool = True, scale: float | None = None, offset: float = -0.5):
        super().__init__()
        if scale is not None and not normalize:
            raise ValueError("scale: only used with normalize=True")
        if offset != -0.5 and not normalize:
            raise ValueError("offset: only used with normalize=True")
        self.offset = float(offset)
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = 2 * math.pi if scale is None else scale

    def forward(self, mask: Tensor) -> Tensor:
        # without padding the encoding depends on the size alone: made once per size,
        # handed out as a copy
        if not known_unpadded(mask):
            return self._encode(mask)
        n, h, w = mask.shape
        key = (h, w, str(mask.device), self.num_pos_feats, float(self.temperature),
               self.normalize, float(self.scale), self.offset)
        cached = UNPADDED.get(key, lambda: self._encode(mask[:1].clone()))
        return cached.expand(n, -1, -1, -1).clone()

    def _encode(self, mask: Tensor) -> Tensor:
        not_mask = ~mask
        y = not_mask.cumsum(1, dtype=torch.float32)
        x = not_mask.cumsum(2, dtype=torch.float32)
        if self.normalize:
            eps = 1e-6
            y = (y + self.offset) / (y[:, -1:, :] + eps) * self.scale
            x = (x + self.offset) / (x[:, :, -1:] + eps) * self.scale
        # both axes at once: (N, H, W, 2) -> (N, H, W, 2, F) -> (N, H, W, 2F) = cat(y, x)
        angles = torch.stack((y, x), -1)[..., None] / sine_frequencies(
            self.num_pos_feats, self.temperature, mask.device)
        return interleave_sin_cos(angles).flatten(3).permute(0, 3, 1, 2)


# the sine encodings of unpadded masks: 16 sizes (4 to 5 levels of a few image sizes)
UNPADDED = SizeCache(16)
FREQUENCIES = SizeCache(16)


def sine_frequencies(num_pos_feats: int, temperature: float, device) -> Tensor:
    """(F,) float32 ``temperature ** (2 * floor(i / 2) / F)``, made once per device (a
    constant: recomputing it took five ops per use; a traced graph computes it)."""
    def make():
        i = torch.arange(num_pos_feats, dtype=torch.float32, device=device)
        return temperature ** (2 * (i // 2) / num_pos_feats)
    if tracing():
        return make()
    return FREQUENCIES.get((num_pos_feats, float(temperature), str(device)), make)


def interleave_sin_cos(angles: Tensor) -> Tensor:
    """(..., F) angles -> (..., F): sin of the even channels and cos of the odd ones."""
    # (..., F/2) sin, cos -> (..., F/2, 2) -> (..., F)
    return torch.stack((angles[..., 0::2].sin(), angles[..., 1::2].cos()), -1).flatten(-2)


class PositionEmbeddingLearned(nn.Module):
    """Learned encoding (official ``--position_embedding learned``): a row and a column
    table of 50 entries each; ``forward(mask)`` -> (N, 2F, H, W) as cat(column, row)."""

    def __init__(self, num_pos_feats: int = 128):
        super().__init__()
        self.row_embed = nn.Embedding(50, num_pos_feats)
        self.col_embed = nn.Embedding(50, num_pos_feats)
        nn.init.uniform_(self.row_embed.weight)
        nn.init.uniform_(self.col_embed.weight)

    def forward(self, mask: Tensor) -> Tensor:
        n, h, w = mask.shape
        if h > 50 or w > 50:
            raise ValueError(f"mask: the learned encoding covers at most 50x50 maps, got {h}x{w}")
        cols = self.col_embed(torch.arange(w, device=mask.device))
        rows = self.row_embed(torch.arange(h, device=mask.device))
        # (W, F), (H, F) -> (H, W, 2F) -> (2F, H, W) -> (N, 2F, H, W)
        grid = torch.cat([cols[None].expand(h, w, -1), rows[:, None].expand(h, w, -1)], dim=-1)
        return grid.permute(2, 0, 1)[None].expand(n, -1, -1, -1)


def build_position_encoding(kind: str, d_model: int, sine_offset: float = -0.5) -> nn.Module:
    """``"sine"`` (positions shifted by ``sine_offset``, see ``PositionEmbeddingSine``) or
    ``"learned"`` encoding of d_model // 2 channels per axis."""
    if kind == "sine":
        return PositionEmbeddingSine(d_model // 2, normalize=True, offset=sine_offset)
    if kind == "learned":
        return PositionEmbeddingLearned(d_model // 2)
    raise ValueError(f"position_embedding: expected 'sine' or 'learned', got {kind!r}")
