"""Training checkpoints: model, optimiser, lr scheduler, grad scaler, epoch, the
training config and every random number generator, so a resumed run continues exactly
as an uninterrupted one (same data order, augmentations and dropout).

Layout (a ``torch.save`` dict, the official keys plus ``rng``, ``scaler``, ``config``):
``{"model", "optimizer", "lr_scheduler", "epoch", "config", "rng", "scaler"}``.
"""

from __future__ import annotations

import logging
import os
import random

import numpy as np
import torch

from ddetr.models import weights

logger = logging.getLogger(__name__)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str, model, optimizer, lr_scheduler, epoch: int, config: dict,
                    scaler=None, rng_states: list | None = None) -> None:
    """Writes the checkpoint atomically (a temporary file, then a rename).
    ``rng_states``: every process's ``rng_state()`` in rank order (default: this one's)."""
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "lr_scheduler": lr_scheduler.state_dict(), "epoch": epoch, "config": config,
             "rng": rng_states if rng_states is not None else [rng_state()],
             "scaler": scaler.state_dict() if scaler is not None else None}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def read_checkpoint(path: str) -> dict:
    """Loads a checkpoint dict on the CPU; ValueError if missing or not a checkpoint."""
    if not os.path.isfile(path):
        raise ValueError(f"checkpoint: {path!r} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # torch raises many types for a corrupt file
        raise ValueError(f"checkpoint: {path} cannot be read ({e})") from None
    if not isinstance(state, dict) or "model" not in state:
        raise ValueError(f"checkpoint: {path} holds no 'model' state dict")
    return state


def resume(state: dict, model, optimizer=None, lr_scheduler=None, scaler=None,
           restore_rng: bool = True, rank: int = 0) -> int:
    """Restores what ``save_checkpoint`` saved into the given objects (any may be None)
    and process ``rank``'s generators (the first saved ones if the checkpoint has fewer
    processes); returns the epoch to start from (the saved epoch + 1). Model keys are
    loaded non-strictly, as the official ``--resume`` (a FLOP counter's extra keys are
    ignored)."""
    weights.load_weights(model, state["model"], strict=False, source="checkpoint")
    if optimizer is not None and state.get("optimizer") is not None:
        optimizer.load_state_dict(state["optimizer"])
    if lr_scheduler is not None and state.get("lr_scheduler") is not None:
        lr_scheduler.load_state_dict(state["lr_scheduler"])
    if scaler is not None and state.get("scaler") is not None:
        scaler.load_state_dict(state["scaler"])
    if restore_rng and state.get("rng"):
        states = state["rng"]
        set_rng_state(states[rank] if rank < len(states) else states[0])
    return int(state.get("epoch", -1)) + 1
