"""Training checkpoints: model, optimiser, lr scheduler, grad scaler, epoch, the
training config and every random number generator, so a resumed run continues exactly
as an uninterrupted one (same data order, augmentations and dropout).

Layout (a ``torch.save`` dict, the official keys plus ``rng``, ``scaler``, ``config``):
``{"model", "optimizer", "lr_scheduler", "epoch", "config", "rng", "scaler"}``, and
``"ema"`` (``{"model", "decay", "updates"}``) when the run keeps a weight average
(``--ema_decay``; ``inference_weights`` then picks it), holding
only tensors and plain data (the generators' states too), so ``read_checkpoint`` loads
it with ``weights_only``: no code in a downloaded file runs. Files needing more (an
older ddetr's, with pickled numpy states) load only with ``trust_pickle=True``.
"""

from __future__ import annotations

import logging
import os
import random

import numpy as np
import torch

from ddetr.models import weights

logger = logging.getLogger(__name__)


TRUST_HINT = ("If you trust the file (such as a checkpoint of an older ddetr), pass "
              "trust_pickle=True (the --trust_pickle flag of ddetr eval, predict and train), "
              "which runs any code the file holds.")


def rng_state() -> dict:
    """This process's generators as tensors and plain data."""
    version, internal, gauss_next = random.getstate()
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    state = {"python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64),
                        "gauss_next": gauss_next},
             "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)),
                       "pos": int(pos), "has_gauss": int(has_gauss),
                       "cached_gaussian": float(cached_gaussian)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restores ``rng_state()``'s generators (or an older ddetr's pickled states)."""
    random.setstate(_python_state(state["python"]))
    np.random.set_state(_numpy_state(state["numpy"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _python_state(saved) -> tuple:
    if not isinstance(saved, dict):  # an older checkpoint: random.getstate() itself
        return saved
    return saved["version"], tuple(saved["state"].tolist()), saved["gauss_next"]


def _numpy_state(saved) -> tuple:
    if not isinstance(saved, dict):  # an older checkpoint: np.random.get_state() itself
        return saved
    return (saved["name"], saved["keys"].numpy().astype(np.uint32), saved["pos"],
            saved["has_gauss"], saved["cached_gaussian"])


def save_checkpoint(path: str, model, optimizer, lr_scheduler, epoch: int, config: dict,
                    scaler=None, rng_states: list | None = None, ema=None) -> None:
    """Writes the checkpoint atomically (a temporary file, then a rename).
    ``rng_states``: every process's ``rng_state()`` in rank order (default: this one's).
    ``config`` must be plain data (paths become strings, numpy scalars numbers).
    ``ema``: the run's ``WeightAverage``, if any."""
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "lr_scheduler": lr_scheduler.state_dict(), "epoch": epoch,
             "config": plain_data(config, "config"),
             "rng": rng_states if rng_states is not None else [rng_state()],
             "scaler": scaler.state_dict() if scaler is not None else None}
    if ema is not None:
        state["ema"] = ema.state_dict()
    write_atomic(state, path)


def inference_weights(state: dict) -> dict:
    """The state dict a checkpoint's model is used with: the weight average when the run
    kept one (``"ema"``), else ``"model"``."""
    ema = state.get("ema")
    if isinstance(ema, dict) and isinstance(ema.get("model"), dict):
        return ema["model"]
    return state["model"]


def write_atomic(state: dict, path: str) -> None:
    """``torch.save(state, path)`` through a temporary file and a rename, so a reader
    never sees half a file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def plain_data(value, where: str):
    """``value`` with paths as strings and numpy scalars as numbers; ValueError naming
    the entry that is not tensors, str, int, float, bool, None, list, tuple or dict."""
    if isinstance(value, dict):
        return {k: plain_data(v, f"{where}[{k!r}]") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        items = [plain_data(v, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if isinstance(value, list) else tuple(items)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (str, int, float, bool, torch.Tensor)):
        return value
    raise ValueError(f"{where}: a {type(value).__name__}; a checkpoint holds only tensors "
                     f"and plain data")


def read_checkpoint(path: str, trust_pickle: bool = False) -> dict:
    """Loads a checkpoint dict on the CPU, tensors and plain data only (nothing in the
    file runs); ValueError if missing, not a checkpoint or holding other Python objects.
    ``trust_pickle``: load those too, which runs any code the file holds (only for files
    you trust, such as an older ddetr's checkpoints)."""
    if not os.path.isfile(path):
        raise ValueError(f"checkpoint: {path!r} does not exist")
    if trust_pickle:
        state = _unpickle(path)
    else:
        state = weights.load_torch_file(path, "checkpoint", opt_in=TRUST_HINT)
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
        raise ValueError(f"checkpoint: {path} holds no 'model' state dict")
    return state


def _unpickle(path: str):
    """The opt-in, unsafe load: ``torch.load`` runs whatever the file's pickle says."""
    logger.warning("checkpoint: loading %s with trust_pickle: any code it holds runs", path)
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # torch raises many types for a corrupt file
        raise ValueError(f"checkpoint: {path} cannot be read ({e})") from None


def resume(state: dict, model, optimizer=None, lr_scheduler=None, scaler=None,
           restore_rng: bool = True, rank: int = 0, ema=None) -> int:
    """Restores what ``save_checkpoint`` saved into the given objects (any may be None)
    and process ``rank``'s generators (the first saved ones if the checkpoint has fewer
    processes); returns the epoch to start from (the saved epoch + 1). A model tensor
    missing from the checkpoint is a ValueError; extra keys are logged and ignored, as
    the official ``--resume`` (a FLOP counter's leftovers). ``ema`` (a
    ``WeightAverage``): restored from the checkpoint's average, or, when it has none,
    restarted from the restored model's weights."""
    weights.load_weights(model, state["model"], source="checkpoint", unexpected_ok=True)
    if ema is not None:
        if isinstance(state.get("ema"), dict):
            ema.load_state_dict(state["ema"])
        else:
            logger.warning("checkpoint: no weight average saved; the average restarts "
                           "from the resumed weights")
            ema.module.load_state_dict(model.state_dict())
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
