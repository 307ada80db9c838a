"""Encoder token sparsification (Sparse DETR, Roh et al., ICLR 2022): a small network
scores every encoder token, each image keeps the top fraction ``ratio`` of its valid
tokens, and every encoder layer updates only those rows (their deformable attention and
FFN) while all tokens stay values; the rest pass through the encoder unchanged.

``TokenScorer`` is the scoring network (``transformer.token_scorer`` in the state dict,
built only when ``encoder_token_ratio < 1``), ``select_tokens`` picks the rows, and
``RowIndex`` gathers them from and scatters them back into (N, S, ...) tensors.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class TokenScorer(nn.Module):
    """A saliency logit per encoder token: LayerNorm, Linear(C, C), ReLU, Linear(C, 1)
    on the encoder's input tokens (features + position and level embedding)."""

    def __init__(self, d_model: int):
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_model)
        self.linear2 = nn.Linear(d_model, 1)

    def forward(self, tokens: Tensor) -> Tensor:
        """(N, S, C) tokens -> (N, S) logits."""
        hidden = torch.relu(self.linear1(self.norm(tokens)))
        return self.linear2(hidden).squeeze(-1)


def tokens_kept(valid: Tensor, ratio: float) -> Tensor:
    """(N,) valid tokens per image -> (N,) int64 tokens kept: max(1, ceil(ratio * valid))
    (the 1e-9 keeps 0.3 * 10 at 3 despite its rounding to 3.0000000000000004)."""
    return torch.ceil(valid.to(torch.float64) * ratio - 1e-9).clamp_(min=1).long()


def select_tokens(scores: Tensor, padding_mask: Tensor | None, ratio: float) -> Tensor:
    """The rows each image updates: (N, S) scores, (N, S) bool padding mask (True on
    padding, or None) -> (N, K) int64 token indices, ascending and distinct per image.

    Image n keeps its k_n = max(1, ceil(ratio * valid_n)) best-scored valid tokens; K is
    the largest k_n. An image with fewer (a smaller image in a padded batch) fills its
    row with padding tokens, of which it has at least K - k_n: their values are masked
    out, so updating them changes no valid token and no detection."""
    n, s = scores.shape
    pad = torch.zeros_like(scores, dtype=torch.bool) if padding_mask is None else padding_mask
    k = tokens_kept(s - pad.sum(1), ratio)
    top = int(k.max())
    # (N, S): valid tokens best first, padding last (stable: ties keep token order)
    order = scores.masked_fill(pad, float("-inf")).sort(dim=1, descending=True, stable=True)[1]
    cols = torch.arange(top, device=scores.device)
    # (N, K) positions in `order`: the k_n first, then the last K - k_n (padding)
    take = torch.where(cols < k[:, None], cols, s - top + cols)
    return order.gather(1, take).sort(1)[0]


class RowIndex:
    """Rows ``index`` (N, K) of tensors laid out (N, S, ...): ``gather`` reads them as
    (N, K, ...), ``scatter`` writes (N, K, ...) rows back."""

    def __init__(self, index: Tensor, tokens: int):
        n, k = index.shape
        self.shape = (n, k)
        # (N, K) -> (N*K,) rows of the (N*S, ...) view
        offsets = torch.arange(n, device=index.device)[:, None] * tokens
        self.flat = (index + offsets).reshape(-1)

    def gather(self, t: Tensor) -> Tensor:
        """(N, S, ...) -> (N, K, ...)."""
        # (N, S, ...) -> (N*S, ...) -> (N*K, ...) -> (N, K, ...)
        rows = t.reshape(-1, *t.shape[2:]).index_select(0, self.flat)
        return rows.view(*self.shape, *t.shape[2:])

    def scatter(self, t: Tensor, rows: Tensor, in_place: bool = False) -> Tensor:
        """t (N, S, ...) with its rows replaced by ``rows`` (N, K, ...); in place (t
        contiguous, no autograd) or as a new tensor."""
        # (N, K, ...) -> (N*K, ...) into the (N*S, ...) view of t
        src = rows.reshape(-1, *rows.shape[2:])
        if in_place:
            t.view(-1, *t.shape[2:]).index_copy_(0, self.flat, src)
            return t
        return t.reshape(-1, *t.shape[2:]).index_copy(0, self.flat, src).view_as(t)
