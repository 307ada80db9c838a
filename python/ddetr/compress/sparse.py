"""Encoder token sparsification (Sparse DETR, Roh et al., ICLR 2022) applied post hoc:
every encoder layer updates only the fraction ``rho`` of each image's tokens that a small
scoring network picks, while all tokens stay values (``ddetr.models.token_selection``).

The scorer is trained after the fact, detector frozen, on calibration images: its
targets are each image's top-``rho`` tokens of the decoder attention map (DAM: how much
attention weight each encoder token receives from the decoder's sampling points,
``encoder_token_saliency``), with a binary cross-entropy per token. The DAM exists in
every variant (one-stage, box refinement, two-stage).

Use::

    state = train_token_scorer(model, calib_images, rho=0.3, time_budget=60)
    sparse = sparsify_encoder(model, 0.3, state)
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor

from ddetr.compress.calibrate import TokenSaliency, encoder_token_saliency
from ddetr.compress.techniques import check_model, rebuild, state_copy
from ddetr.models.deformable_detr import DeformableDetr
from ddetr.models.token_selection import TokenScorer, select_tokens, tokens_kept

SCORER_PREFIX = "transformer.token_scorer."


def _check_rho(rho) -> None:
    if not isinstance(rho, (int, float)) or isinstance(rho, bool) or not 0 < rho <= 1:
        raise ValueError(f"rho: expected a number in (0, 1] (the fraction of encoder tokens "
                         f"updated), got {rho!r}")


def _scorer_state(model: DeformableDetr, scorer_state: dict | None) -> dict:
    """The scorer weights a sparsified model gets (keys of ``TokenScorer``'s state dict)."""
    if scorer_state is not None:
        expected = set(TokenScorer(model.config["d_model"]).state_dict())
        if not isinstance(scorer_state, dict) or set(scorer_state) != expected:
            raise ValueError(f"scorer_state: expected a TokenScorer state dict with keys "
                             f"{sorted(expected)} (train_token_scorer's result)")
        return scorer_state
    if model.transformer.token_scorer is not None:
        return model.transformer.token_scorer.state_dict()
    return TokenScorer(model.config["d_model"]).state_dict()


def sparsify_encoder(model: DeformableDetr, rho: float, scorer_state: dict | None = None
                     ) -> DeformableDetr:
    """A new ``DeformableDetr`` whose encoder layers update only the top ``rho`` (0 < rho
    <= 1) of each image's tokens (max(1, ceil(rho * valid tokens))) as scored by the
    token scorer ``scorer_state`` (``train_token_scorer``'s result; None: the model's own
    scorer if it has one, else an untrained one, which selects about at random). Every
    token stays a value; ``rho = 1`` is the dense encoder (the original outputs, no
    scorer). The original is left alone; ``compression`` records the change."""
    check_model(model)
    _check_rho(rho)
    state = {k: v for k, v in state_copy(model).items() if not k.startswith(SCORER_PREFIX)}
    if rho < 1:
        scorer = _scorer_state(model, scorer_state)
        state.update({SCORER_PREFIX + k: v.detach().clone() for k, v in scorer.items()})
    record = {"technique": "sparsify_encoder", "rho": rho}
    return rebuild(model, state, record, encoder_token_ratio=rho)


def _dam_targets(saliency: TokenSaliency, rho: float) -> Tensor:
    """(N, S) float32: 1 on each image's top-rho valid tokens of the DAM, else 0."""
    k = tokens_kept((~saliency.padding).sum(1), rho)
    dam = saliency.dam.masked_fill(saliency.padding, float("-inf"))
    # (N, S) each token's rank in its image (the inverse of the sorting permutation)
    rank = dam.argsort(dim=1, descending=True, stable=True).argsort(dim=1)
    return (rank < k[:, None]).float()


def _training_set(saliency: list[TokenSaliency], rho: float) -> tuple[Tensor, Tensor]:
    """Every valid calibration token and its target: (T, C) tokens, (T,) 0/1 labels."""
    tokens, labels = [], []
    for batch in saliency:
        valid = ~batch.padding
        tokens.append(batch.tokens[valid])
        labels.append(_dam_targets(batch, rho)[valid])
    return torch.cat(tokens), torch.cat(labels)


def _check_budget(steps, time_budget, batch_tokens) -> None:
    for name, v in (("steps", steps), ("batch_tokens", batch_tokens)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name}: expected a positive int, got {v!r}")
    if not isinstance(time_budget, (int, float)) or isinstance(time_budget, bool) \
            or not time_budget > 0:
        raise ValueError(f"time_budget: expected a positive number of seconds, got "
                         f"{time_budget!r}")


def train_token_scorer(model: DeformableDetr, images: Iterable, rho: float, steps: int = 500,
                       time_budget: float = 60.0, lr: float = 1e-3, batch_tokens: int = 4096,
                       seed: int = 0) -> dict[str, Tensor]:
    """Trains a token scorer for ``model`` (frozen, normally the dense original) on
    calibration ``images`` (an iterable of (1, 3, H, W) normalised image tensors on the
    model's device, or of (images, mask) batches) and returns its weights, for
    ``sparsify_encoder(model, rho, state)``.

    Targets: per image the top-``rho`` tokens of the decoder attention map (1) and the
    rest (0); loss: binary cross-entropy on ``batch_tokens`` random tokens per step, AdamW
    at ``lr``, for ``steps`` steps or ``time_budget`` seconds, whichever ends first (the
    model's forward on the images comes on top: one pass each). Seeded by ``seed``."""
    check_model(model)
    _check_rho(rho)
    _check_budget(steps, time_budget, batch_tokens)
    tokens, labels = _training_set(encoder_token_saliency(model, images), rho)
    g = torch.Generator(device="cpu").manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        scorer = TokenScorer(tokens.shape[1]).to(tokens.device)
    optimizer = torch.optim.AdamW(scorer.parameters(), lr=lr, weight_decay=1e-4)
    start = time.perf_counter()
    with torch.enable_grad():
        for _ in range(steps):
            pick = torch.randint(len(tokens), (min(batch_tokens, len(tokens)),), generator=g)
            pick = pick.to(tokens.device)
            loss = F.binary_cross_entropy_with_logits(scorer(tokens[pick]), labels[pick])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if time.perf_counter() - start > time_budget:
                break
    return {k: v.detach().clone() for k, v in scorer.state_dict().items()}


@torch.no_grad()
def selection_recall(sparse: DeformableDetr, reference: DeformableDetr,
                     images: Iterable) -> float:
    """How well ``sparse``'s scorer finds the tokens the decoder of ``reference`` (the
    dense original) attends to most: the fraction of each image's top-rho DAM tokens
    among the tokens ``sparse`` updates, over all calibration images (rho = sparse's
    ratio; a random choice scores about rho)."""
    check_model(sparse)
    check_model(reference)
    scorer = sparse.transformer.token_scorer
    if scorer is None:
        raise ValueError("sparse: a model with encoder_token_ratio < 1 (sparsify_encoder)")
    rho = sparse.config["encoder_token_ratio"]
    hits = total = 0
    for batch in encoder_token_saliency(reference, images):
        wanted = _dam_targets(batch, rho)
        scores = scorer(batch.tokens.to(next(scorer.parameters()).dtype))
        chosen = select_tokens(scores, batch.padding, rho)
        hits += int(wanted.gather(1, chosen).sum())
        total += int(wanted.sum())
    return hits / max(total, 1)

